"""Helpers shared by the benchmark scripts: interleaved timing, fresh-process cold loads, the table."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


class Timing(float):
    """A median of seconds (usable as a float) that also carries the min and max of its runs."""

    def __new__(cls, runs: list[float]):
        t = super().__new__(cls, statistics.median(runs))
        t.min, t.max, t.runs = min(runs), max(runs), len(runs)
        return t

    def spread(self) -> str:
        return f"{float(self):.3f} [{self.min:.3f}–{self.max:.3f}]"


def timed_pair(ref_fn, qva_fn, repeats: int) -> tuple[Timing, Timing]:
    """Median (and min–max) seconds of each, after a warm-up, the two calls interleaved so drift hits both alike."""
    ref_fn(), qva_fn()
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ref_fn, times[0]), (qva_fn, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return Timing(times[0]), Timing(times[1])


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")


def cpu_header() -> str:
    """The CPU model, threads, and the flags that decide bf16/int8 speed (native bf16: AVX512-BF16 or AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"cpu: {platform.processor() or platform.machine()}; torch {torch.__version__}"
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    import os

    capped = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("ATEN_CPU_CAPABILITY")
    return (f"cpu: {model}, {torch.get_num_threads()} threads; " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS)
            + f"; torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}"
            + (f" (capped: ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')}, "
               f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')})" if capped else ""))


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
    print(f"\n{cpu_header()}")
    print(f"| {'row':46s} | {'transformers':>26s} | {'qva':>26s} | {'speed-up':>8s} |")
    print(f"|{'-' * 48}|{'-' * 28}|{'-' * 28}|{'-' * 10}|")
    for name, t, q in rows:
        cells = [x.spread() if isinstance(x, Timing) else f"{x:.3f}" for x in (t, q)]
        print(f"| {name:46s} | {cells[0]:>24s} {unit} | {cells[1]:>24s} {unit} | {t / q:7.2f}× |")


def rows_json(rows) -> list[dict]:
    def spread(x):
        return {"min": x.min, "max": x.max, "runs": x.runs} if isinstance(x, Timing) else {}

    return [{"row": n, "transformers_s": float(t), "qva_s": float(q), "speedup": t / q,
             "transformers_spread": spread(t), "qva_spread": spread(q)} for n, t, q in rows]


def run_threads(target, n: int) -> float:
    """Run `target` in n threads at once; the wall seconds until the last one ends."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0
