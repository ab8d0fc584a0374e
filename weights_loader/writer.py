"""Write a Hugging Face-style safetensors checkpoint folder, atomically.

Everything is written into a temporary sibling folder which is renamed into place only when complete,
so a crash or a full disk never leaves a half-written checkpoint under the target name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_NAME, SINGLE_NAME


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target` (an existing one is swapped out)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shards(
    folder: str | os.PathLike, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int = 5 * 1024**3
) -> list[str]:
    """Write `tensors` as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards plus
    `model.safetensors.index.json` when larger than `max_shard_bytes`. Returns the file names."""
    folder = Path(folder)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_NAME, metadata={"format": "pt"})
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return names + [INDEX_NAME]


def save_checkpoint(
    folder: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: dict | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Atomically write a checkpoint folder: safetensors (sharded if large), `config.json`, extra files."""
    with atomic_folder(folder) as tmp:
        write_shards(tmp, tensors, max_shard_bytes)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return Path(folder)
