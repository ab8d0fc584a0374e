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

import argparse
import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from ..cli_common import REQUIRED, comma_names, from_args, opt
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
    stage: str = opt(REQUIRED, "1: projector; 2: projector + LoRA; lm: the LLM", choices=STAGES)
    model: str = opt(REQUIRED, "Qwen2-VL checkpoint, saved graft, or (stage 2) a stage-1 output")
    train_data: str = opt(REQUIRED, "training data: qva JSONL, ms-swift / LLaMA-Factory JSON(L), parquet (file, folder or glob) "
                                    "or a save_to_disk folder", flag="--train")
    out: str = opt(REQUIRED, "run folder: checkpoints, metrics, and the trained model at the end")
    whisper: str | None = opt(None, "Whisper checkpoint to graft on (stages 1 and 2 on a plain Qwen2-VL)")
    eval_data: str | None = opt(None, "dev data (any --train format): loss, exact match, WER and CER every --eval-every steps; "
                                      "several sets comma-separated, each scored and recorded, the first choosing the best checkpoint",
                                flag="--eval")
    prompt: str | None = opt("Transcribe the audio.", "user text for short {'audio', 'text'} lines")
    data_format: str = opt("auto", "format of --train / --eval (auto: detected from the content); see qva/train/formats.py",
                           choices=("auto", "qva", "swift", "sharegpt", "alpaca", "parquet", "arrow"))
    audio_column: str = opt("audio", "parquet / Arrow: the column holding each row's audio (a path or {'bytes', 'path'})")
    text_column: str = opt("text", "parquet / Arrow: the column holding each row's transcript (the answer; --prompt asks)")
    bucket_by_length: bool = opt(False, "batches of samples of similar length (less padding), still a seeded, recomputable order")
    stream: bool = opt(False, "read --train as it is used, through a bounded shuffle buffer, never whole (needs --steps)")
    shuffle_buffer: int = opt(10_000, "--stream: examples held for shuffling (the order is seeded and recomputed on resume)")
    audio_pool: int = opt(1, "fresh graft: encoder frames averaged into one audio token")
    audio_frames: str = opt("valid", "fresh graft: encoder frames kept (valid: those of real audio; full: all 1500)",
                            choices=("valid", "full"))
    dtype: str = opt("fp32", "storage dtype of the frozen weights (trainable ones are fp32)", choices=tuple(DTYPES))
    whisper_dtype: str | None = opt(None, "the frozen encoder's dtype (default: --dtype)", choices=tuple(DTYPES))
    lora_rank: int = opt(16, "stage 2: LoRA rank")
    lora_alpha: float = opt(32.0, "stage 2: LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = opt(0.05, "stage 2: dropout on the LoRA factors' input")
    lora_targets: tuple[str, ...] = opt(lambda: LORA_TARGETS, "LLM linear names to adapt", type=comma_names)
    qlora: bool = opt(False, "stages 1/2: the LLM's linear weights in NF4 (QLoRA); LoRA and the projector train in fp32")
    lr: float = opt(1e-3, "learning rate")
    projector_lr: float | None = opt(None, "stage 2: the projector's own learning rate (default: --lr)")
    weight_decay: float = opt(0.0, "AdamW decay on matrices (never on norms or biases)")
    warmup_steps: int = opt(0, "linear warmup steps")
    min_lr_ratio: float = opt(0.0, "the cosine schedule decays to lr · this")
    steps: int | None = opt(None, "optimizer steps (or --epochs)", group="length")
    epochs: float | None = opt(None, "passes over the data (or --steps)", group="length")
    batch_size: int = opt(8, "samples per forward (per process)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient clipping")
    seed: int = opt(0, "seed of the data order, dropout and a fresh projector")
    freeze: tuple[str, ...] = opt(tuple, "stage lm: keep this part frozen (repeatable)", action="append", choices=FREEZABLE)
    activation_checkpointing: bool = opt(False, "recompute each decoder layer in backward (less memory)")
    fsdp: bool = opt(False, "several processes: shard the model with FSDP2 per decoder layer instead of replicating it")
    device: str = opt("cpu", "each torchrun process takes its LOCAL_RANK's GPU with cuda", choices=("cpu", "cuda"))
    max_seq_len: int = opt(4096, "longer samples are skipped and named (at most the model's context)")
    strict: bool = opt(False, "a bad sample is an error instead of being skipped")
    eval_every: int = opt(0, "evaluate every N steps (0: only at the end)")
    eval_limit: int | None = opt(None, "score the first N dev samples (the loss uses all)")
    eval_batch_size: int = opt(32, "dev samples per forward")
    max_new_tokens: int = opt(32, "greedy tokens per dev answer")
    keep_best: bool = opt(True, "output the last step, not the best dev checkpoint", flag="--no-keep-best")
    save_every: int = opt(0, "checkpoint every N steps (0: only at the end)")
    keep_last: int = opt(2, "step checkpoints kept")
    log_every: int = opt(10, "progress and metrics every N steps")
    resume: bool = opt(False, "continue from the run folder's last intact checkpoint")
    rows_cache: str | None = opt(None, "Whisper-row cache folder ('none': off; default ~/.cache/qva/whisper-rows)", flag="--cache")
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # its flags: AugmentConfig's fields
    overwrite: bool = opt(False, "start again in an --out that holds a previous run (its checkpoints, metrics and output "
                                 "are replaced; other files stay)")
    allow_changes: tuple[str, ...] = opt(tuple, "with --resume: settings that may differ from the run's record, e.g. lr,seed",
                                         type=comma_names)

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
        if self.fsdp and self.augment.reencodes:
            raise TrainError("augmentation re-encodes audio with the encoder outside the sharded forward: not with --fsdp")
        if self.stream and self.augment.row_masks:
            raise TrainError("--row-masks masks the cached encoder rows; a streamed run's audio reaches the model as log-mel "
                             "(no rows to mask): use --time-masks")
        if self.resume and self.overwrite:
            raise TrainError("--resume continues the run in --out, --overwrite starts it again: give one of them")
        unknown = set(self.allow_changes) - {f.name for f in fields(self)} | (set(self.allow_changes) & set(FIXED))
        if unknown:
            raise TrainError(f"allow_changes takes setting names such as {', '.join(RESULT_CHANGING[:6])}, …, got {sorted(unknown)}"
                             + (f" ({sorted(unknown & set(FIXED))} cannot change on resume)" if unknown & set(FIXED) else ""))
        if self.stream and self.steps is None:
            raise TrainError("--stream needs --steps: a stream's length is not known before it is read")
        if self.stream and self.bucket_by_length:
            raise TrainError("--bucket-by-length sorts the whole set by length: not with --stream")
        if self.shuffle_buffer < 1:
            raise TrainError(f"shuffle_buffer must be ≥ 1, got {self.shuffle_buffer}")
        if self.qlora and self.stage == "lm":
            raise TrainError("--qlora stores the LLM's weights in NF4, frozen: it goes with stage 1 or 2, not stage lm")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @property
    def eval_sets(self) -> list[str]:
        """`--eval`'s sets: one path, or several comma-separated (the first chooses the best checkpoint)."""
        return [p.strip() for p in self.eval_data.split(",") if p.strip()] if self.eval_data else []

    def recorded(self) -> "TrainConfig":
        """The settings as a run folder records them: paths absolute, so a resume from elsewhere compares equal."""
        paths = {n: os.path.abspath(getattr(self, n)) for n in PATHS if getattr(self, n) not in (None, "none") and n != "eval_data"}
        if self.eval_data:
            paths["eval_data"] = ",".join(os.path.abspath(p) for p in self.eval_sets)
        return replace(self, **paths, resume=False, overwrite=False, allow_changes=())

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        d = json.loads(text)
        for old, new in RENAMED.items():  # records written before the fields were renamed
            if old in d and new not in d:
                d[new] = d.pop(old)
        d["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get("augment", {}).items()})
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in {f.name for f in fields(cls)}})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        return from_args(cls, args, augment=from_args(AugmentConfig, args))


RENAMED = {"train": "train_data", "eval": "eval_data", "cache": "rows_cache"}  # old field name → new (the flags kept theirs)
_dataclass_init = TrainConfig.__init__


def _init_taking_old_names(self, *args, **kwargs):
    """`TrainConfig(train=..., eval=..., cache=...)` still works, with a DeprecationWarning naming the new field."""
    for old, new in RENAMED.items():
        if old in kwargs:
            warnings.warn(f"TrainConfig({old}=...) is now TrainConfig({new}=...)", DeprecationWarning, stacklevel=2)
            kwargs[new] = kwargs.pop(old)
    _dataclass_init(self, *args, **kwargs)


TrainConfig.__init__ = _init_taking_old_names
PATHS = ("model", "whisper", "train_data", "eval_data", "out", "rows_cache")
FIXED = ("stage", "model", "whisper", "audio_pool", "audio_frames", "lora_rank", "lora_targets", "qlora", "freeze")
RESULT_CHANGING = ("train_data", "data_format", "audio_column", "text_column", "bucket_by_length", "stream", "shuffle_buffer", "prompt",
                   "seed", "batch_size",
                   "grad_accum", "lr", "projector_lr", "weight_decay", "warmup_steps",
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

