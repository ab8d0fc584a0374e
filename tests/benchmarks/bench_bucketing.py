"""Duration bucketing (`--bucket-by-length`): padding and training tokens/s with and without it. Not a test.

    python tests/benchmarks/bench_bucketing.py [--steps 30] [--repeats 2] [--workdir DIR]

Two sets: the spoken-digits training clips (1–4 s, real speech) and a mixed set of 96 synthetic speech-like clips of
1–30 s (uniform). Each run is stage 1 (the projector) on the digits recipe's small Qwen2-VL with Whisper tiny.en and
`--audio-pool 4` (Whisper rows computed once and cached before the timing, as in any run), batch 16, `--steps`
steps; bucketing off and on alternate, `--repeats` times. Reported: the padding fraction of the run's batches
(padded positions / all positions, from the seeded order the run uses) and tokens/s (real tokens, padding not
counted, from `metrics.jsonl`; median over repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import DATA, FULL, PROMPT, WHISPER, write_small_base  # noqa: E402

from qva.train.config import TrainConfig  # noqa: E402
from qva.train.data import encode_all, epoch_order, padding_fraction  # noqa: E402
from qva.train.formats import read_data  # noqa: E402
from qva.train.loop import train  # noqa: E402


def mixed_set(folder: Path, n: int = 96) -> Path:
    """n speech-like clips of 1–30 s (seeded), as a qva manifest."""
    import math

    import soundfile as sf

    path = folder / "mixed.jsonl"
    if path.is_file():
        return path
    (folder / "mixed").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        seconds = 1 + 29 * torch.rand(1, generator=g).item()
        t = torch.arange(int(seconds * 16000)) / 16000
        f0 = 120 + 100 * torch.rand(1, generator=g).item()
        wave = 0.3 * torch.sin(2 * math.pi * f0 * t * (1 + 0.3 * torch.sin(3 * t))) + 0.05 * torch.randn(t.shape, generator=g)
        sf.write(str(folder / "mixed" / f"{i}.wav"), wave.numpy(), 16000)
        lines.append(json.dumps({"audio": str(folder / "mixed" / f"{i}.wav"), "text": str(i)}))
    path.write_text("\n".join(lines))
    return path


def digits_set(folder: Path) -> Path:
    path = folder / "digits.jsonl"
    if not path.is_file():
        rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines() if line.strip()]
        path.write_text("\n".join(json.dumps({"audio": str(DATA / r["audio"]), "text": r["text"]}) for r in rows))
    return path


def run_once(base: Path, manifest: Path, out: Path, bucket: bool, steps: int, batch: int, cache: Path) -> float:
    cfg = TrainConfig(stage="1", model=str(base), whisper=str(WHISPER), train_data=str(manifest), out=str(out), steps=steps,
                      batch_size=batch, lr=1e-3, audio_pool=4, bucket_by_length=bucket, log_every=steps, rows_cache=str(cache),
                      prompt=PROMPT, overwrite=out.exists())
    train(cfg, quiet=True)
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rec if "tokens_per_s" in r][-1]["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qva-bench-bucketing"))
    p.add_argument("--json", type=Path, default=Path("bench_results_bucketing.json"))
    args = p.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if not (base / "config.json").is_file():
        write_small_base(base, FULL)
    import qva

    processor = qva.load(base, whisper=WHISPER, audio_pool=4).processor
    results = {}
    for name, manifest in (("spoken digits", digits_set(work)), ("mixed 1–30 s", mixed_set(work))):
        examples, _ = read_data(manifest, PROMPT)
        samples, _ = encode_all(examples, processor, 4096)
        lengths = [s.input_ids.shape[0] for s in samples]
        row = {"samples": len(samples), "tokens": [min(lengths), max(lengths)]}
        for bucket in (False, True):
            order = epoch_order(samples, 0, 0, args.batch if bucket else None)
            row[f"padding_{'on' if bucket else 'off'}"] = padding_fraction([lengths[i] for i in order], args.batch)
        run_once(base, manifest, work / "warm", False, 1, args.batch, work / "cache")  # Whisper rows cached before timing
        speeds = {False: [], True: []}
        for _ in range(args.repeats):
            for bucket in (False, True):
                speeds[bucket].append(run_once(base, manifest, work / f"run-{bucket}", bucket, args.steps, args.batch, work / "cache"))
        row["tok_s_off"], row["tok_s_on"] = statistics.median(speeds[False]), statistics.median(speeds[True])
        row["runs"] = {"off": speeds[False], "on": speeds[True]}
        results[name] = row
        print(f"{name}: {len(samples)} samples, {row['tokens'][0]}–{row['tokens'][1]} tokens; padding {row['padding_off']:.1%} → "
              f"{row['padding_on']:.1%} bucketed; tokens/s {row['tok_s_off']:,.0f} → {row['tok_s_on']:,.0f} "
              f"({row['tok_s_on'] / row['tok_s_off']:.2f}×)", flush=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
