"""`qva-serve`: serve a qva model with OpenAI's Chat Completions and audio transcription APIs, and a playground
page at / (needs `pip install "qva[serve]"`).

    qva-serve --model Qwen2-VL-2B-Instruct --whisper whisper-large-v3-turbo --max-batch 8
    qva-serve --demo                      # the tiny random-weight demo model (no downloads)

The port opens at once and `/health` answers 503 while the model loads; a model that fails to load
ends the process with the reason (exit status 2). SIGTERM or SIGINT stops accepting requests, gives
running ones --shutdown-timeout seconds (then ends each with finish_reason "length"), and exits; a
second signal exits at once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..cli_common import add_load_flags, load_kwargs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qva-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_flags(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (once per batch bucket)")
    p.add_argument("--max-batch", type=int, default=8, help="KV-cache rows: requests decoded together")
    p.add_argument("--max-model-len", type=int, default=None, help="tokens per request, prompt + answer (default: the model's, ≤ 4096)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before new ones get 429")
    p.add_argument("--limit-media", type=int, default=8, help="images, videos and audio clips per request")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image/video URLs (default: data: URLs only)")
    p.add_argument("--api-key", default=os.environ.get("QVA_API_KEY"), help="require 'Authorization: Bearer KEY' (default: $QVA_API_KEY)")
    limits = p.add_argument_group("limits (per request unless said otherwise)")
    limits.add_argument("--max-body-bytes", type=int, default=64 * 2**20, help="request body bytes, and media bytes fetched for one request")
    limits.add_argument("--max-media-pixels", type=int, default=2**26, help="decoded image and video-frame pixels")
    limits.add_argument("--max-audio-seconds", type=float, default=3600.0, help="audio (never more than the context holds)")
    limits.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds to fetch one remote media URL, redirects included")
    limits.add_argument("--read-timeout", type=float, default=30.0, help="seconds for a request's headers to arrive, and for its body")
    limits.add_argument("--max-connections", type=int, default=512, help="open HTTP connections (server-wide)")
    limits.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds running requests get after SIGTERM/SIGINT")
    speech = p.add_argument_group("speech to text (/v1/audio/transcriptions, /v1/audio/translations)")
    speech.add_argument("--transcribe-prompt", help="the instruction a transcription asks (default: the prompt a qva-train run "
                        "folder was trained with, from its train_config.json; else 'Transcribe the audio.')")
    speech.add_argument("--translate-prompt", default=None, help="the instruction a translation asks (default: 'Translate the audio "
                        "into English.')")
    speech.add_argument("--transcribe-max-tokens", type=int, default=448, help="tokens generated per ≤ 30 s window at most")
    p.add_argument("--served-model-name", help="the model name clients send (default: the model folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--demo", action="store_true", help="serve the tiny random-weight demo model")
    return p.parse_args(argv)


def settings_and_loader(args):
    """Check the arguments (one-line errors) and return the server settings and a model loader."""
    import torch

    from ..cli_common import UserError
    from .app import Settings
    from .transcribe import DEFAULT_TRANSCRIBE_PROMPT, DEFAULT_TRANSLATE_PROMPT, trained_prompt

    if args.demo:
        from ..demo import demo_checkpoints

        args.model, args.whisper = demo_checkpoints()
        args.served_model_name = args.served_model_name or "qva-demo"
    if args.model is None:
        raise UserError("--model is required (or use --demo)")
    if not args.model.is_dir():
        raise UserError(f"{args.model}: no such model folder")
    for name in ("max_batch", "max_queue", "limit_media", "max_body_bytes", "max_media_pixels", "max_connections", "transcribe_max_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    for name in ("max_audio_seconds", "fetch_timeout", "read_timeout", "shutdown_timeout"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            raise UserError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {getattr(args, name)}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key (or $QVA_API_KEY) is empty, which no client could match; give a key, or leave it unset to serve without one")
    for name in ("transcribe_prompt", "translate_prompt"):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            raise UserError(f"--{name.replace('_', '-')} is empty; give the instruction, or leave it out for the default")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UserError(f"--max-model-len must be ≥ 2, got {args.max_model_len}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available on this machine")
    settings = Settings(max_batch=args.max_batch, max_model_len=args.max_model_len, max_queue=args.max_queue,
                        limit_media=args.limit_media, allow_remote_media=args.allow_remote_media, api_key=args.api_key,
                        model_name=args.served_model_name or args.model.resolve().name, compile=args.compile,
                        max_body_bytes=args.max_body_bytes, max_media_pixels=args.max_media_pixels,
                        max_audio_seconds=args.max_audio_seconds, fetch_timeout=args.fetch_timeout, read_timeout=args.read_timeout,
                        max_connections=args.max_connections, shutdown_timeout=args.shutdown_timeout,
                        transcribe_prompt=args.transcribe_prompt or trained_prompt(args.model, args.adapter) or DEFAULT_TRANSCRIBE_PROMPT,
                        translate_prompt=args.translate_prompt or DEFAULT_TRANSLATE_PROMPT, transcribe_max_tokens=args.transcribe_max_tokens)

    def loader():
        from ..pretrained import load

        model = load(args.model, **load_kwargs(args))
        print(f"qva-serve: {settings.model_name} loaded; serving on http://{args.host}:{args.port}/v1 (playground: "
              f"http://{args.host}:{args.port}/); transcriptions ask {settings.transcribe_prompt!r}", flush=True)
        return model

    return settings, loader


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print('qva-serve: error: the server needs FastAPI and uvicorn: pip install "qva[serve]"', file=sys.stderr)
        return 2
    from PIL import ImageFile

    from ..cli_common import UserError
    from .app import Server, create_app
    from .connections import protocol

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut image is refused, never decoded in part (Pillow's default, made sure)

    try:
        settings, loader = settings_and_loader(args)
    except UserError as e:
        print(f"qva-serve: error: {e}", file=sys.stderr)
        return 2
    server = Server(settings)

    def load_or_stop():
        try:
            return loader()
        except Exception:
            http.should_exit = True  # a model that cannot load ends the process (the reason is printed)
            raise

    class Http(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if self.should_exit:  # a second signal: no more grace
                print(f"qva-serve: signal {sig} again: exiting now", file=sys.stderr, flush=True)
                os._exit(128 + sig)
            server.drain(settings.shutdown_timeout)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(server, load_or_stop), host=args.host, port=args.port, log_level="warning",
                            http=protocol(settings.read_timeout, settings.max_connections), timeout_keep_alive=5,
                            timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout) + 5)  # a backstop: drain ends jobs first
    http = Http(config)
    http.run()
    if server.load_error:
        print(f"qva-serve: error: {server.load_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
