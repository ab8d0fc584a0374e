"""The run folder (`--out`): claimed before anything trains, written so that nothing the user owns is lost.

    claim(cfg)          refuses a folder that is not new, empty or a qva run; takes the run's lock (a second
                        trainer into the same folder is refused); repairs an interrupted output write;
                        a previous run is continued (`resume`: each setting that differs from its record
                        named, those that change the result refused unless allowed), started again
                        (`overwrite`: its checkpoints, metrics and output removed, other files kept), or
                        refused; records the settings and the training data's checksum
    write_output(...)   the trained model, loadable by `qva.load(run)`: the whole folder exchanged in one
                        step with the run's own files (settings, metrics, checkpoints) and the user's carried

A run folder's marker (`.qva.json`, kind "run") lists qva's entries in it; anything else in it is the
user's and stays. The lock is an advisory `flock` on `.qva-lock`, freed by the kernel when the process
ends, so a killed run leaves no stale lock.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from pathlib import Path

from weights_loader.writer import MARKER, WriteError, atomic_file, atomic_folder, check_target, kind_of, read_marker, recover, write_marker

from ..adapters import write_adapter_files
from ..pretrained import write_model_files
from .checkpoints import file_sha256, is_checkpoint, step_folders
from .config import TrainConfig, TrainError, resume_changes

try:
    import fcntl
except ImportError:  # no advisory locks on this platform: a second trainer is not detected
    fcntl = None

LOCK = ".qva-lock"
RUN_FILES = ("train_config.json", "metrics.jsonl", "checkpoints", "tensorboard", LOCK)  # the run's own, kept across outputs


def data_fingerprint(data: str) -> str | None:
    """What identifies the training data: a file's SHA-256; for a folder or glob of shards, the SHA-256 of each
    shard's name, size and modification time (the shards themselves may be large)."""
    path = Path(data)
    if path.is_file():
        return file_sha256(path)
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else map(Path, glob.glob(data))) if p.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def recorded_config(run: Path) -> TrainConfig | None:
    try:
        return TrainConfig.from_json((run / "train_config.json").read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def is_run(path: Path) -> bool:
    """A folder qva-train made (its marker; or, made before markers, a readable `train_config.json`)."""
    return kind_of(path) == "run" or (kind_of(path) is None and path.is_dir() and recorded_config(path) is not None)


class Claim:
    """The lock on a run folder, held while training; `release` (or the process ending) frees it."""

    def __init__(self, path: Path, fd: int | None, resumable: bool, notes: list[str]):
        self.path, self.fd, self.resumable, self.notes = path, fd, resumable, notes

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _lock(path: Path) -> int | None:
    if fcntl is None:
        return None
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise TrainError(f"{path}: another qva-train is writing this run ({holder}); wait for it to end or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
    return fd


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def claim(cfg: TrainConfig, log=print) -> Claim:
    """Make `cfg.out` this run's folder (see the module's docstring), or a `TrainError` saying why not."""
    path = Path(os.path.abspath(cfg.out))
    for name in ("model", "whisper"):
        other = getattr(cfg, name)
        if other and _inside(Path(os.path.abspath(other)), path):
            raise TrainError(f"--out {path} would hold --{name} {other}, which this run reads: choose another --out")
    said = recover(path)
    if said:
        log(f"note: {said}")
    existing = path.is_dir() and not path.is_symlink() and bool(os.listdir(path))
    if existing and not is_run(path):
        try:
            check_target(path, "run")
        except WriteError as e:
            raise TrainError(f"--out {e}") from None
        raise TrainError(f"--out {path}: holds something qva-train did not make; choose a new or empty folder")
    if not existing:
        if cfg.resume:
            raise TrainError(f"--resume: {path} holds no run to resume; drop --resume to start one there")
        try:
            check_target(path, "run")
            path.mkdir(parents=True, exist_ok=True)
        except (WriteError, OSError) as e:
            raise TrainError(f"--out {e}") from None
        write_marker(path, "run", RUN_FILES)
    fd = _lock(path)
    notes: list[str] = []
    try:
        marker = read_marker(path) or {"files": list(RUN_FILES)}
        if kind_of(path) is None:  # a run made before markers: mark it and its checkpoints now
            for folder in [*step_folders(path), path / "checkpoints" / "best"]:
                if is_checkpoint(folder) and not (folder / MARKER).exists():
                    write_marker(folder, "checkpoint", os.listdir(folder))
            marker["files"] = sorted(set(os.listdir(path)) - {MARKER})
        previous = recorded_config(path)
        trained = bool(step_folders(path)) or (path / "checkpoints" / "best").exists() or \
            bool(set(marker.get("files", [])) - set(RUN_FILES))
        if existing and previous is not None and not trained and not cfg.resume:
            clear_run(path, marker)  # a run that stopped before its first checkpoint: nothing of it to keep
            marker = {"files": list(RUN_FILES)}
        elif existing and previous is not None:
            if cfg.resume:
                notes = check_resume(previous, cfg, marker)
            elif cfg.overwrite:
                clear_run(path, marker)
                marker = {"files": list(RUN_FILES)}
            else:
                done = max((int(p.name.split("-")[1]) for p in step_folders(path)), default=0)
                raise TrainError(f"--out {path}: holds a qva-train run (stage {previous.stage}, checkpoints to step {done}): "
                                 "--resume continues it, --overwrite starts again (its checkpoints, metrics and output are "
                                 "replaced; other files stay), or choose another --out")
        elif cfg.resume:
            notes = [f"--resume: {path} has no record of its settings (train_config.json); starting from step 0"]
        record = {"train_sha256": data_fingerprint(cfg.train_data)}
        write_marker(path, "run", set(marker.get("files", [])) | set(RUN_FILES), **record)
        atomic_file(path / "train_config.json", cfg.recorded().to_json())
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return Claim(path, fd, cfg.resume, notes)


def check_resume(previous: TrainConfig, cfg: TrainConfig, marker: dict) -> list[str]:
    """Notes on the settings that differ from the run's record; a `TrainError` for those that cannot be taken."""
    fixed, changing, other = resume_changes(previous, cfg)
    sha = marker.get("train_sha256")
    if sha and data_fingerprint(cfg.train_data) != sha and "train_data" not in cfg.allow_changes:
        changing.append(f"train_data: the content of {cfg.train_data} changed since the run started")
    if fixed:
        raise TrainError(f"--resume: {'; '.join(fixed)}: cannot change on resume (the checkpoints hold the run's shapes and "
                         "trainable set); start a new run with another --out")
    refused = [c for c in changing if c.split(" ", 1)[0].rstrip(":") not in cfg.allow_changes]
    if refused:
        names = ",".join(sorted({c.split(" ", 1)[0].rstrip(":") for c in refused}))
        raise TrainError(f"--resume: {'; '.join(refused)}: the run was trained with the recorded values; resume with them, "
                         f"or pass --allow-changes {names}")
    return [f"note: on resume, {c}" for c in changing + other]


def clear_run(path: Path, marker: dict) -> None:
    """`overwrite`: remove the previous run's qva entries (never the lock, the marker or the user's files)."""
    for name in marker.get("files", []):
        entry = path / name
        if name in (LOCK, MARKER) or not os.path.lexists(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def write_output(model, cfg: TrainConfig, run: Path, graft: dict | None) -> None:
    """The trained model into the run folder, loadable by `qva.load(run)`: a `qva.save` folder (stages 1
    and lm) or a PEFT-layout adapter beside the projector (stage 2; `graft` records a fresh graft)."""
    marker = read_marker(run) or {}
    extra = {k: v for k, v in marker.items() if k not in ("kind", "files")}
    try:
        with atomic_folder(run, "run", keep=RUN_FILES, marker=extra) as tmp:
            if cfg.stage == "2":
                write_adapter_files(model, tmp, cfg.model, graft=graft, at=run)
            else:
                write_model_files(model, tmp)
    except WriteError as e:
        raise TrainError(f"the output could not be written: {e}; the final checkpoint is intact: --resume writes it again") from None
