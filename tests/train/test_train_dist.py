"""Training on several processes (`qva/train/dist.py`): 2 processes with torchrun on CPU (gloo) give the
weights one process gives on the same global batch, with data parallelism and with FSDP2; resume under
FSDP2 is exact; a rank whose batch has no audio still works."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_train_dirs, max_rel_err
from train_helpers import last_weights, losses, run

import qva


@pytest.fixture(scope="module")
def single(train_dirs, tmp_path_factory):
    """One process, batch 1 × accumulation 2: the same global batch as 2 processes × batch 1."""
    out = tmp_path_factory.mktemp("single") / "run"
    run(train_dirs, out, "--steps", "4", "--batch-size", "1", "--grad-accum", "2")
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(train_dirs, single, tmp_path, mode):
    two_equal_one(train_dirs, single, tmp_path / mode, mode)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_newer_bases_under_fsdp_equal_one_process(tmp_path_factory, tmp_path, family):
    dirs = make_train_dirs(tmp_path_factory.mktemp(f"train-{family}"), family)
    one = tmp_path / "one"
    run(dirs, one, "--steps", "4", "--batch-size", "1", "--grad-accum", "2")
    two_equal_one(dirs, one, tmp_path / "fsdp", "fsdp")
    assert qva.load(tmp_path / "fsdp").config.family == family


def two_equal_one(train_dirs, single, out, mode):
    result = run(train_dirs, out, "--steps", "4", "--batch-size", "1", *(["--fsdp"] if mode == "fsdp" else []), procs=2)
    assert "2 processes" in result.stderr
    a, b = last_weights(single), last_weights(out)
    assert set(a) == set(b) and len(a) == 1 + 2 * 7 * 2
    worst = max(max_rel_err(a[n], b[n]) for n in a)
    assert worst <= 1e-6, worst
    for x, y in zip(losses(single), losses(out), strict=True):
        assert abs(x - y) <= 1e-6 * abs(x)
    assert (out / "adapter_model.safetensors").is_file()  # rank 0 wrote the output (gathered, under FSDP)
    loaded = qva.load(out)  # stage 2 straight on a plain base: the graft is rebuilt from the run folder
    assert torch.equal(loaded.audio_projector.weight.float(), b["audio_projector.weight"])


def test_qlora_on_a_plain_base_under_torchrun_loads(train_dirs, tmp_path):
    out = tmp_path / "qlora"
    run(train_dirs, out, "--steps", "2", "--batch-size", "1", "--qlora", procs=2)
    loaded, trained = qva.load(out), last_weights(out)
    assert torch.equal(loaded.audio_projector.weight.float(), trained["audio_projector.weight"])
    assert loaded.audio_encoder is not None and (out / "audio_graft.json").is_file()


def test_resume_under_fsdp_is_exact(train_dirs, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(train_dirs, whole, "--steps", "4", "--batch-size", "1", "--fsdp", procs=2)
    run(train_dirs, cut, "--steps", "2", "--batch-size", "1", "--fsdp", "--save-every", "2", procs=2)
    run(train_dirs, cut, "--steps", "4", "--batch-size", "1", "--fsdp", "--resume", procs=2)
    a, b = last_weights(whole), last_weights(cut)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert losses(cut) == losses(whole)


def test_a_rank_without_audio_still_works(train_dirs, tmp_path):
    """Stage 1 on samples half of which have no audio: a rank whose batch has none reaches no trainable weight
    (it skips backward and adds zeros to the gradient sum); the result still equals one process's."""
    clips = train_dirs[4].parent / "clips"
    lines = []
    for i in range(4):
        lines.append(json.dumps({"audio": str(clips / f"{i}.wav"), "text": str(i)}))
        lines.append(json.dumps({"messages": [{"role": "user", "content": "just text"}, {"role": "assistant", "content": str(i)}]}))
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("\n".join(lines))
    run(train_dirs, tmp_path / "one", "--steps", "3", "--batch-size", "1", "--grad-accum", "2", manifest=manifest, stage="1")
    run(train_dirs, tmp_path / "two", "--steps", "3", "--batch-size", "1", procs=2, manifest=manifest, stage="1")
    a, b = last_weights(tmp_path / "one"), last_weights(tmp_path / "two")
    assert max(max_rel_err(a[n], b[n]) for n in a) <= 1e-6


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_mixed_modalities_split_unevenly_over_ranks(train_dirs, tmp_path, mode):
    """Stage 2 on a manifest mixing text-only, audio, image, video and audio + image rows, split so that some
    steps give one rank no audio or no image (batch 1, 2 processes): no hang, no unused-parameter error, and the
    weights equal one process's (batch 1 × accumulation 2) on the same global batches."""
    from PIL import Image

    clips = train_dirs[4].parent / "clips"
    Image.new("RGB", (60, 40), (200, 30, 90)).save(tmp_path / "a.png")
    (tmp_path / "frames").mkdir()
    for i in range(3):
        Image.new("RGB", (56, 56), (40 * i, 90, 160)).save(tmp_path / "frames" / f"{i}.png")
    user = lambda *items: {"role": "user", "content": [*items, {"type": "text", "text": "Say it."}]}  # noqa: E731
    rows = [
        [user(), "1"],
        [user({"type": "audio", "audio": str(clips / "0.wav")}), "42"],
        [user({"type": "image", "image": str(tmp_path / "a.png")}), "7"],
        [user({"type": "video", "video": [str(tmp_path / "frames" / f"{i}.png") for i in range(3)]}), "315"],
        [user({"type": "audio", "audio": str(clips / "1.wav")}, {"type": "image", "image": str(tmp_path / "a.png")}), "8"],
        [user(), "906"],
    ]
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("\n".join(json.dumps({"messages": [m, {"role": "assistant", "content": a}]}) for m, a in rows))
    fsdp = ["--fsdp"] if mode == "fsdp" else []
    run(train_dirs, tmp_path / "one", "--steps", "3", "--batch-size", "1", "--grad-accum", "2", manifest=manifest)
    run(train_dirs, tmp_path / "two", "--steps", "3", "--batch-size", "1", *fsdp, procs=2, manifest=manifest)
    a, b = last_weights(tmp_path / "one"), last_weights(tmp_path / "two")
    assert set(a) == set(b) and max(max_rel_err(a[n], b[n]) for n in a) <= 1e-6
    for x, y in zip(losses(tmp_path / "one"), losses(tmp_path / "two"), strict=True):
        assert abs(x - y) <= 1e-6 * abs(x)


def test_teardown_destroys_only_the_group_setup_made():
    """A group left to interpreter exit can abort a rank after its last step (exit -6); `train` leaves the
    group `setup` made and keeps one its caller made."""
    import torch.distributed as dist

    from qva.train import dist as D

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        D.teardown(D.Dist(0, 2, owns_group=False))  # the caller's group: kept
        assert dist.is_initialized()
        D.teardown(D.Dist(0, 2, owns_group=True))
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
