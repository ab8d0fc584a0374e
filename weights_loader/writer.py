"""Write folders and files atomically, and never over anything the user owns.

Every qva writer goes through here (`qva.save`, adapters, training runs and their checkpoints, `qva-train
merge`, caches). The rules:

- A target that does not exist, or is an empty folder, is written: everything goes into a temporary
  sibling `.NAME.qva-tmp-HOST-PID-XXXX` (qva's own), which becomes NAME only when complete.
- A folder that holds anything else is refused with a `WriteError` naming it, unless it carries qva's
  marker `.qva.json` with the same `kind` (a previous output of the same kind). Then only the files the
  marker lists as qva's are replaced: every other entry (the user's) is carried into the new folder by
  hard link, and a new file that would take a user file's name is refused.
- A file or a symbolic link in the target's place is refused.
- The old and the new folder are exchanged in one step (Linux `renameat2(RENAME_EXCHANGE)`). Where the
  filesystem cannot, two renames are used; a kill between them leaves the old folder as
  `.NAME.qva-old-HOST-PID`, which the next write (or `recover`) renames back.
- Temporary and old folders that dead qva processes of this host left beside the target are removed
  (qva made them).
- A full disk is a `WriteError` naming the path and the bytes; the temporary folder is removed and the
  target is as it was.

    with atomic_folder("out", kind="model") as tmp:   # write into tmp; on success it becomes "out"
        ...
    save_checkpoint("out", tensors, config)           # safetensors (sharded if large) + config.json
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_NAME, SINGLE_NAME

MARKER = ".qva.json"  # {"kind": ..., "files": [the entries qva wrote]}
KINDS = {"model": "a saved qva model", "adapter": "a LoRA adapter", "run": "a qva-train run", "checkpoint": "a training checkpoint"}
_HOST = socket.gethostname().split(".")[0].replace("-", "_") or "host"
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WriteError(RuntimeError):
    """A write qva refuses or could not finish: the message names the path and why; nothing was replaced."""


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of a folder qva wrote, or None (no marker, or not qva's form)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("kind") not in KINDS or not isinstance(marker.get("files", []), list):
        return None
    return marker


def kind_of(folder: str | os.PathLike) -> str | None:
    marker = read_marker(folder)
    return None if marker is None else marker["kind"]


def write_marker(folder: str | os.PathLike, kind: str, files, **extra) -> None:
    """Write (atomically) the marker that makes `folder` recognisably qva's `kind`, listing qva's entries."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    atomic_file(Path(folder) / MARKER, json.dumps({"kind": kind, "files": sorted(set(files) - {MARKER}), **extra}, indent=1))


def _entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def check_target(target: str | os.PathLike, kind: str) -> Path:
    """The absolute path `target`, if qva may write `kind` there (absent, empty, or a previous `kind`);
    else a `WriteError` naming it. A kill between the two renames of an earlier write is repaired first."""
    path = Path(os.path.abspath(target))
    recover(path)
    if path.is_symlink():
        raise WriteError(f"{path}: is a symbolic link; qva writes {KINDS[kind]} only into a real folder (give the folder "
                         "it points to, or a new path)")
    if not path.exists():
        return path
    if not path.is_dir():
        raise WriteError(f"{path}: is a file; qva writes {KINDS[kind]} only into a new or empty folder")
    entries = _entries(path)
    if not entries:
        return path
    found = kind_of(path)
    if found is None:
        shown = ", ".join(entries[:4]) + (f", … ({len(entries)} entries)" if len(entries) > 4 else "")
        raise WriteError(f"{path}: already holds files qva did not write ({shown}); choose a new or empty folder")
    if found != kind:
        raise WriteError(f"{path}: holds {KINDS[found]}, not {KINDS[kind]}; choose another folder")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path, what: str) -> list[tuple[Path, int]]:
    """qva's temporary ('tmp') or old ('old') folders beside `path` made on this host: (folder, pid)."""
    out = []
    prefix = f".{path.name}.qva-{what}-{_HOST}-"
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return out
    for p in siblings:
        if p.name.startswith(prefix) and not p.is_symlink():
            pid = p.name[len(prefix):].split("-")[0]
            if pid.isdigit():
                out.append((p, int(pid)))
    return out


def recover(path: str | os.PathLike) -> str | None:
    """Repair what a killed write left beside `path`: if `path` is missing but qva's old folder of it is there
    (killed between the two renames), rename it back; remove dead processes' temporary and old folders.
    Returns a sentence saying what was repaired, or None."""
    path = Path(os.path.abspath(path))
    said = None
    olds = [(p, pid) for p, pid in _leftovers(path, "old") if p.is_dir() and not _alive(pid) and read_marker(p) is not None]
    if olds and not os.path.lexists(path):
        newest = max(olds, key=lambda x: x[0].stat().st_mtime)[0]
        os.rename(newest, path)
        olds = [o for o in olds if o[0] != newest]
        said = f"{path}: restored from {newest.name} (an earlier write was interrupted between its two renames)"
    for leftover, pid in olds + [t for t in _leftovers(path, "tmp") if not _alive(t[1])]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with _quiet():
                leftover.unlink()
    return said


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _swap_in(tmp: Path, path: Path) -> None:
    """Make the complete folder `tmp` be `path`; the old `path` (qva's, checked) is removed afterwards."""
    if not path.exists() or not _entries(path):
        _rename(tmp, path)  # rename(2) replaces an empty folder, and fails if anything appeared meanwhile
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    old = path.with_name(f".{path.name}.qva-old-{_HOST}-{os.getpid()}")
    _rename(path, old)
    _rename(tmp, path)  # a kill before this line leaves `old`, which `recover` renames back
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _full_disk(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in _FULL
    text = str(e)
    return type(e).__name__ == "SafetensorError" and any(s in text for s in ("os error 28", "StorageFull", "No space", "os error 27"))


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def free_bytes(path: Path) -> int:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


def check_space(path: Path, need: int) -> None:
    """A `WriteError` before writing when the disk holding `path` has fewer than `need` bytes free."""
    free = free_bytes(path)
    if need and free < need:
        raise WriteError(f"{path}: needs {need:,} bytes, the disk has {free:,} free; nothing was written")


@contextmanager
def atomic_folder(target: str | os.PathLike, kind: str = "model", keep: tuple[str, ...] = (), need: int = 0,
                  marker: dict | None = None) -> Iterator[Path]:
    """Yield a temporary folder; when the block completes it becomes `target` (see the rules above).

    `kind` is what the folder holds; `keep`: entries of a previous `kind` folder that stay as qva's own
    (a run's metrics and checkpoints when its output is rewritten); `need`: bytes the write needs, checked
    against the free space first; `marker`: extra fields for the marker."""
    path = check_target(target, kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{path.parent}: cannot create the folder ({e.strerror or e})") from None
    check_space(path, need)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.qva-tmp-{_HOST}-{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise WriteError(f"{path.parent}: cannot write there ({e.strerror or e})") from None
    try:
        yield tmp
        own = set(_entries(tmp)) - {MARKER}
        old = read_marker(path) if path.is_dir() else None
        if old is not None:
            old_own = set(old.get("files", []))
            for name in _entries(path):
                if name == MARKER or (name in old_own and name not in keep):
                    continue
                if name in own:
                    if name not in old_own:
                        raise WriteError(f"{path / name}: qva did not write this file and would replace it; move it away first")
                    continue  # qva's own, written anew
                _link_or_copy(path / name, tmp / name)
                if name in old_own:
                    own.add(name)
        write_marker(tmp, kind, own, **(marker or {}))
        _fsync_tree(tmp)
        try:
            _swap_in(tmp, path)
        except OSError as e:
            raise WriteError(f"{path}: could not be put in place ({e.strerror or e}); it is as it was") from None
    except BaseException as e:
        written = _size(tmp) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if _full_disk(e):
            raise WriteError(f"{path}: the disk filled up after {written:,} bytes" + (f" of the {need:,} needed" if need else "")
                             + f" ({free_bytes(path.parent):,} bytes free); nothing was replaced") from None
        raise


def _fsync_tree(folder: Path) -> None:
    """Data and names on disk before the rename makes them visible (a power cut then leaves old or new)."""
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_file(path: str | os.PathLike, content: str | bytes | Callable[[Path], None]) -> Path:
    """Write one file of qva's own (a cache entry, a marker, a settings record) atomically: a temporary
    sibling, then a rename over it. Readers see the old content or the new, never a part. `content` is the
    text or bytes, or a writer `content(tmp_path)` that fills the temporary file (a tensor file too large
    to hold twice in memory)."""
    path = Path(path)
    if path.is_symlink() or path.is_dir():
        raise WriteError(f"{path}: is a {'symbolic link' if path.is_symlink() else 'folder'}; qva writes a file there only where nothing is")
    data = content.encode() if isinstance(content, str) else content
    recover(path)  # temporary files a killed writer of this path left
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.qva-tmp-{_HOST}-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(Path(tmp))  # through its own handle; the fsync below covers the file, whoever wrote it
            else:
                f.write(data)
                f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with _quiet():
            os.unlink(tmp)
        if _full_disk(e) and not callable(data):  # a writer's own error already names what failed
            raise WriteError(f"{path}: the disk is full ({len(data):,} bytes needed, {free_bytes(path.parent):,} free)") from None
        raise
    return path


@contextmanager
def _quiet():
    try:
        yield
    except OSError:
        pass


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


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_checkpoint_files(folder: Path, tensors: Mapping[str, torch.Tensor], config: dict | None = None,
                           extra_files: Mapping[str, str | bytes] | None = None, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Safetensors (sharded if large), `config.json` and extra files, into an existing (temporary) folder."""
    write_shards(folder, tensors, max_shard_bytes)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name, content in (extra_files or {}).items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def save_checkpoint(
    folder: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: dict | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Atomically write a checkpoint folder (kind "model"): safetensors (sharded if large), `config.json`, extra files."""
    with atomic_folder(folder, "model", need=tensor_bytes(tensors)) as tmp:
        write_checkpoint_files(tmp, tensors, config, extra_files, max_shard_bytes)
    return Path(os.path.abspath(folder))
