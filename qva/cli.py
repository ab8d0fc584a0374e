"""`qva-generate`: stream an answer to a prompt with any mix of images, video and audio.

    qva-generate --model Qwen2-VL-2B-Instruct --whisper whisper-large-v3-turbo \\
                 --image cat.jpg --audio question.flac --prompt "Answer the question about the picture."
    qva-generate --demo          # a tiny random-weight model, no downloads: shows the whole pipeline
    qva-generate audio-info speech.flac [--whisper DIR]   # log-mel + encoder shapes and timings

Videos are a folder of frames (sorted by name) or an animated GIF/WebP (decoded with Pillow); for
other formats extract frames first, e.g. `ffmpeg -i clip.mp4 -vf fps=2 frames/%04d.png`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from .cli_common import UserError, add_load_flags, load_kwargs, one_line_errors
from .sampling import SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qva-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_flags(p)
    p.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", type=Path, help="folder of frames, or an animated GIF/WebP")
    p.add_argument("--audio", type=Path, action="append", default=[], help="audio file (repeatable)")
    p.add_argument("--prompt", help="the user's text")
    p.add_argument("--system", help="system prompt (default: Qwen2-VL's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--demo", action="store_true", help="run on a tiny random-weight model (no weights needed)")
    return p.parse_args(argv)


def progress_bar(done: int, total: int) -> None:
    filled = 30 * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} tensors", end="", file=sys.stderr, flush=True)


def video_frames(path: Path) -> list:
    """--video as the processor's videos: one list of RGB frames, from `image_processing.video_frames`."""
    from .image_processing import ImageError
    from .image_processing import video_frames as decode

    if not (path.is_dir() or path.is_file()):
        raise UserError(f"{path}: no such video")
    try:
        return [decode(path)]
    except ImageError:
        if path.is_dir():  # a bad frame or an empty folder: the decoder's own message names it
            raise
        raise UserError(f"{path}: cannot decode (give a folder of frames or an animated GIF/WebP; e.g. ffmpeg -i in.mp4 frames/%04d.png)") from None


def demo_inputs(args) -> None:
    """Write (once) a tiny random Qwen2-VL + Whisper in the Hub's layouts; synthesise an image and a clip."""
    import numpy as np
    import soundfile as sf
    from PIL import Image, ImageDraw

    from .demo import demo_checkpoints

    args.model, args.whisper = demo_checkpoints()
    root = args.model.parent
    img = Image.new("RGB", (224, 168), (40, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((60, 30, 160, 130), fill=(240, 200, 40))
    draw.rectangle((10, 120, 214, 160), fill=(30, 140, 60))
    img.save(root / "picture.png")
    t = np.arange(3 * 16000) / 16000
    speech = 0.3 * np.sin(2 * math.pi * 150 * t * (1 + 0.2 * np.sin(2 * math.pi * 3 * t))) * (0.6 + 0.4 * np.sin(2 * math.pi * 4 * t))
    sf.write(str(root / "speech.wav"), speech.astype(np.float32), 16000)
    args.image, args.audio = [root / "picture.png"], [root / "speech.wav"]
    args.prompt = args.prompt or "Describe the picture, then answer the spoken question."
    args.max_new_tokens = min(args.max_new_tokens, 24)
    print("qva demo: tiny model with RANDOM weights — the pipeline is real, the answer is noise.", file=sys.stderr)


def run(args) -> None:
    from .generate import stream_text
    from .pretrained import load

    if args.demo:
        demo_inputs(args)
    sampling = SamplingParams(args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UserError("--top-k/--top-p need sampling: give a --temperature > 0 as well")
    if args.model is None or args.prompt is None:
        raise UserError("--model and --prompt are required (or use --demo)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available on this machine")
    if not args.model.is_dir():
        raise UserError(f"{args.model}: no such model folder")

    t0 = time.perf_counter()
    print(f"loading {args.model}" + (f" + {args.whisper}" if args.whisper else "") + " ...", file=sys.stderr, flush=True)
    model = load(args.model, **load_kwargs(args), progress=progress_bar)
    if model.processor is None:
        raise UserError(f"{args.model}: no tokenizer.json in the model folder")
    print(f"\nloaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    content = [{"type": "image", "image": p} for p in args.image]
    if args.video:
        content += [{"type": "video", "video": v} for v in video_frames(args.video)]
    content += [{"type": "audio", "audio": a} for a in args.audio]
    content.append({"type": "text", "text": args.prompt})
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": content}]
    inputs = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    inputs = {k: (v.to(args.device) if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()}
    n_prompt = inputs["input_ids"].shape[1]

    stats: dict = {}
    t_start = time.perf_counter()
    for piece in stream_text(model, model.processor, inputs, stats, sampling=sampling, compile=args.compile):
        print(piece, end="", flush=True)
    t_end = time.perf_counter()
    print()
    n_new, t_first = stats.get("tokens", 0), stats.get("first_token_at", t_end)
    decode = (n_new - 1) / (t_end - t_first) if n_new > 1 and t_end > t_first else float("nan")
    print(f"prompt {n_prompt} tokens, {n_new} new; prefill {n_prompt / (t_first - t_start):.1f} tok/s, decode {decode:.1f} tok/s",
          file=sys.stderr)


def audio_info(argv: list[str]) -> int:
    """`qva-generate audio-info [FILE] [--whisper DIR]`: log-mel and encoder output shapes, and timings."""
    from weights_loader import CheckpointError

    from .audio import SAMPLE_RATE, AudioError, load_audio, log_mel
    from .demo import cache_dir, write_tiny_whisper
    from .pretrained import load_whisper_encoder

    p = argparse.ArgumentParser(prog="qva-generate audio-info", description=audio_info.__doc__)
    p.add_argument("file", nargs="?", help="audio file (default: a synthetic 4 s clip)")
    p.add_argument("--whisper", help="Whisper checkpoint folder (default: a tiny random-weight demo encoder)")
    args = p.parse_args(argv)
    try:
        if args.whisper is None:
            folder = cache_dir() / "demo-whisper"
            if not (folder / "model.safetensors").is_file():
                write_tiny_whisper(folder)
            print(f"note: no --whisper given, using a tiny RANDOM-weight encoder from {folder}")
            args.whisper = folder
        t0 = time.perf_counter()
        encoder = load_whisper_encoder(args.whisper)
        t_load = time.perf_counter() - t0
        if args.file:
            wave = load_audio(args.file)
        else:
            t = torch.arange(4 * SAMPLE_RATE) / SAMPLE_RATE
            wave = 0.3 * torch.sin(2 * math.pi * 220 * t * (1 + t / 4)) * (1 + torch.sin(2 * math.pi * 3 * t)) / 2
        t0 = time.perf_counter()
        features, valid = log_mel(wave, encoder.config.num_mel_bins)
        t_mel = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.inference_mode():
            states = encoder(features)
        t_enc = time.perf_counter() - t0
    except (AudioError, CheckpointError, ValueError, OSError) as e:
        print(f"qva-generate audio-info: error: {e}", file=sys.stderr)
        return 2
    print(f"audio: {wave.shape[0] / SAMPLE_RATE:.2f} s → features {tuple(features.shape)}, valid frames {valid.tolist()}")
    print(f"encoder states: {tuple(states.shape)}")
    print(f"load {t_load:.2f} s, log-mel {t_mel * 1e3:.1f} ms, encoder {t_enc:.2f} s")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["audio-info"]:
        return audio_info(argv[1:])
    return one_line_errors("qva-generate", run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
