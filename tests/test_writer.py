"""Writing without losing anything (`weights_loader/writer.py` and every qva writer built on it): an existing
target is refused unless it is qva's own output of the same kind, and then only qva's files are replaced;
folders are exchanged in one step; a kill between two renames is repaired; a full disk is one clear error."""

from __future__ import annotations

import copy
import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import train_config

import qva
import weights_loader.writer as W
from qva.adapters import save_adapter
from qva.linear import add_lora
from qva.train.cli import main as train_cli
from qva.train.loop import TrainError, train
from weights_loader import Checkpoint
from weights_loader.writer import WriteError, atomic_folder, kind_of, save_checkpoint


@pytest.fixture(scope="module")
def model(train_dirs):
    return qva.load(train_dirs[1], whisper=train_dirs[3])


@pytest.fixture(scope="module")
def lora_model(model):
    m = copy.deepcopy(model)
    for name, module in list(m.model.named_modules()):
        if name.endswith(("q_proj", "v_proj")):
            add_lora(module, 2, 4.0)
    return m


@pytest.fixture(scope="module")
def stage2_run(train_dirs, tmp_path_factory):
    """Stage 2 straight on a plain Qwen2-VL with --whisper (LoRA + projector on a fresh graft)."""
    cfg = train_config(train_dirs, tmp_path_factory.mktemp("w2"), "2", whisper=str(train_dirs[3]), steps=2)
    train(cfg, quiet=True)
    return Path(cfg.out)


def snapshot(path: Path) -> dict:
    """Every entry below `path` (links not followed) with its bytes: what must stay as it was."""
    if path.is_symlink() or path.is_file():
        return {".": os.readlink(path) if path.is_symlink() else path.read_bytes()}
    return {str(p.relative_to(path)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


# each writer: (what it writes, the call); kind names the marker it leaves
def write_save(model, lora_model, train_dirs, stage2_run, target, tmp_path, **kw):
    qva.save(model, target)


def write_adapter(model, lora_model, train_dirs, stage2_run, target, tmp_path, **kw):
    save_adapter(lora_model, target, base=train_dirs[1])


def write_run(model, lora_model, train_dirs, stage2_run, target, tmp_path, overwrite=False):
    train(train_config(train_dirs, tmp_path, "1", out=str(target), steps=1, overwrite=overwrite), quiet=True)


def write_merge(model, lora_model, train_dirs, stage2_run, target, tmp_path, **kw):
    code = train_cli(["merge", str(stage2_run), "--out", str(target)])
    if code != 0:
        raise WriteError("merge refused")


WRITERS = {"save": (write_save, "model"), "adapter": (write_adapter, "adapter"), "train": (write_run, "run"),
           "merge": (write_merge, "model")}
OTHER_KIND = {"model": "adapter", "adapter": "model", "run": "model"}


def make(target: Path, what: str, kind: str, args) -> None:
    if what == "empty":
        target.mkdir()
    elif what == "user files":
        (target / "thesis").mkdir(parents=True)
        (target / "thesis" / "ch1.tex").write_text("my thesis")
        (target / "data.csv").write_text("1,2\n")
    elif what == "a file":
        target.write_text("notes")
    elif what == "symlink":
        (target.parent / "real").mkdir()
        target.symlink_to(target.parent / "real")
    elif what in ("same kind", "other kind"):
        writer = next(w for w, k in WRITERS.values() if k == (kind if what == "same kind" else OTHER_KIND[kind]))
        writer(*args, target, target.parent)
        (target / "my-notes.txt").write_text("keep me")


@pytest.mark.parametrize("what", ["empty", "user files", "a file", "same kind", "other kind", "symlink"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_refuses_what_it_did_not_write(model, lora_model, train_dirs, stage2_run, tmp_path, writer, what, capsys):
    call, kind = WRITERS[writer]
    args = (model, lora_model, train_dirs, stage2_run)
    target = tmp_path / "target"
    make(target, what, kind, args)
    before = snapshot(target) if os.path.lexists(target) else None
    ok = what == "empty" or (what == "same kind" and writer != "train")
    if ok:
        call(*args, target, tmp_path)
        assert kind_of(target) == kind
        if what == "same kind":  # the user's file in a previous output stays
            assert (target / "my-notes.txt").read_text() == "keep me"
    else:
        with pytest.raises((WriteError, TrainError)) as e:
            call(*args, target, tmp_path)
        if writer != "merge":
            assert str(target) in str(e.value), e.value
        assert snapshot(target) == before  # nothing touched
    if writer == "train" and what == "same kind":  # a previous run is replaced only when asked
        call(*args, target, tmp_path, overwrite=True)
        assert (target / "my-notes.txt").read_text() == "keep me" and kind_of(target) == "run"
    leftovers = [p.name for p in tmp_path.iterdir() if ".qva-" in p.name]
    assert not leftovers, leftovers


def test_save_refusals_name_the_path_and_why(model, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(WriteError, match=r"f: is a file"):
        qva.save(model, tmp_path / "f")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    with pytest.raises(WriteError, match=r"d: already holds files qva did not write \(a\.txt\)"):
        qva.save(model, tmp_path / "d")
    qva.save(model, tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    qva.save(model, tmp_path / "m")  # a previous save: replaced, the user's file carried over
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine" and qva.load(tmp_path / "m") is not None


def test_a_new_file_never_takes_a_user_files_name(tmp_path):
    with atomic_folder(tmp_path / "o", "model") as tmp:
        (tmp / "a.bin").write_bytes(b"1")
    (tmp_path / "o" / "b.bin").write_text("user's")
    with pytest.raises(WriteError, match="qva did not write this file"):
        with atomic_folder(tmp_path / "o", "model") as tmp:
            (tmp / "b.bin").write_bytes(b"2")
    assert (tmp_path / "o" / "b.bin").read_text() == "user's" and (tmp_path / "o" / "a.bin").read_bytes() == b"1"


def test_a_kill_between_the_two_renames_is_repaired(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE, a kill after the first rename leaves the old folder aside; the next write
    (or a resume) renames it back: the user is never left without their folder."""
    save_checkpoint(tmp_path / "ck", {"a": torch.ones(2)})
    monkeypatch.setattr(W, "_exchange", lambda a, b: False)
    real, calls = W._rename, []

    def killed_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two renames
        real(src, dst)

    monkeypatch.setattr(W, "_rename", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", {"a": torch.zeros(2)})
    assert not (tmp_path / "ck").exists() and [p.name for p in tmp_path.iterdir()] == [calls[0].name]
    monkeypatch.setattr(W, "_rename", real)
    monkeypatch.setattr(W, "_alive", lambda pid: False)  # the killed process is gone
    assert "restored" in W.recover(tmp_path / "ck")
    with Checkpoint(tmp_path / "ck") as ck:
        assert torch.equal(ck.read("a"), torch.ones(2))  # the old, complete folder


def test_leftover_temporary_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    stale = tmp_path / f".ck.qva-tmp-{W._HOST}-999999999-abc"
    stale.mkdir()
    (stale / "part").write_bytes(b"x" * 10)
    user = tmp_path / ".ck.tmp-mine"  # not qva's form: never touched
    user.mkdir()
    save_checkpoint(tmp_path / "ck", {"a": torch.ones(2)})
    assert not stale.exists() and user.exists()


def test_full_disk_is_one_error_and_leaves_the_target_as_it_was(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ck", {"a": torch.ones(4)})
    before = snapshot(tmp_path / "ck")
    with pytest.raises(WriteError, match=r"ck: needs 4,000,000 bytes, the disk has 1,000 free; nothing was written"):
        monkeypatch.setattr(W, "free_bytes", lambda p: 1000)
        save_checkpoint(tmp_path / "ck", {"a": torch.ones(1_000_000)})
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(W, "save_file", full)
    with pytest.raises(WriteError, match=r"ck: the disk filled up after 0 bytes of the 8 needed .* nothing was replaced"):
        save_checkpoint(tmp_path / "ck", {"a": torch.zeros(2)})
    assert snapshot(tmp_path / "ck") == before and [p.name for p in tmp_path.iterdir()] == ["ck"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere): a real full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_disk(tiny_disk, monkeypatch):
    big = {"a": torch.ones(200_000), "b": torch.ones(200_000)}  # 1.6 MB on a 1 MiB disk
    with pytest.raises(WriteError, match=r"big: needs 1,600,000 bytes, the disk has [\d,]+ free; nothing was written"):
        save_checkpoint(tiny_disk / "big", big)
    monkeypatch.setattr(W, "check_space", lambda path, need: None)  # as if the free space had been misreported
    with pytest.raises(WriteError, match=r"big: the disk filled up after [\d,]+ bytes of the 1,600,000 needed"):
        save_checkpoint(tiny_disk / "big", big)
    assert list(tiny_disk.iterdir()) == []  # the partial temporary folder is gone
    save_checkpoint(tiny_disk / "small", {"a": torch.ones(1000)})
    assert kind_of(tiny_disk / "small") == "model"
