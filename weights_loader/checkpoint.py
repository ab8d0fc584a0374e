"""A safetensors checkpoint folder, opened lazily.

`Checkpoint(path)` reads only the JSON headers: tensor names, shapes, dtypes and which file holds each.
Data is read on request, one tensor at a time, through a memory map of its file; the mapped pages are
released after each copy so that loading B bytes costs B bytes of resident memory, not 2B.

Headers are validated before any data is touched, so a truncated, corrupt or non-safetensors file
gives a `CheckpointError` naming the file rather than an error from deep inside a C extension.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    SAFETENSORS_DTYPES.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format caps headers at 100 MB


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: its file, stored dtype, shape, and byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one .safetensors header; no tensor data is read."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{file}: not a safetensors file, or truncated (header length field says {n} bytes, "
                f"file has {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not a safetensors file (header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")

    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed or unsupported header entry {entry!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        expected = numel * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{file}: tensor {name!r} header is inconsistent: {entry['dtype']}{list(shape)} needs "
                f"{expected} bytes, offsets give {end - begin}"
            )
        if base + end > size:
            raise CheckpointError(
                f"{file}: truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes"
            )
        infos[name] = TensorInfo(file, dtype, shape, base + begin, base + end)
    _check_tiling(file, {n: (i.start - base, i.end - base) for n, i in infos.items()}, size - base)
    return infos


def _check_tiling(file: Path, ranges: dict[str, tuple[int, int]], data_size: int) -> None:
    """The tensors' byte ranges must tile the data region, as the safetensors format requires: sorted by
    offset they start at 0, each begins where the previous one ends, and the last ends at the file's end.

    Right lengths alone do not catch a shifted or aliased header (every tensor at offset 0, or all moved
    by 4 bytes): such a file would load without error and compute on the wrong bytes.
    """
    at, previous = 0, None
    for name, (begin, end) in sorted(ranges.items(), key=lambda kv: kv[1]):
        if begin != at:
            where = f"where {previous!r} ends" if previous is not None else "where the data region starts"
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes"
            raise CheckpointError(
                f"{file}: corrupt header: tensor {name!r} begins at data byte {begin}, not at byte {at} {where}: "
                f"it {what} (safetensors byte ranges must tile the data region)"
            )
        at, previous = end, name
    if at != data_size:
        raise CheckpointError(
            f"{file}: corrupt header: the tensors cover {at} data bytes but the file holds {data_size} after its header"
            " (safetensors byte ranges must tile the data region)"
        )


def read_config(folder: str | os.PathLike, what: str) -> dict:
    """`folder/config.json` as a dict; a missing or invalid file is a `CheckpointError` naming it."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder}: no config.json (is this a {what} checkpoint folder?)")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return cfg


def _refuse_pickle(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle checkpoints found ({', '.join(pickles[:3])}); qva refuses them because "
            "unpickling can run arbitrary code. Convert once with transformers: "
            "`Model.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)`, "
            "or `safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`."
        )


class Checkpoint:
    """Lazy view of a safetensors checkpoint: a folder (single file or sharded index) or one file.

    `checkpoint.reads` records the names of every tensor whose data was read, so tests can prove
    that unneeded parts (e.g. a Whisper decoder) never leave the disk.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        self.path = path
        if path.is_file():
            if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
                _refuse_pickle(path.parent)
            files = [path]
        elif (path / INDEX_NAME).is_file():
            files = self._files_from_index(path / INDEX_NAME)
        elif (path / SINGLE_NAME).is_file():
            files = [path / SINGLE_NAME]
        else:
            found = sorted(path.glob("*.safetensors"))
            if not found:
                _refuse_pickle(path)
                raise CheckpointError(
                    f"{path}: not a checkpoint folder (no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors)"
                )
            files = found
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {name!r} also stored in {self.tensors[name].file}")
                self.tensors[name] = info
        self._maps: dict[Path, tuple[object, mmap.mmap]] = {}
        self.reads: list[str] = []

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (index.parent / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}")
        self._index_map = weight_map
        return [index.parent / s for s in shards]

    def rename(self, to_module: Callable[[str], str]) -> "Checkpoint":
        """List every tensor under the name `to_module(stored name)` from now on (a family whose files name
        tensors other than the module tree does: Qwen3-VL's `model.language_model.*`). Returns self."""
        renamed: dict[str, TensorInfo] = {}
        for name, info in self.tensors.items():
            new = to_module(name)
            if new in renamed:
                raise CheckpointError(f"{self.path}: tensors {name!r} and another both read as {new!r}")
            renamed[new] = info
        self.tensors = renamed
        return self

    # -- listing, no data read --------------------------------------------------------------------
    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.tensors if n.startswith(prefix)]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    # -- reading ----------------------------------------------------------------------------------
    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            f = open(file, "rb")
            self._maps[file] = (f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        return self._maps[file][1]

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor as an owned copy, cast to `dtype` and moved to `device` (defaults: stored, CPU); with
        `out` (a CPU tensor of the stored shape), written into it instead (its dtype is the target)."""
        info = self.info(name)
        m = self._map(info.file)
        if out is None:
            out = torch.empty(info.shape, dtype=dtype or info.dtype)
        elif tuple(out.shape) != tuple(info.shape) or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"{name}: out must be a contiguous CPU tensor of shape {list(info.shape)}, got {list(out.shape)} "
                             f"on {out.device}")
        if info.nbytes:
            size = info.dtype.itemsize
            numel = info.nbytes // size
            with warnings.catch_warnings():  # read-only map: fine, data is copied out before anyone sees it
                warnings.simplefilter("ignore", UserWarning)
                src = torch.frombuffer(m, dtype=info.dtype, count=numel, offset=info.start)
            dst = out.view(-1)
            step = max(1, _CHUNK_BYTES // size)
            for i in range(0, numel, step):  # copy (and cast) in chunks, releasing mapped pages as we go,
                j = min(numel, i + step)  # so the transient cost is one chunk, not one whole tensor
                dst[i:j].copy_(src[i:j])
                _release(m, info.start + i * size, info.start + j * size)
            del src
        self.reads.append(name)
        if device is not None:
            out = out.to(device)
        return out

    def items(self, names: Iterable[str], dtype=None, device=None) -> Iterator[tuple[str, torch.Tensor]]:
        for n in names:
            yield n, self.read(n, dtype, device)

    def read_prefix(self, prefix: str, dtype=None, device=None, strip: bool = True) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with `prefix`, keyed without the prefix if `strip`."""
        return {(n[len(prefix):] if strip else n): t for n, t in self.items(self.names(prefix), dtype, device)}

    def close(self) -> None:
        for f, m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a caller still holds a view; the map goes with the last reference
                pass
            f.close()
        self._maps.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors, {self.nbytes / 1e6:.1f} MB)"


_PAGE = mmap.PAGESIZE
_CHUNK_BYTES = 16 * 1024 * 1024


def _release(m: mmap.mmap, start: int, end: int) -> None:
    """Drop the mapped pages of [start, end) from this process's resident set (page cache keeps them)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    lo = start - start % _PAGE
    hi = min(len(m), end + (-end) % _PAGE)
    if hi > lo:
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
