"""Helpers of the training tests: `qva-train` in a fresh process (or several under torchrun) and what a run folder holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file


def run(train_dirs, out, *extra, procs=1, stage="2", manifest=None):
    _, qwen, _, whisper, default_manifest = train_dirs
    args = ["--stage", stage, "--model", str(qwen), "--whisper", str(whisper), "--train", str(manifest or default_manifest),
            "--out", str(out), "--lr", "1e-2", "--lora-rank", "4", "--lora-dropout", "0", "--cache", "none",
            "--prompt", "Write the number.", "--log-every", "1", "--min-lr-ratio", "1", *extra]
    launcher = [sys.executable, "-m", "qva.train"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(29500 + os.getpid() % 1000),
        "-m", "qva.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out_ = subprocess.run(launcher + args, capture_output=True, text=True, env=env, timeout=300)
    assert out_.returncode == 0, out_.stderr[-3000:]
    return out_


def last_weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((out / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
