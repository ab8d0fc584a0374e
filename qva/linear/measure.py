"""Kernels chosen by measurement: `fastest(key, candidates)` times each candidate once per machine and remembers
the winner in `~/.cache/qva/kernels/<machine>.json` (keyed by CPU model, torch version, threads and the kernel
capability PyTorch dispatches to). `QVA_KERNEL=aten|linear|gemv|dequant` forces a candidate wherever it is
offered. Every place that picks a kernel (`policy`, `gemv`, `weight_only`) asks here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import threading
import time
from pathlib import Path

import torch

from weights_loader.writer import WriteError, atomic_file

# -- kernels chosen by measurement --------------------------------------------------------------------------------
KERNEL_OVERRIDE = "QVA_KERNEL"  # a candidate's name forces it wherever it is offered: aten, dequant, gemv, linear


_choices: dict[str, str] | None = None


_choices_lock = threading.Lock()


def kernel_cache_file():
    """`~/.cache/qva/kernels/<cpu>-torch<version>-t<threads>.json` (or under `QVA_CACHE`): choices per machine."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    caps = f"{torch.backends.cpu.get_cpu_capability()}|{os.environ.get('ONEDNN_MAX_CPU_ISA', '')}"  # kernels a cap leaves
    tag = hashlib.sha1(f"{model}|{torch.__version__}|{torch.get_num_threads()}|{caps}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("QVA_CACHE", Path.home() / ".cache" / "qva"))
    return root / "kernels" / f"{tag}.json"


def _load_choices() -> dict[str, str]:
    global _choices
    if _choices is None:
        try:
            _choices = json.loads(kernel_cache_file().read_text())
        except (OSError, ValueError):
            _choices = {}
    return _choices


def _store_choices() -> None:
    path = kernel_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_file(path, json.dumps(_choices, indent=1, sort_keys=True))  # a reader sees the old file or the new one
    except (OSError, WriteError):
        pass  # a read-only home or a full disk: choices are then measured once per process


def fastest(key: str, candidates: dict, repeats: int = 3) -> str:
    """The name of the fastest of `candidates` (name → a zero-argument call) for `key`: the override, a choice
    cached for this machine, or measured now (best of `repeats` after a warm-up) and cached."""
    forced = os.environ.get(KERNEL_OVERRIDE)
    if forced in candidates:
        return forced
    known = _choices.get(key) if _choices is not None else None  # the common case: decided before, no lock
    if known in candidates:
        return known
    with _choices_lock:
        choices = _load_choices()
        if choices.get(key) in candidates:
            return choices[key]
        times = {}
        for name, call in candidates.items():
            try:
                call()
            except (RuntimeError, NotImplementedError):  # a kernel this build or device lacks
                if name == list(candidates)[-1] and not times:
                    raise
                continue
            best = math.inf
            for _ in range(repeats):
                t = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - t)
            times[name] = best
        choices[key] = min(times, key=times.get)
        _store_choices()
        return choices[key]


def known_choice(key: str) -> str | None:
    """The override or the choice this process has already made or read for `key`, else None; never measures nor
    reads a file (a compiled step reads it while tracing)."""
    return os.environ.get(KERNEL_OVERRIDE) or (_choices.get(key) if _choices is not None else None)


def rows_bucket(rows: int) -> str:
    """Row counts that share a kernel choice: 1, 2–4, 5–16, 17–64, 65–256, more."""
    for top in (1, 4, 16, 64, 256):
        if rows <= top:
            return str(top)
    return "many"
