"""Helpers shared by the benchmark scripts: interleaved timing, fresh-process cold loads, the table."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def timed_pair(ref_fn, qva_fn, repeats: int) -> tuple[float, float]:
    """Median seconds of each, after a warm-up, the two calls interleaved so drift hits both alike."""
    ref_fn(), qva_fn()
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ref_fn, times[0]), (qva_fn, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def cold_run(imports: str, body: str, path: Path) -> dict:
    """Run `imports`, reset the RSS high-water mark, run `body` (which sets `result`), in a fresh process.

    Returns {"seconds": wall time from process start, "peak_rss_over_base": bytes, **result}.
    """
    script = textwrap.dedent(f"""
        import json, sys, time
        t_start = time.perf_counter()
        import torch
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        import peak_rss
        PATH = {str(path)!r}
        result = {{}}
    """) + textwrap.dedent(imports) + "\nbase = peak_rss.reset()\n" + textwrap.dedent(body) + textwrap.dedent("""
        print(json.dumps({"seconds": time.perf_counter() - t_start, "peak_rss_over_base": peak_rss.peak() - base, **result}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"cold run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cached_checkpoint(workdir: Path | None, name: str, write) -> Path:
    """`workdir/name`, written by `write(folder)` unless already there (random checkpoints are slow to make)."""
    import tempfile

    folder = (workdir or Path(tempfile.mkdtemp(prefix="qva-bench-"))) / name
    if not (folder / "config.json").is_file():
        print(f"writing random checkpoint {folder} ...", flush=True)
        write(folder)
    return folder


def print_table(rows: list[tuple[str, float, float]], unit: str = "s") -> None:
    """rows: (name, transformers seconds, qva seconds); speed-up = transformers / qva."""
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"| {'row':46s} | {'transformers':>12s} | {'qva':>10s} | {'speed-up':>8s} |")
    print(f"|{'-' * 48}|{'-' * 14}|{'-' * 12}|{'-' * 10}|")
    for name, t, q in rows:
        print(f"| {name:46s} | {t:10.3f} {unit} | {q:8.3f} {unit} | {t / q:7.2f}× |")


def rows_json(rows) -> list[dict]:
    return [{"row": n, "transformers_s": t, "qva_s": q, "speedup": t / q} for n, t, q in rows]
