"""Training checkpoints: `RUN/checkpoints/step-N/` (and `best/`), written atomically, checked before use.

A checkpoint holds the trainable weights (`trainable.safetensors`), the optimizer state keyed by parameter
name and every rank's RNG state (`optimizer.safetensors`), the step, data position and best dev score
(`state.json`), and last a manifest of the files' SHA-256 (`manifest.json`). It is *intact* when every file
matches its manifest and every tensor is finite; anything else is named and skipped on resume. A write
that fails (a full disk) leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from weights_loader.writer import WriteError, atomic_folder, kind_of

from . import dist as D
from .config import TrainError


def save_checkpoint(folder: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.AdamW, state: dict, d: D.Dist = D.Dist()) -> None:
    """Atomically: trainable weights, optimizer state keyed by parameter name, RNG, step and data position,
    then a manifest of the files' SHA-256. Every rank calls it (sharded tensors are gathered); rank 0
    writes. A failed write is a `TrainError` naming the folder and the last intact checkpoint."""
    weights = {n: D.full(p.detach()).cpu().contiguous() for n, p in params.items()}
    names = {id(p): n for n, p in params.items()}
    rngs = D.gather_rng(d)
    opt_tensors = {"__rng__.torch": rngs[0], **{f"__rng__.torch.rank{r}": t for r, t in enumerate(rngs) if r}}
    for p, s in opt.state.items():
        for key, value in s.items():
            value = D.full(value.detach()).cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
            opt_tensors[f"{names[id(p)]}::{key}"] = value
    failed = None
    if d.main:
        need = sum(t.numel() * t.element_size() for t in (*weights.values(), *opt_tensors.values()))
        try:
            with atomic_folder(folder, "checkpoint", need=need) as tmp:
                save_file(weights, str(tmp / "trainable.safetensors"))
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
                (tmp / "state.json").write_text(json.dumps(state, indent=2))
                digests = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
                (tmp / "manifest.json").write_text(json.dumps(digests, indent=2))
        except WriteError as e:
            failed = str(e)
    if D.all_sum(float(failed is not None), d):  # every rank stops together
        last = latest_intact(folder.parent.parent, lambda _: None)
        raise TrainError(f"step {state['step']}: could not write the checkpoint: {failed or 'rank 0 failed to write it'}; "
                         f"the last intact checkpoint is {last or 'none'} (free space, then --resume)")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be used (checksums, unreadable or non-finite tensors), or None."""
    try:
        digests = json.loads((folder / "manifest.json").read_text())
        if not digests or any(file_sha256(folder / name) != d for name, d in digests.items()):
            return "is corrupted or incomplete (checksums do not match)"
        for name in ("trainable.safetensors", "optimizer.safetensors"):
            bad = [k for k, t in load_file(str(folder / name)).items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            if bad:
                return f"holds non-finite values ({name}: {bad[:3]})"
    except (OSError, ValueError, SafetensorError):
        return "is corrupted or incomplete (checksums do not match)"
    return None


def intact(folder: Path) -> bool:
    return problem(folder) is None


def is_checkpoint(folder: Path) -> bool:
    """A folder qva wrote as a checkpoint (its marker; or, written before markers, its manifest and weights)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    return kind_of(folder) == "checkpoint" or ((folder / "manifest.json").is_file() and (folder / "trainable.safetensors").is_file())


def step_folders(run: Path) -> list[Path]:
    """The run's step checkpoints, oldest first (only folders qva wrote as checkpoints)."""
    return sorted(p for p in (run / "checkpoints").glob("step-*") if is_checkpoint(p))


def latest_intact(run: Path, log) -> Path | None:
    """The newest step checkpoint that is intact; unusable ones are named and skipped."""
    for folder in reversed(step_folders(run)):
        why = problem(folder)
        if why is None:
            return folder
        log(f"warning: {folder} {why}; using an earlier checkpoint")
    return None


def load_checkpoint(folder: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.AdamW | None, rank: int = 0) -> dict:
    weights = load_file(str(folder / "trainable.safetensors"))
    if set(weights) != set(params):
        raise TrainError(f"{folder}: holds {sorted(set(weights) ^ set(params))[:5]} ≠ this run's trainable set")
    for n, p in params.items():
        if tuple(weights[n].shape) != tuple(p.shape):
            raise TrainError(f"{folder}: {n} has shape {list(weights[n].shape)}, this run's is {list(p.shape)}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(D.like(weights[n], p))
    if opt is not None:
        tensors = load_file(str(folder / "optimizer.safetensors"))
        rng = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("__rng__.")]}
        torch.set_rng_state(rng.get(f"__rng__.torch.rank{rank}", rng["__rng__.torch"]) if rank else rng["__rng__.torch"])
        for key, value in tensors.items():
            name, slot = key.split("::")
            p = params[name]
            opt.state[p][slot] = D.like(value, p) if value.shape == p.shape else value
    return json.loads((folder / "state.json").read_text())


def prune(run: Path, keep: int) -> None:
    """Remove all but the newest `keep` step checkpoints (qva's own folders only)."""
    for old in step_folders(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
