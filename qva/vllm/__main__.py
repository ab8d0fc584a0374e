"""`python -m qva.vllm chat-template [FILE]`: print (or write) the chat template vLLM serves a graft with."""

from __future__ import annotations

import sys
from pathlib import Path

from .chat_template import CHAT_TEMPLATE


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "chat-template" or len(args) > 2:
        print("usage: python -m qva.vllm chat-template [FILE]", file=sys.stderr)
        return 2
    if len(args) == 2:
        Path(args[1]).write_text(CHAT_TEMPLATE)
    else:
        sys.stdout.write(CHAT_TEMPLATE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
