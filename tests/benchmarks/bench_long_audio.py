"""Long audio through the turbo-shaped Whisper encoder: time and peak memory against the clip's length.

    python tests/benchmarks/bench_long_audio.py [--layers 4] [--minutes 1,5,20] [--modes windows,batched] [--workdir DIR]

A random large-v3-turbo-shaped encoder (`bench_audio.write_turbo`, fp16 checkpoint loaded as fp32) encodes
speech-like clips of each length, in a fresh process per (length, mode), in two ways:

    windows   one 30 s window at a time (log-mel of the window, encoder, its kept rows copied into one buffer): what the
              transcription endpoint does (a job per window), and what any caller can do with `qva.log_mel`
    batched   every window in one encoder call: what `QVAModel.audio_encoder_rows` does for a chat request's clip

Peak RSS is measured over the process after the encoder is loaded and the clip synthesised (`peak_rss`), and
split into what the clip needs anyway (its kept rows, 1280 floats per 20 ms) and the rest (activations, features):
the rest must not grow with the clip's length in `windows` mode. The full turbo encoder has 32 layers; time per
window scales with layers, so `--layers` trades depth for a run of minutes on a small CPU (the per-window time at
full depth is printed from one 32-layer window when `--full-depth-window` is given). Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_audio import cached_turbo  # noqa: E402
from common import cpu_header  # noqa: E402

MiB = 2**20


def speechlike(seconds: float) -> torch.Tensor:
    """A tone gliding around 180 Hz with a little noise: the encoder's cost does not depend on what is said."""
    t = torch.arange(int(seconds * 16000)) / 16000
    g = torch.Generator().manual_seed(0)
    return (0.3 * torch.sin(2 * torch.pi * 180 * t * (1 + 0.3 * torch.sin(3 * t))) + 0.05 * torch.randn(t.shape, generator=g)).float()


def child(args) -> dict:
    """One (length, mode) run in this process; returns its figures."""
    import peak_rss

    from qva.audio import N_SAMPLES, audio_token_count, clip_tokens, log_mel
    from qva.pretrained import load_whisper_encoder

    encoder = load_whisper_encoder(cached_turbo(args.workdir, args.layers), dtype=torch.float32)
    wave = speechlike(args.minutes * 60)
    base = peak_rss.reset()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if args.mode == "windows":  # the kept rows are written into one buffer as each window is encoded
            rows, at = None, 0
            for start in range(0, wave.shape[0], N_SAMPLES):
                feats, valid = log_mel(wave[start : start + N_SAMPLES], 128)  # [1, 128, 3000]
                states = encoder(feats)  # [1, 1500, d]
                if rows is None:
                    rows = states.new_empty(clip_tokens(wave.shape[0]), states.shape[-1])  # [Σ tokens, d]
                n = audio_token_count(int(valid[0]))
                rows[at : at + n] = states[0, :n]
                at += n
                del states
        else:
            feats, valid = log_mel(wave, 128)  # [W, 128, 3000]
            states = encoder(feats)  # [W, 1500, d]
            rows = torch.cat([states[w, : audio_token_count(int(v))] for w, v in enumerate(valid)])
            del states
    seconds = time.perf_counter() - t0
    peak = peak_rss.peak() - base
    return {"minutes": args.minutes, "mode": args.mode, "seconds": seconds, "windows": -(-wave.shape[0] // N_SAMPLES),
            "rows": rows.shape[0], "rows_bytes": rows.numel() * rows.element_size(), "peak_over_base": peak, "d_model": rows.shape[1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="encoder layers (turbo: 32)")
    p.add_argument("--minutes", default="1,5,20", help="clip lengths, comma-separated")
    p.add_argument("--modes", default="windows,batched")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qva-bench"))
    p.add_argument("--full-depth-window", action="store_true", help="also time one window through all 32 layers")
    p.add_argument("--json", type=Path, default=Path("bench_results_long_audio.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="windows", help=argparse.SUPPRESS)
    p.add_argument("--minute", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.minutes = args.minute
        print(json.dumps(child(args)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    cached_turbo(args.workdir, args.layers)  # written once, outside the timed children
    runs = []
    for minutes in [float(m) for m in args.minutes.split(",")]:
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--minute", str(minutes), "--layers", str(args.layers),
                   "--workdir", str(args.workdir)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[-1]
            print(f"{minutes:5g} min {mode:8s}: {r['seconds']:7.1f} s, peak +{r['peak_over_base'] / MiB:7.0f} MiB"
                  f" = rows {r['rows_bytes'] / MiB:6.0f} MiB + rest {(r['peak_over_base'] - r['rows_bytes']) / MiB:6.0f} MiB", flush=True)
    full = None
    if args.full_depth_window:
        from qva.audio import log_mel
        from qva.pretrained import load_whisper_encoder

        enc = load_whisper_encoder(cached_turbo(args.workdir, 32), dtype=torch.float32)
        feats, _ = log_mel(torch.randn(480_000) * 0.1, 128)
        with torch.inference_mode():
            enc(feats)
            t0 = time.perf_counter()
            enc(feats)
            full = time.perf_counter() - t0
        print(f"one window through all 32 layers: {full:.1f} s")
    print(f"\n{cpu_header()}; encoder layers {args.layers} of turbo's 32 (random weights, fp32)")
    print("| clip | mode | windows | time | s / window | peak RSS over base | kept rows | rest (peak − rows) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['minutes']:g} min | {r['mode']} | {r['windows']} | {r['seconds']:.1f} s | {r['seconds'] / r['windows']:.2f} |"
              f" {r['peak_over_base'] / MiB:.0f} MiB | {r['rows_bytes'] / MiB:.0f} MiB | {(r['peak_over_base'] - r['rows_bytes']) / MiB:.0f} MiB |")
    args.json.write_text(json.dumps({"layers": args.layers, "runs": runs, "full_depth_window_s": full, "cpu": cpu_header()}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
