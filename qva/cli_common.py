"""What the three commands (`qva-generate`, `qva-train`, `qva-serve`) share: dtype names, the load flags, settings
dataclasses turned into flags, and errors as one line with exit status 2.

    p = argparse.ArgumentParser(...)
    add_load_flags(p)                  # --model --whisper --adapter --dtype --device --quantize ...
    add_arguments(p, TrainConfig)      # one --flag per field, help text from the field's metadata (`opt`)
    return one_line_errors("qva-x", run, args)   # a user error → "qva-x: error: …", exit 2; Ctrl-C → 130
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, field, fields
from pathlib import Path

import torch

from weights_loader import CheckpointError
from weights_loader.writer import WriteError

from .audio import AudioError
from .image_processing import ImageError
from .linear import QUANTIZED_LINEARS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REQUIRED = object()  # `opt(REQUIRED, ...)`: a setting without a default


class UserError(Exception):
    """A problem the user can fix: printed as one line, no traceback."""


USER_ERRORS = (UserError, CheckpointError, AudioError, ImageError, WriteError, FileNotFoundError, ValueError)


def one_line_errors(prog: str, run, *args, errors: tuple = ()) -> int:
    """`run(*args)` as a command: its return value (0 if None); a user error is one line on stderr and exit 2."""
    try:
        code = run(*args)
    except (*USER_ERRORS, *errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if code is None else code


def add_load_flags(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    """The flags that say which model to load and how (`qva.load`'s arguments)."""
    p.add_argument("--model", type=Path, help="Qwen2-VL checkpoint folder, a saved qva graft, or a training run's folder")
    p.add_argument("--whisper", type=Path, help="Whisper checkpoint folder to graft on (audio input)")
    if adapter:
        p.add_argument("--adapter", type=Path, help="a LoRA adapter folder (PEFT layout) to apply")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: as stored")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quantize", choices=sorted(QUANTIZED_LINEARS),
                   help="quantization of the linears at load: int8/int4/nf4 weights only; w8a8 int8 weights and one-row activations")
    p.add_argument("--quantize-modules", default="llm", help="comma-separated stacks to quantize: llm, vision, whisper, head (the vocabulary head)")
    p.add_argument("--group-size", type=int, default=64, help="int4: weights per scale and zero (32, 64, 128, 256)")


def load_kwargs(args: argparse.Namespace) -> dict:
    """`qva.load` keyword arguments from `add_load_flags`' flags."""
    kw = dict(whisper=args.whisper, dtype=DTYPES.get(args.dtype), device=args.device, quantize=args.quantize,
              quantize_modules=tuple(m for m in args.quantize_modules.split(",") if m), group_size=args.group_size)
    if getattr(args, "adapter", None) is not None:
        kw["adapter"] = args.adapter
    return kw


# -- settings dataclasses → argparse ---------------------------------------------------------------------------------
def opt(default=REQUIRED, help: str = "", flag: str | None = None, **argparse_kw):
    """A dataclass field that is also a flag: its default (a class or a lambda: a factory), its help text, the
    flag when it is not `--the-field-name`, and any argparse details (type, choices, action, group)."""
    meta = {"help": help, "flag": flag, **argparse_kw}
    if default is REQUIRED:
        return field(metadata={**meta, "required": True})
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def comma_names(text: str) -> tuple[str, ...]:
    """"lr,seed" → ("lr", "seed"); dashes read as underscores."""
    return tuple(t.strip().replace("-", "_") for t in text.split(",") if t.strip())


def comma_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


TYPES = {"int": int, "int | None": int, "float": float, "float | None": float}


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of `cls` that has `opt` metadata: the type from the annotation, the default from the
    field, booleans as switches (`--no-x` for a field that defaults to True)."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(cls):
        meta = dict(f.metadata)
        if "help" not in meta:
            continue
        flag = meta.pop("flag") or "--" + f.name.replace("_", "-")
        group = meta.pop("group", None)
        kw = {"dest": f.name, **meta}
        if str(f.type) == "bool":
            kw["action"] = "store_false" if flag.startswith("--no-") else "store_true"
        elif kw.get("action") == "append":
            kw["default"] = []
        else:
            kw.setdefault("type", TYPES.get(str(f.type), str))
            if not kw.get("required"):
                kw["default"] = f.default_factory() if f.default_factory is not MISSING else f.default
        if group is not None and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group(required=True)
        (parser if group is None else groups[group]).add_argument(flag, **kw)


def from_args(cls, args: argparse.Namespace, **nested):
    """An instance of `cls` from the flags `add_arguments(parser, cls)` made (`nested`: fields given ready-made)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in nested and hasattr(args, f.name)}
    for f in fields(cls):
        if f.metadata.get("action") == "append" and f.name in values:
            values[f.name] = tuple(values[f.name] or ())
    return cls(**values, **nested)
