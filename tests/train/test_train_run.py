"""The run folder (`qva/train/run.py`, `checkpoints.py`, `stop.py`): claimed and locked, resumed only under the
settings it was trained with, never mixed with an earlier run, stopped cleanly by SIGTERM / SIGINT (one process
and torchrun), never saving a diverged update, and a stage-2 run on a plain base loadable, mergeable and movable."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import max_rel_err, train_config
from safetensors.torch import load_file, save_file

import qva
import qva.train.checkpoints as C
import qva.train.loop as loop
import weights_loader.writer as W
from qva.linear import lora_linears
from qva.train.cli import main as train_cli
from qva.train.loop import TrainError, train
from qva.train.run import claim
from weights_loader import CheckpointError

IDS = torch.tensor([[151644, 872, 198, 52, 53, 151645, 198, 151644, 77091, 198]])


def steps_saved(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def final_trainable(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]


# -- a previous run is continued, started again or refused ------------------------------------------------------
def test_a_fresh_run_into_a_previous_run_is_refused_and_overwrite_replaces_it_whole(train_dirs, tmp_path):
    old = train_config(train_dirs, tmp_path, "1", steps=6, save_every=1, keep_last=10)
    train(old, quiet=True)
    (Path(old.out) / "notes.md").write_text("mine")
    with pytest.raises(TrainError, match=r"holds a qva-train run \(stage 1, checkpoints to step 6\): --resume continues it, "
                                         r"--overwrite starts again"):
        train(replace(old, steps=2), quiet=True)
    assert steps_saved(Path(old.out))[-1] == "step-00000006"
    new = replace(old, steps=2, seed=1, overwrite=True)
    train(new, quiet=True)
    run = Path(old.out)
    assert steps_saved(run) == ["step-00000001", "step-00000002"]  # none of the old run's six
    assert len(losses(run)) == 2 and (run / "notes.md").read_text() == "mine"
    weights = final_trainable(run)
    train(replace(new, overwrite=False, resume=True), quiet=True)  # nothing left to do: the output is this run's
    out = qva.load(run)
    assert torch.equal(out.audio_projector.weight.float(), weights["audio_projector.weight"])


def test_a_second_trainer_into_the_same_folder_is_refused(train_dirs, tmp_path):
    cfg = train_config(train_dirs, tmp_path, "1", steps=1)
    train(cfg, quiet=True)
    held = claim(replace(cfg, resume=True), log=lambda _: None)  # another trainer holds the run
    try:
        with pytest.raises(TrainError, match=r"another qva-train is writing this run \(pid \d+"):
            train(replace(cfg, resume=True), quiet=True)
    finally:
        held.release()
    (Path(cfg.out) / ".qva-lock").write_text("pid 999999 on elsewhere")  # a stale lock file: no process holds it
    train(replace(cfg, resume=True, steps=2), quiet=True)
    assert steps_saved(Path(cfg.out))[-1] == "step-00000002"


def test_resume_names_every_changed_setting_and_refuses_those_it_cannot_honour(train_dirs, tmp_path, capsys):
    cfg = train_config(train_dirs, tmp_path, "2", whisper=str(train_dirs[3]), steps=2)
    train(cfg, quiet=True)
    again = replace(cfg, resume=True, steps=3)
    with pytest.raises(TrainError, match=r"lr 0\.01 → 0\.001; seed 0 → 4: the run was trained with the recorded values; "
                                         r"resume with them, or pass --allow-changes lr,seed"):
        train(replace(again, lr=1e-3, seed=4), quiet=True)
    with pytest.raises(TrainError, match=r"lora_rank 4 → 8: cannot change on resume"):
        train(replace(again, lora_rank=8, allow_changes=("lr",)), quiet=True)
    manifest = tmp_path / "changed.jsonl"
    manifest.write_text("")
    with pytest.raises(TrainError, match=r"train_data '.*' → '.*changed\.jsonl'"):
        train(replace(again, train_data=str(manifest)), quiet=True)
    train(replace(again, lr=1e-3, allow_changes=("lr",)))
    err = capsys.readouterr().err
    assert "note: on resume, lr 0.01 → 0.001" in err and "note: on resume, steps 2 → 3" in err and "resumed from" in err
    with pytest.raises(TrainError, match=r"--resume: .*nothing-here holds no run to resume; drop --resume"):
        train(replace(cfg, out=str(tmp_path / "nothing-here"), resume=True), quiet=True)


def test_a_changed_data_file_is_refused_on_resume(train_dirs, tmp_path):
    manifest = tmp_path / "train.jsonl"
    lines = [json.loads(line) for line in Path(train_dirs[4]).read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**x, "audio": str(Path(train_dirs[4]).parent / x["audio"])}) + "\n" for x in lines))
    cfg = train_config(train_dirs, tmp_path, "1", steps=1, train_data=str(manifest))
    train(cfg, quiet=True)
    manifest.write_text("\n".join(manifest.read_text().splitlines()[:4]) + "\n")
    with pytest.raises(TrainError, match=r"train_data: the content of .*train\.jsonl changed since the run started"):
        train(replace(cfg, resume=True, steps=2), quiet=True)
    train(replace(cfg, resume=True, steps=2, allow_changes=("train_data",)), quiet=True)


def test_resume_without_a_checkpoint_says_so(train_dirs, tmp_path, capsys):
    cfg = train_config(train_dirs, tmp_path, "1", steps=2)
    train(cfg, quiet=True)
    for p in (Path(cfg.out) / "checkpoints").iterdir():
        shutil.rmtree(p)
    train(replace(cfg, resume=True))
    assert "--resume: no intact checkpoint in" in capsys.readouterr().err


def test_a_run_that_failed_before_its_first_step_can_simply_be_run_again(train_dirs, tmp_path):
    cfg = train_config(train_dirs, tmp_path, "1", steps=1, train_data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(Exception, match="no such manifest"):
        train(cfg, quiet=True)
    train(replace(cfg, train_data=str(train_dirs[4])), quiet=True)  # the same --out, no --overwrite needed
    assert steps_saved(Path(cfg.out)) == ["step-00000001"]


def test_out_may_not_hold_the_model_it_trains_from(train_dirs, tmp_path):
    stage1 = train_config(train_dirs, tmp_path, "1", steps=1)
    train(stage1, quiet=True)
    before = sorted(os.listdir(stage1.out))
    with pytest.raises(TrainError, match=r"--out .*run1 would hold --model .*run1, which this run reads"):
        train(train_config(train_dirs, tmp_path, "2", model=stage1.out, out=stage1.out, steps=1, overwrite=True), quiet=True)
    assert sorted(os.listdir(stage1.out)) == before


def test_merge_into_its_own_run_folder_is_refused(train_dirs, tmp_path, capsys):
    cfg = train_config(train_dirs, tmp_path, "2", whisper=str(train_dirs[3]), steps=1)
    train(cfg, quiet=True)
    before = {p.name: p.stat().st_ino for p in Path(cfg.out).iterdir()}
    assert train_cli(["merge", cfg.out, "--out", cfg.out]) == 2
    assert "holds a qva-train run, not a saved qva model" in capsys.readouterr().err
    assert {p.name: p.stat().st_ino for p in Path(cfg.out).iterdir()} == before


def test_out_dot_is_checked_before_training(train_dirs, tmp_path, monkeypatch, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "paper.pdf").write_bytes(b"%PDF")
    monkeypatch.chdir(busy)
    started = time.perf_counter()
    assert train_cli(["--stage", "1", "--model", str(train_dirs[1]), "--whisper", str(train_dirs[3]), "--train", str(train_dirs[4]),
                      "--out", ".", "--steps", "1", "--cache", "none"]) == 2
    assert "busy: already holds files qva did not write (paper.pdf)" in capsys.readouterr().err
    assert time.perf_counter() - started < 5 and os.listdir(busy) == ["paper.pdf"]
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert train_cli(["--stage", "1", "--model", str(train_dirs[1]), "--whisper", str(train_dirs[3]), "--train", str(train_dirs[4]),
                      "--out", ".", "--steps", "1", "--cache", "none", "--prompt", "Write the number."]) == 0
    assert qva.load(empty).audio_projector is not None


@pytest.mark.parametrize("args,message", [
    (["--lr", "1e39"], "lr must be a positive number ≤ 1e+30, got 1e+39"),
    (["--max-seq-len", "100000"], "max_seq_len 100000 is over the model's context of 4096 tokens"),
    (["--resume", "--overwrite"], "give one of them"),
    (["--resume", "--allow-changes", "lora_rank"], "allow_changes takes"),
])
def test_bad_run_settings_are_one_line(train_dirs, tmp_path, capsys, args, message):
    code = train_cli(["--stage", "1", "--model", str(train_dirs[1]), "--whisper", str(train_dirs[3]), "--train", str(train_dirs[4]),
                      "--out", str(tmp_path / "o"), "--steps", "1", "--cache", "none", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("qva-train: error: ") and message in err[-1], err


# -- diverged updates, interrupted and failed writes ------------------------------------------------------------
def test_an_update_that_blows_the_weights_up_is_never_saved(train_dirs, tmp_path, monkeypatch):
    cfg = train_config(train_dirs, tmp_path, "1", steps=4, save_every=1)
    real, calls = torch.optim.AdamW.step, []

    def blown(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:  # the loss of step 3 was finite; its update is not
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", blown)
    with pytest.raises(TrainError, match=r"step 3: the update made the trainable weights non-finite .* stopped without saving"):
        train(cfg, quiet=True)
    assert steps_saved(Path(cfg.out)) == ["step-00000001", "step-00000002"]
    assert not (Path(cfg.out) / "config.json").exists()


def test_a_checkpoint_with_non_finite_weights_is_never_called_intact(train_dirs, tmp_path, capsys):
    cfg = train_config(train_dirs, tmp_path, "1", steps=2, save_every=1)
    train(cfg, quiet=True)
    last = Path(cfg.out) / "checkpoints" / "step-00000002"
    weights = load_file(str(last / "trainable.safetensors"))
    weights["audio_projector.weight"][0, 0] = float("nan")
    save_file(weights, str(last / "trainable.safetensors"))
    manifest = json.loads((last / "manifest.json").read_text())
    manifest["trainable.safetensors"] = C.file_sha256(last / "trainable.safetensors")  # checksums that match
    (last / "manifest.json").write_text(json.dumps(manifest))
    assert C.problem(last).startswith("holds non-finite values")
    train(replace(cfg, resume=True, steps=3))
    err = capsys.readouterr().err
    assert "step-00000002 holds non-finite values" in err and "step-00000001 (step 1)" in err


def test_a_kill_between_the_output_renames_loses_nothing_and_resume_finds_the_run(train_dirs, tmp_path, monkeypatch, capsys):
    cfg = train_config(train_dirs, tmp_path, "1", steps=2, save_every=1)
    monkeypatch.setattr(W, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    real, calls = W._rename, []

    def killed(src, dst):  # killed right after the first of the output's two renames
        calls.append(dst)
        if len(calls) >= 2 and ".qva-old-" in calls[-2].name:
            raise KeyboardInterrupt
        real(src, dst)

    train(replace(cfg, steps=1), quiet=True)  # the folder is then a run with an output: a real swap follows
    monkeypatch.setattr(W, "_rename", killed)
    with pytest.raises(KeyboardInterrupt):
        train(replace(cfg, resume=True), quiet=True)
    assert not Path(cfg.out).exists()
    monkeypatch.setattr(W, "_rename", real)
    monkeypatch.setattr(W, "_alive", lambda pid: False)
    train(replace(cfg, resume=True))
    err = capsys.readouterr().err
    assert "restored from" in err and "resumed from" in err and "step-00000002" in err
    assert steps_saved(Path(cfg.out)) == ["step-00000001", "step-00000002"] and qva.load(cfg.out) is not None


def test_a_full_disk_mid_checkpoint_is_one_line_and_resume_after_freeing_space_works(train_dirs, tmp_path, monkeypatch, capsys):
    cfg = train_config(train_dirs, tmp_path, "1", steps=3, save_every=1)
    real, calls = C.save_file, []

    def full_on_second(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:  # step 2's first file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(C, "save_file", full_on_second)
    args = ["--stage", "1", "--model", cfg.model, "--whisper", cfg.whisper, "--train", cfg.train_data, "--out", cfg.out, "--steps", "3",
            "--save-every", "1", "--cache", "none", "--prompt", cfg.prompt, "--lr", "1e-2", "--batch-size", "2"]
    assert train_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qva-train: error: step 2: could not write the checkpoint: ") and "the disk filled up" in err[-1]
    assert "the last intact checkpoint is " in err[-1] and "step-00000001" in err[-1]
    assert steps_saved(Path(cfg.out)) == ["step-00000001"] and not [p for p in (Path(cfg.out) / "checkpoints").iterdir() if ".qva-" in p.name]
    monkeypatch.setattr(C, "save_file", real)  # space freed
    assert train_cli(args + ["--resume"]) == 0
    assert steps_saved(Path(cfg.out))[-2:] == ["step-00000002", "step-00000003"]


# -- stage 2 straight on a plain Qwen2-VL ------------------------------------------------------------------------
@pytest.mark.parametrize("qlora", [False, True])
def test_stage2_on_a_plain_base_loads_merges_evaluates_and_moves(train_dirs, tmp_path, capsys, qlora):
    root = tmp_path / "runs"
    root.mkdir()
    base = shutil.copytree(train_dirs[1], root / "base")
    whisper = shutil.copytree(train_dirs[3], root / "whisper")
    cfg = train_config(train_dirs, root, "2", model=str(base), whisper=str(whisper), steps=2, qlora=qlora, lr=5e-2)
    train(cfg, quiet=True)
    out = Path(cfg.out)
    graft = json.loads((out / "audio_graft.json").read_text())
    assert graft == {"whisper": "../whisper", "audio_frames": "valid", "audio_pool": 1}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "../base"
    adapted = qva.load(out)
    assert adapted.audio_encoder is not None and len(lora_linears(adapted)) > 0
    trained = load_file(str(sorted((out / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))
    assert torch.equal(adapted.audio_projector.weight.float(), trained["audio_projector.weight"])
    with torch.no_grad():
        ref = adapted(IDS).logits
    assert train_cli(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert train_cli(["eval", str(out), "--data", cfg.train_data, "--json", "--limit", "2", "--cache", "none"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2
    merged = qva.load(tmp_path / "merged")
    with torch.no_grad():
        assert max_rel_err(merged(IDS).logits, ref) <= 1e-5
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)  # runs/ moved whole: the relative paths still hold
    with torch.no_grad():
        assert torch.equal(qva.load(moved / "run2")(IDS).logits, ref)
    shutil.move(moved / "base", tmp_path / "base-moved")  # the base moved on its own
    with pytest.raises(CheckpointError, match=r"base model '\.\./base' not found \(looked in .*elsewhere/base\): point to it "
                                              r"with qva\.load\(BASE, adapter="):
        qva.load(moved / "run2")
    with torch.no_grad():
        assert torch.equal(qva.load(tmp_path / "base-moved", adapter=moved / "run2")(IDS).logits, ref)
    shutil.move(moved / "whisper", tmp_path / "whisper-moved")
    with pytest.raises(CheckpointError, match=r"Whisper checkpoint '\.\./whisper' not found .* whisper=WHISPER"):
        qva.load(tmp_path / "base-moved", adapter=moved / "run2")
    assert train_cli(["merge", str(moved / "run2"), "--base", str(tmp_path / "base-moved"), "--whisper", str(tmp_path / "whisper-moved"),
                      "--out", str(tmp_path / "merged2")]) == 0


# -- SIGTERM / SIGINT ------------------------------------------------------------------------------------------------
def trainer(train_dirs, out: Path, steps: int, procs: int = 1, *extra) -> list[str]:
    _, qwen, _, whisper, manifest = train_dirs
    args = ["--stage", "2", "--model", str(qwen), "--whisper", str(whisper), "--train", str(manifest), "--out", str(out),
            "--lr", "1e-2", "--lora-rank", "4", "--lora-dropout", "0.1", "--cache", "none", "--prompt", "Write the number.",
            "--log-every", "1", "--min-lr-ratio", "1", "--batch-size", "1", "--steps", str(steps), *extra]
    if procs == 1:
        return [sys.executable, "-m", "qva.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
            str(29600 + os.getpid() % 300), "-m", "qva.train", *args]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # bit-exact needs one thread count: kernels split sums by thread


def run_until_stopped(cmd: list[str], out: Path, sig: int, after_steps: int = 3, second: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= after_steps:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    if second:  # at once: it lands mid-step (aborted) or, if the first stop was that quick, on the exiting process
        proc.send_signal(sig)
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr + f"\n[exited {time.monotonic() - sent:.1f} s after the signal]")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_bit_exact(train_dirs, tmp_path, sig):
    out = tmp_path / "cut"
    stopped = run_until_stopped(trainer(train_dirs, out, 400), out, sig)
    assert stopped.returncode == 128 + sig, stopped.stderr[-2000:]
    assert f"stopped by {signal.Signals(sig).name} after step" in stopped.stderr and "resume with: qva-train " in stopped.stderr
    assert "Traceback" not in stopped.stderr
    done = int(json.loads((out / "checkpoints" / steps_saved(out)[-1] / "state.json").read_text())["step"])
    assert 3 <= done < 400 and C.intact(out / "checkpoints" / steps_saved(out)[-1])
    target = done + 2
    resumed = subprocess.run(trainer(train_dirs, out, target, 1, "--resume"), capture_output=True, text=True, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = subprocess.run(trainer(train_dirs, tmp_path / "whole", target), capture_output=True, text=True, env=ONE_THREAD)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert losses(out)[:target] == losses(tmp_path / "whole")  # constant lr: the cut run equals one of `target` steps
    a, b = final_trainable(out), final_trainable(tmp_path / "whole")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_second_signal_aborts_at_once_and_leaves_intact_checkpoints(train_dirs, tmp_path, monkeypatch, capsys):
    """The first SIGTERM arrives in step 3; a second one while the stop's checkpoint is being written aborts:
    that checkpoint is not there (not half there), the earlier ones are intact, and resuming works."""
    cfg = train_config(train_dirs, tmp_path, "1", steps=40, save_every=1)
    real_factor, real_save = loop.lr_factor, C.save_file

    def first(step, total, c):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_factor(step, total, c)

    calls = []

    def second(tensors, path, *a, **k):  # two files a checkpoint: the fifth write is step 3's, the stop's
        calls.append(path)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(loop, "lr_factor", first)
    monkeypatch.setattr(C, "save_file", second)
    args = ["--stage", "1", "--model", cfg.model, "--whisper", cfg.whisper, "--train", cfg.train_data, "--out", cfg.out, "--steps", "40",
            "--save-every", "1", "--cache", "none", "--prompt", cfg.prompt, "--lr", "1e-2", "--batch-size", "2"]
    assert train_cli(args) == 128 + signal.SIGTERM
    assert "aborted by a second SIGTERM; the last intact checkpoint is kept" in capsys.readouterr().err
    run = Path(cfg.out)
    assert steps_saved(run) == ["step-00000001", "step-00000002"] and all(C.intact(run / "checkpoints" / s) for s in steps_saved(run))
    assert not [p for p in (run / "checkpoints").iterdir() if ".qva-" in p.name]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    monkeypatch.setattr(loop, "lr_factor", real_factor)
    monkeypatch.setattr(C, "save_file", real_save)
    assert train_cli(args[:args.index("--steps") + 1] + ["4"] + args[args.index("--steps") + 2:] + ["--resume"]) == 0
    assert steps_saved(run)[-1] == "step-00000004"


def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(train_dirs, tmp_path):
    out = tmp_path / "dist"
    stopped = run_until_stopped(trainer(train_dirs, out, 400, 2), out, signal.SIGTERM)
    assert stopped.returncode != 0, stopped.stderr[-2000:]
    assert stopped.stderr.count("stopped by SIGTERM after step") >= 1
    steps = {int(line.split("after step ")[1].split(" ")[0]) for line in stopped.stderr.splitlines() if "after step " in line}
    assert len(steps) == 1, stopped.stderr[-3000:]  # every rank that said so said the same step
    done = steps.pop()
    assert steps_saved(out)[-1] == f"step-{done:08d}" and C.intact(out / "checkpoints" / f"step-{done:08d}")
    target = done + 1
    resumed = subprocess.run(trainer(train_dirs, out, target, 2, "--resume"), capture_output=True, text=True,
                             env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = subprocess.run(trainer(train_dirs, tmp_path / "whole", target, 2), capture_output=True, text=True,
                           env=ONE_THREAD)
    assert whole.returncode == 0, whole.stderr[-2000:]
    a, b = final_trainable(out), final_trainable(tmp_path / "whole")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert qva.load(out) is not None


def test_settings_are_written_once_and_old_field_names_still_work(train_dirs, tmp_path):
    """Every TrainConfig / AugmentConfig field is a flag (with help), and the fields renamed from train/eval/cache
    still load, with a DeprecationWarning; a run folder's old record reads under the new names."""
    from dataclasses import fields

    from qva.train.augment import AugmentConfig
    from qva.train.cli import train_parser
    from qva.train.config import TrainConfig

    actions = {a.dest: a for a in train_parser()._actions}
    for cls in (TrainConfig, AugmentConfig):
        for f in fields(cls):
            if f.name != "augment":
                assert f.name in actions and actions[f.name].help, f.name
    with pytest.warns(DeprecationWarning, match=r"TrainConfig\(train=\.\.\.\) is now TrainConfig\(train_data=\.\.\.\)"):
        cfg = TrainConfig(stage="1", model="m", train="t.jsonl", out="o", steps=1, eval="d.jsonl", cache="none")
    assert (cfg.train_data, cfg.eval_data, cfg.rows_cache) == ("t.jsonl", "d.jsonl", "none")
    old = json.dumps({"stage": "1", "model": "m", "train": "t.jsonl", "out": "o", "steps": 1, "cache": "none"})
    assert TrainConfig.from_json(old).train_data == "t.jsonl"
