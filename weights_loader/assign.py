"""Fill a module built on the `meta` device with tensors from a `Checkpoint`.

The module is constructed without memory (`with torch.device("meta"): model = Model(cfg)`), then each
parameter is replaced by the tensor read from disk, cast on the fly: no random initialisation that is
about to be overwritten, and no second copy of the weights.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .checkpoint import Checkpoint, CheckpointError


def expected_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name (the tensors a checkpoint must provide)."""
    return dict(module.state_dict(keep_vars=True))


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    old = getattr(owner, leaf)
    if isinstance(old, nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner._buffers[leaf] = value


def load_into(
    module: nn.Module,
    checkpoint: Checkpoint,
    *,
    prefix: str = "",
    rename: Callable[[str], str] | None = None,
    ignore: Callable[[str], bool] | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Assign every parameter/buffer of `module` from `checkpoint` and return the names that were loaded.

    A module tensor `n` is read from the checkpoint name `prefix + rename(n)`. Checkpoint tensors under
    `prefix` that no module tensor asks for are "unexpected" unless `ignore(name)` says so (e.g. a Whisper
    decoder when loading its encoder); their data is never read. `skip` lists module tensors the caller
    fills itself (tied weights). Floating parameters are cast to `dtype`; buffers (a quantized weight's codes and
    scales) and integer tensors keep the dtype they were stored in.

    Missing, unexpected and shape-mismatched tensors are reported together in one `CheckpointError`
    (with `strict=False`, only shape mismatches raise). `progress(done, total)` is called per tensor.
    """
    rename = rename or (lambda n: n)
    wanted = {n: t for n, t in expected_tensors(module).items() if n not in skip}
    source = {n: prefix + rename(n) for n in wanted}

    missing = [f"  {src}  (for {n}, shape {list(wanted[n].shape)})" for n, src in source.items() if src not in checkpoint]
    wanted_src = set(source.values())
    unexpected = [
        f"  {c}  (in {checkpoint.info(c).file.name})"
        for c in checkpoint.names(prefix)
        if c not in wanted_src and not (ignore and ignore(c))
    ]
    mismatched = [
        f"  {src}: checkpoint {list(checkpoint.info(src).shape)} in {checkpoint.info(src).file.name}, "
        f"model expects {list(wanted[n].shape)}"
        for n, src in source.items()
        if src in checkpoint and tuple(checkpoint.info(src).shape) != tuple(wanted[n].shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) with the wrong shape:\n" + "\n".join(mismatched))
    if strict and missing:
        problems.append(f"{len(missing)} missing tensor(s):\n" + "\n".join(missing))
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s):\n" + "\n".join(unexpected))
    if problems:
        raise CheckpointError(
            f"{checkpoint.path}: does not match {type(module).__name__}"
            + (f" (prefix {prefix!r})" if prefix else "") + ":\n" + "\n".join(problems)
        )

    loaded = []
    todo = [(n, src) for n, src in source.items() if src in checkpoint]
    buffers = {n for n, _ in module.named_buffers()}
    for n, src in todo:
        stored = checkpoint.info(src).dtype
        cast = dtype if (dtype is not None and stored.is_floating_point and n not in buffers) else None
        _set_tensor(module, n, checkpoint.read(src, dtype=cast, device=device))
        loaded.append(n)
        if progress is not None:
            progress(len(loaded), len(todo))
    return loaded


def assert_materialized(module: nn.Module, what: str) -> None:
    """Raise if any parameter or buffer is still on the meta device (nothing loaded or computed it)."""
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: tensors not loaded from the checkpoint: {', '.join(left[:10])}")
