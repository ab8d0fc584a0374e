"""Training settings, written once: `TrainConfig` (what `qva-train` flags set), checked before anything runs,
recorded in the run folder (`train_config.json`), and compared with the record on resume.

On resume each setting that differs from the run's record is named. Three kinds:
    FIXED            shapes and what trains (stage, model, Whisper, LoRA rank and targets, pooling, QLoRA,
                     frozen parts): the checkpoint cannot be continued under others, always refused
    RESULT_CHANGING  data, order, optimisation and length: refused unless listed in `allow_changes`
    everything else  its length (steps, epochs: a run may be extended) and how it is watched or saved
                     (logging, evaluation, checkpoints, device): taken, and named
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from ..linear import LORA_TARGETS
from .augment import AugmentConfig

STAGES = ("1", "2", "lm")
MAX_LR = 1e30  # near float32's largest value the update itself overflows
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FREEZABLE = ("embeddings", "lm_head")


class TrainError(RuntimeError):
    """Training cannot start or go on: the message says why (and, mid-run, at which step)."""


@dataclass
class TrainConfig:
    stage: str
    model: str  # Qwen2-VL checkpoint, saved graft, or (stage 2) a stage-1 output
    train: str  # JSONL manifest
    out: str  # run folder: checkpoints, metrics, and the trained model at the end
    whisper: str | None = None  # graft this Whisper on first (stage 1 on a plain Qwen2-VL)
    eval: str | None = None  # dev manifest: loss, exact match and WER every `eval_every` steps
    prompt: str | None = "Transcribe the audio."  # the user text of short {"audio", "text"} lines
    audio_pool: int = 1  # for a fresh graft: encoder frames averaged into one token
    audio_frames: str = "valid"
    dtype: str = "fp32"  # storage dtype of the frozen weights (trainable ones are fp32)
    whisper_dtype: str | None = None  # the frozen encoder's dtype (default: dtype)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    qlora: bool = False  # the LLM's linear weights stored in NF4 (QLoRA); LoRA and the projector train in fp32
    lr: float = 1e-3
    projector_lr: float | None = None  # stage 2: the projector's own learning rate (default: lr)
    weight_decay: float = 0.0  # AdamW decay on matrices (never on norms or biases)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr · this
    steps: int | None = None  # or epochs
    epochs: float | None = None
    batch_size: int = 8  # samples per forward (per process)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    freeze: tuple[str, ...] = ()  # stage lm: parts kept frozen (embeddings, lm_head)
    activation_checkpointing: bool = False
    fsdp: bool = False  # several processes: shard the model with FSDP2 (per decoder layer) instead of replicating it
    device: str = "cpu"  # or "cuda" (each torchrun process takes its LOCAL_RANK's GPU)
    max_seq_len: int = 4096
    strict: bool = False
    eval_every: int = 0  # 0: only at the end
    eval_limit: int | None = None  # score the first N dev samples (loss uses all)
    eval_batch_size: int = 32
    max_new_tokens: int = 32
    keep_best: bool = True  # with eval: the output is the checkpoint with the best dev exact match
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    log_every: int = 10
    resume: bool = False
    cache: str | None = None  # Whisper-row cache folder ("none": off); default ~/.cache/qva/whisper-rows
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    overwrite: bool = False  # start again in a folder that holds a previous run (its checkpoints and output replaced)
    allow_changes: tuple[str, ...] = ()  # with resume: settings that may differ from the run's record

    def check(self) -> None:
        if self.stage not in STAGES:
            raise TrainError(f"stage must be one of {list(STAGES)}, got {self.stage!r}")
        if (self.steps is None) == (self.epochs is None):
            raise TrainError("give the length of the run as steps or as epochs (one of them)")
        for name in ("batch_size", "grad_accum", "lora_rank", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("lr", "projector_lr"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= MAX_LR):
                raise TrainError(f"{name} must be a positive number ≤ {MAX_LR:g}, got {value}")
        unknown = set(self.freeze) - set(FREEZABLE)
        if unknown:
            raise TrainError(f"freeze takes {list(FREEZABLE)}, got {sorted(unknown)}")
        if self.dtype not in DTYPES or (self.whisper_dtype or self.dtype) not in DTYPES:
            raise TrainError(f"dtype must be one of {list(DTYPES)}")
        if self.fsdp and self.augment.on:
            raise TrainError("augmentation re-encodes audio with the encoder outside the sharded forward: not with --fsdp")
        if self.resume and self.overwrite:
            raise TrainError("--resume continues the run in --out, --overwrite starts it again: give one of them")
        unknown = set(self.allow_changes) - {f.name for f in fields(self)} | (set(self.allow_changes) & set(FIXED))
        if unknown:
            raise TrainError(f"allow_changes takes setting names such as {', '.join(RESULT_CHANGING[:6])}, …, got {sorted(unknown)}"
                             + (f" ({sorted(unknown & set(FIXED))} cannot change on resume)" if unknown & set(FIXED) else ""))
        if self.qlora and self.stage == "lm":
            raise TrainError("--qlora stores the LLM's weights in NF4, frozen: it goes with stage 1 or 2, not stage lm")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def recorded(self) -> "TrainConfig":
        """The settings as a run folder records them: paths absolute, so a resume from elsewhere compares equal."""
        paths = {n: os.path.abspath(getattr(self, n)) for n in PATHS if getattr(self, n) not in (None, "none")}
        return replace(self, **paths, resume=False, overwrite=False, allow_changes=())

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        d = json.loads(text)
        d["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get("augment", {}).items()})
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in {f.name for f in fields(cls)}})


PATHS = ("model", "whisper", "train", "eval", "out", "cache")
FIXED = ("stage", "model", "whisper", "audio_pool", "audio_frames", "lora_rank", "lora_targets", "qlora", "freeze")
RESULT_CHANGING = ("train", "prompt", "seed", "batch_size", "grad_accum", "lr", "projector_lr", "weight_decay", "warmup_steps",
                   "min_lr_ratio", "max_grad_norm", "lora_alpha", "lora_dropout", "dtype", "whisper_dtype",
                   "max_seq_len", "augment", "keep_best")
IGNORED_ON_RESUME = ("out", "resume", "overwrite", "allow_changes")


def resume_changes(run: TrainConfig, now: TrainConfig) -> tuple[list[str], list[str], list[str]]:
    """(fixed, result-changing, other) settings of `now` that differ from the run's record, as "name a → b"."""
    a, b = asdict(run.recorded()), asdict(now.recorded())
    fixed, changing, other = [], [], []
    for name in a:
        if name in IGNORED_ON_RESUME or a[name] == b[name]:
            continue
        text = f"{name} {a[name]!r} → {b[name]!r}"
        (fixed if name in FIXED else changing if name in RESULT_CHANGING else other).append(text)
    return fixed, changing, other
