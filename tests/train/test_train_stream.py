"""Streaming training data (`qva/train/stream.py`): the bounded shuffle buffer, the run's sample sequence (each
epoch a seeded permutation of the usable rows, read incrementally), unusable samples dropped and counted, a streamed
run resumed bit-exact, and a stream under torchrun equal to one process."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import max_rel_err, train_config
from train_helpers import last_weights, losses, run

from qva.train.config import TrainConfig, TrainError
from qva.train.data import DataError
from qva.train.stream import Stream, shuffled


def test_shuffle_buffer_is_bounded_seeded_and_a_permutation():
    held = {"max": 0, "in": 0, "out": 0}

    def counted(n):
        for i in range(n):
            held["in"] += 1
            held["max"] = max(held["max"], held["in"] - held["out"])
            yield i

    out = []
    for x in shuffled(counted(1000), 16, random.Random(3)):
        held["out"] += 1
        out.append(x)
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    assert held["max"] <= 17  # the buffer, plus the row just read
    assert list(shuffled(iter(range(1000)), 16, random.Random(3))) == out
    assert list(shuffled(iter(range(1000)), 16, random.Random(4))) != out
    assert list(shuffled(iter(range(5)), 16, random.Random(3))) != list(range(5))  # smaller than the buffer: still shuffled


def manifest_with(tmp_path: Path, train_dirs, bad_clip: bool = False) -> Path:
    clips = train_dirs[4].parent / "clips"
    lines = [json.dumps({"audio": str(clips / f"{i}.wav"), "text": str(i)}) for i in range(6)]
    lines.insert(2, "{not json")  # a row that does not parse: no index
    if bad_clip:
        (tmp_path / "broken.wav").write_bytes(b"RIFF....not audio")
        lines.insert(4, json.dumps({"audio": str(tmp_path / "broken.wav"), "text": "9"}))
    path = tmp_path / "stream.jsonl"
    path.write_text("\n".join(lines))
    return path


def test_each_epoch_is_a_seeded_permutation_of_the_usable_rows(graft, train_dirs, tmp_path):
    cfg = train_config(train_dirs, tmp_path, "1", steps=1, stream=True, shuffle_buffer=3, train_data=str(manifest_with(tmp_path, train_dirs)))
    logs = []
    stream = Stream(cfg, graft.processor, log=logs.append)
    answers = [stream.take(i).example.answer for i in range(12)]
    assert sorted(answers[:6]) == sorted(answers[6:]) == [str(i) for i in range(6)] and answers[:6] != answers[6:]
    assert stream.epoch_rows == 6 and stream.unusable == 1 and len(logs) == 1 and ":3" in logs[0]  # line 3, named once
    again = Stream(cfg, graft.processor, log=logs.append)
    assert [again.take(i).example.answer for i in (4, 9, 11)] == [answers[4], answers[9], answers[11]]  # read forward
    with pytest.raises(ValueError, match="has passed"):
        again.take(3)
    other = Stream(replace(cfg, seed=1), graft.processor, log=logs.append)
    assert [other.take(i).example.answer for i in range(12)] != answers
    with pytest.raises(DataError, match=":3"):
        Stream(replace(cfg, strict=True), graft.processor).take(5)


def test_stream_settings_are_checked(train_dirs, tmp_path):
    with pytest.raises(TrainError, match="needs --steps"):
        replace(train_config(train_dirs, tmp_path, "1", stream=True), steps=None, epochs=1.0).check()
    with pytest.raises(TrainError, match="not with --stream"):
        train_config(train_dirs, tmp_path, "1", stream=True, bucket_by_length=True).check()
    from qva.train.cli import config_from_args, train_parser

    args = train_parser().parse_args(["--stage", "1", "--model", "m", "--train", "t", "--out", "o", "--steps", "2", "--stream",
                                      "--shuffle-buffer", "5"])
    cfg = config_from_args(args)
    assert isinstance(cfg, TrainConfig) and cfg.stream and cfg.shuffle_buffer == 5


def test_streamed_run_drops_a_broken_clip_and_resumes_bit_exact(train_dirs, tmp_path):
    """Batch 1: the broken clip's step is skipped (and logged); stopping after step 3 and resuming gives the
    uninterrupted run's weights exactly (the cursor reads forward to the checkpoint's position)."""
    from qva.train.loop import train

    manifest = manifest_with(tmp_path, train_dirs, bad_clip=True)
    cfg = train_config(train_dirs, tmp_path, "1", steps=8, batch_size=1, stream=True, shuffle_buffer=3, train_data=str(manifest),
                       save_every=1, keep_last=20)
    train(cfg, quiet=True)
    metrics = (Path(cfg.out) / "metrics.jsonl").read_text()
    want = last_weights(Path(cfg.out))
    for step in range(4, 9):  # as if stopped after step 3
        shutil.rmtree(Path(cfg.out) / "checkpoints" / f"step-{step:08d}", ignore_errors=True)
    train(replace(cfg, resume=True), quiet=True)
    got = last_weights(Path(cfg.out))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert metrics.count('"loss"') < 8  # the skipped step records no loss


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_stream_under_torchrun_equals_one_process(train_dirs, tmp_path, mode):
    manifest = manifest_with(tmp_path, train_dirs)
    common = ("--steps", "3", "--batch-size", "1", "--stream", "--shuffle-buffer", "3")
    run(train_dirs, tmp_path / "one", *common, "--grad-accum", "2", manifest=manifest)
    run(train_dirs, tmp_path / "two", *common, *(["--fsdp"] if mode == "fsdp" else []), procs=2, manifest=manifest)
    a, b = last_weights(tmp_path / "one"), last_weights(tmp_path / "two")
    assert max(max_rel_err(a[n], b[n]) for n in a) <= 1e-5  # fp32: the all-reduce sums in another order than one process accumulating
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-6)
