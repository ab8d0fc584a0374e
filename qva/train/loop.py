"""Teaching the graft to hear: stage 1 (projector), stage 2 (projector + LoRA), stage lm (the whole LLM).

    stage 1   trains `audio_projector` only; vision, Whisper and the LLM are frozen (audio learns to look
              like text the LLM already reads)
    stage 2   trains the projector and LoRA factors on the LLM's linears (`linear.add_lora`); with `qlora`
              those linears are stored in NF4 (`linear.NF4Linear`), and the adapter applies to the
              unquantized base afterwards (what `qva.load(out)` does)
    stage lm  trains the LLM's weights (text or media; vision and Whisper frozen), `freeze` parts excepted

`train(cfg)` reads top to bottom: model and the stage's trainable set (checked against the stage's rule
before anything runs) → data (bad samples skipped and named; Whisper rows computed once and cached) →
AdamW (no decay on norms and biases) with warmup + cosine → resume from the last intact checkpoint →
steps (gradient accumulation, loss normalised by the labelled tokens of the whole step, clipping), with
evaluation (loss, exact match, WER), best-by-dev kept, checkpoints every N steps → the final output:
a `qva.save` folder (stages 1 and lm) or a PEFT-layout adapter beside the projector (stage 2), both loaded
by `qva.load(out)`.

A run folder holds, besides that output, `train_config.json` (the settings, the prompt among them),
`metrics.jsonl`, `checkpoints/step-N/` (trainable weights, optimizer state by parameter name, step, data
position, RNG state; a checksum manifest written last) and `checkpoints/best/`. On CPU in fp32, a resumed
run's losses and weights equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from weights_loader.writer import atomic_folder

from ..adapters import save_adapter
from ..audio import SAMPLE_RATE, load_audio
from ..demo import cache_dir
from ..linear import LORA_TARGETS, add_lora, lora_linears
from ..pretrained import load, save
from . import dist as D
from .augment import AugmentConfig, augment_wave, spec_augment
from .data import Example, Sample, collate, describe_skipped, encode, encode_all, fill_audio_rows, read_manifest
from .evaluate import evaluate

STAGES = ("1", "2", "lm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FREEZABLE = ("embeddings", "lm_head")
RUN_FILES = ("train_config.json", "metrics.jsonl", "checkpoints", "tensorboard")


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

    def check(self) -> None:
        if self.stage not in STAGES:
            raise TrainError(f"stage must be one of {list(STAGES)}, got {self.stage!r}")
        if (self.steps is None) == (self.epochs is None):
            raise TrainError("give the length of the run as steps or as epochs (one of them)")
        for name in ("batch_size", "grad_accum", "lora_rank", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"lr must be a positive number, got {self.lr}")
        unknown = set(self.freeze) - set(FREEZABLE)
        if unknown:
            raise TrainError(f"freeze takes {list(FREEZABLE)}, got {sorted(unknown)}")
        if self.dtype not in DTYPES or (self.whisper_dtype or self.dtype) not in DTYPES:
            raise TrainError(f"dtype must be one of {list(DTYPES)}")
        if self.fsdp and self.augment.on:
            raise TrainError("augmentation re-encodes audio with the encoder outside the sharded forward: not with --fsdp")
        if self.qlora and self.stage == "lm":
            raise TrainError("--qlora stores the LLM's weights in NF4, frozen: it goes with stage 1 or 2, not stage lm")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        d = json.loads(text)
        d["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get("augment", {}).items()})
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in {f.name for f in fields(cls)}})


# -- the model and what trains --------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, device=None):
    """The model for the stage, with its trainable parameters in fp32 and everything else frozen."""
    dtype = DTYPES[cfg.dtype]
    model = load(cfg.model, whisper=cfg.whisper, audio_frames=cfg.audio_frames, audio_pool=cfg.audio_pool, seed=cfg.seed, dtype=dtype,
                 device=device, quantize="nf4" if cfg.qlora else None)
    if model.processor is None:
        raise TrainError(f"{cfg.model}: no tokenizer.json: training needs the model's tokenizer")
    if model.audio_encoder is not None:
        model.audio_encoder.to(DTYPES[cfg.whisper_dtype or cfg.dtype])
    if cfg.stage in ("1", "2"):
        if model.audio_projector is None:
            raise TrainError(f"stage {cfg.stage} trains the audio projector: give --whisper to graft one onto {cfg.model}")
        model.audio_projector.float()
    if cfg.stage == "2":
        for name, module in list(model.model.named_modules()):
            if name.rsplit(".", 1)[-1] in cfg.lora_targets:
                add_lora(module, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    if cfg.stage == "lm":
        model.model.float()
        model.lm_head.float()
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    model.model.checkpoint_layers = cfg.activation_checkpointing
    freeze_for_stage(model, cfg)
    return model


def freeze_for_stage(model, cfg: TrainConfig) -> None:
    model.requires_grad_(False)
    if cfg.stage in ("1", "2"):
        model.audio_projector.requires_grad_(True)
    if cfg.stage == "2":
        for linear in lora_linears(model.model).values():
            linear.lora_A.requires_grad_(True)
            linear.lora_B.requires_grad_(True)
    if cfg.stage == "lm":
        model.model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        if "embeddings" in cfg.freeze:
            model.model.embed_tokens.requires_grad_(False)
        if "lm_head" in cfg.freeze:
            model.lm_head.requires_grad_(False)


def stage_rule(cfg: TrainConfig, tied: bool):
    """The stage's trainable set, by name (independent of how `freeze_for_stage` sets it)."""
    def trains(name: str) -> bool:
        lora = ".lora_A." in name or ".lora_B." in name
        if cfg.stage == "1":
            return name.startswith("audio_projector.")
        if cfg.stage == "2":
            return name.startswith("audio_projector.") or (lora and name.startswith("model.layers."))
        if name == "model.embed_tokens.weight":
            return "embeddings" not in cfg.freeze and not (tied and "lm_head" in cfg.freeze)
        if name == "lm_head.weight":
            return "lm_head" not in cfg.freeze
        return name.startswith("model.") and not lora
    return trains


def check_trainable(model, cfg: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by name; a `TrainError` if they are not exactly the stage's."""
    params = dict(model.named_parameters())  # tied weights appear once
    trains = stage_rule(cfg, model.config.tie_word_embeddings)
    actual = {n for n, p in params.items() if p.requires_grad}
    expected = {n for n in params if trains(n)}
    if actual != expected:
        extra, missing = sorted(actual - expected), sorted(expected - actual)
        raise TrainError(f"stage {cfg.stage}: the trainable set differs from the stage's: "
                         f"trainable but should not be {extra[:5]}, frozen but should train {missing[:5]}")
    if not actual:
        raise TrainError(f"stage {cfg.stage}: nothing to train")
    return {n: params[n] for n in sorted(actual)}


def part_of(name: str) -> str:
    if ".lora_" in name:
        return "LoRA"
    for prefix, part in (("visual.", "vision"), ("audio_encoder.", "whisper"), ("audio_projector.", "projector"),
                         ("model.embed_tokens.", "embeddings"), ("lm_head.", "lm_head"), ("model.", "LLM")):
        if name.startswith(prefix):
            return part
    return "other"


def trainable_table(model) -> str:
    """Per part: tensors and parameters that train, and parameters that stay frozen."""
    rows: dict[str, list] = {}
    for name, p in model.named_parameters():
        r = rows.setdefault(part_of(name), [0, 0, 0, ""])
        if p.requires_grad:
            r[0] += 1
            r[1] += p.numel()
            r[3] = r[3] or name
        else:
            r[2] += p.numel()
    lines = [f"{'part':<11} {'trainable tensors':>17} {'trainable params':>17} {'frozen params':>14}  e.g."]
    for part, (t, n, f, example) in rows.items():
        lines.append(f"{part:<11} {t:>17} {n:>17,} {f:>14,}  {example}")
    lines.append(f"{'total':<11} {sum(r[0] for r in rows.values()):>17} {sum(r[1] for r in rows.values()):>17,} "
                 f"{sum(r[2] for r in rows.values()):>14,}")
    return "\n".join(lines)


# -- optimizer and schedule ---------------------------------------------------------------------------------------
def make_optimizer(params: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and biases (1-D) do not; stage 2's projector may have its own rate."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in params.items():
        projector = cfg.stage == "2" and name.startswith("audio_projector.")
        groups.setdefault((p.ndim >= 2, projector), []).append(p)
    out = []
    for (decay, projector), ps in sorted(groups.items()):
        lr = (cfg.projector_lr or cfg.lr) if projector else cfg.lr
        out.append({"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": lr, "base_lr": lr})
    return torch.optim.AdamW(out, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- checkpoints ---------------------------------------------------------------------------------------------------
def save_checkpoint(folder: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.AdamW, state: dict, d: D.Dist = D.Dist()) -> None:
    """Atomically: trainable weights, optimizer state keyed by parameter name, RNG, step and data position,
    then a manifest of the files' SHA-256 (a checkpoint without a matching manifest is not used).
    Every rank calls it (sharded tensors are gathered); rank 0 writes."""
    weights = {n: D.full(p.detach()).cpu().contiguous() for n, p in params.items()}
    names = {id(p): n for n, p in params.items()}
    opt_tensors = {"__rng__.torch": torch.get_rng_state()}
    for p, s in opt.state.items():
        for key, value in s.items():
            value = D.full(value.detach()).cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
            opt_tensors[f"{names[id(p)]}::{key}"] = value
    if d.main:
        with atomic_folder(folder) as tmp:
            save_file(weights, str(tmp / "trainable.safetensors"))
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
            digests = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
            (tmp / "manifest.json").write_text(json.dumps(digests, indent=2))
    D.barrier(d)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def intact(folder: Path) -> bool:
    try:
        digests = json.loads((folder / "manifest.json").read_text())
        return bool(digests) and all(_sha256(folder / name) == d for name, d in digests.items())
    except (OSError, ValueError):
        return False


def latest_intact(run: Path, log) -> Path | None:
    """The newest step checkpoint whose files match its manifest; corrupted ones are named and skipped."""
    for folder in sorted((run / "checkpoints").glob("step-*"), reverse=True):
        if intact(folder):
            return folder
        log(f"warning: {folder} is corrupted or incomplete (checksums do not match); using an earlier checkpoint")
    return None


def load_checkpoint(folder: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.AdamW | None) -> dict:
    weights = load_file(str(folder / "trainable.safetensors"))
    if set(weights) != set(params):
        raise TrainError(f"{folder}: holds {sorted(set(weights) ^ set(params))[:5]} ≠ this run's trainable set")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(D.like(weights[n], p))
    if opt is not None:
        tensors = load_file(str(folder / "optimizer.safetensors"))
        torch.set_rng_state(tensors.pop("__rng__.torch"))
        for key, value in tensors.items():
            name, slot = key.split("::")
            p = params[name]
            opt.state[p][slot] = D.like(value, p) if value.shape == p.shape else value
    return json.loads((folder / "state.json").read_text())


def prune(run: Path, keep: int) -> None:
    for old in sorted((run / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# -- logging -----------------------------------------------------------------------------------------------------------
class Log:
    """A progress line on stderr, metrics as JSONL, and TensorBoard events when `tensorboard` is installed."""

    def __init__(self, run: Path, quiet: bool = False):
        self.metrics = run / "metrics.jsonl"
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tensorboard"))
        except ImportError:
            self.tb = None

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)

    def record(self, step: int, **values) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def progress(self, step: int, total: int, loss: float, lr: float, tok_s: float, started: float) -> None:
        if self.quiet:
            return
        eta = (time.perf_counter() - started) / max(step, 1) * (total - step)
        filled = 24 * step // max(total, 1)
        line = (f"[{'#' * filled}{'.' * (24 - filled)}] step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} "
                f"| {tok_s:,.0f} tok/s | eta {eta / 60:.1f} min")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# -- the run -----------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Run training as configured; returns a summary (steps, last loss, best dev scores, output folder).
    Under `torchrun`, every process runs this; rank 0 logs and writes."""
    cfg.check()
    d = D.setup(cfg.device)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    log = Log(run, quiet or not d.main)
    torch.manual_seed(cfg.seed)

    # the model, and exactly the stage's trainable set
    model = build_model(cfg, d.device)
    params = check_trainable(model, cfg)
    log(f"stage {cfg.stage}: {cfg.model}" + (f" + {cfg.whisper}" if cfg.whisper else "") + (f", {d.world} processes" if d.world > 1 else "")
        + "\n" + trainable_table(model))
    processor = model.processor

    # data: encoded once; Whisper rows computed once (and cached) unless augmentation changes the audio
    examples, bad = read_manifest(cfg.train, cfg.prompt)
    samples, bad = encode_all(examples, processor, cfg.max_seq_len, cfg.strict, bad)
    if bad:
        log(describe_skipped(bad))
    if not samples:
        raise TrainError(f"{cfg.train}: no usable samples")
    dev: list[Sample] = []
    if cfg.eval:
        dev_examples, dev_bad = read_manifest(cfg.eval, cfg.prompt)
        dev, dev_bad = encode_all(dev_examples, processor, cfg.max_seq_len, cfg.strict, dev_bad)
        if dev_bad:
            log("dev: " + describe_skipped(dev_bad))
    cache = None if cfg.cache == "none" else Path(cfg.cache) if cfg.cache else cache_dir() / "whisper-rows"
    if model.audio_encoder is not None:
        if d.main:  # rank 0 fills the cache; the others then read it
            encoded = fill_audio_rows(model, dev + ([] if cfg.augment.on else samples), cache)
            if encoded:
                log(f"whisper: encoded {encoded} clip(s)" + (f", cached in {cache}" if cache else ""))
        D.barrier(d)
        if not d.main:
            fill_audio_rows(model, dev + ([] if cfg.augment.on else samples), cache)
    if d.main:
        (run / "train_config.json").write_text(cfg.to_json())
    model = D.wrap(model, d, cfg.fsdp)
    params = dict(model.named_parameters()) if cfg.fsdp else params  # FSDP replaced them with sharded ones
    params = {n: params[n] for n in check_trainable(model, cfg)}

    # optimizer, schedule, length: a step is batch_size × grad_accum samples on each of the processes
    per_step = cfg.batch_size * cfg.grad_accum * d.world
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * len(samples) / per_step))
    opt = make_optimizer(params, cfg)

    # resume
    state = {"step": 0, "samples_seen": 0, "best": None}
    if cfg.resume:
        last = latest_intact(run, log)
        if last is not None:
            state = load_checkpoint(last, params, opt)
            log(f"resumed from {last} (step {state['step']})")
    best = state.get("best")

    model.train()
    started, tokens_done = time.perf_counter(), 0
    loss_value = float("nan")
    for step in range(state["step"], total):
        # the step's global batch: the next per_step samples of the seeded order; this rank's micro-batch m is
        # the slice [(m · world + rank) · batch_size, …) of it, so the union over ranks is one process's batch
        micro = [[next_sample(samples, state["samples_seen"] + (m * d.world + d.rank) * cfg.batch_size + i, cfg.seed)
                  for i in range(cfg.batch_size)] for m in range(cfg.grad_accum)]
        if cfg.augment.on:
            micro = [augmented(model, batch, cfg, step, m * d.world + d.rank) for m, batch in enumerate(micro)]
        batches = [to_device(collate(b, processor.pad_token_id), d.device) for b in micro]
        factor = lr_factor(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss_value = accumulate(model, batches, d, scale=d.world if cfg.fsdp else 1)
        if not math.isfinite(loss_value):
            raise TrainError(f"step {step + 1}: the loss is {loss_value}; stopped without saving "
                             f"(the last checkpoint in {run / 'checkpoints'} is intact; try a lower --lr)")
        if not cfg.fsdp:
            D.sync_grads(list(params.values()), d)
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"], state["samples_seen"] = step + 1, state["samples_seen"] + per_step
        tokens_done += sum(int(b["attention_mask"].sum()) for b in batches) * d.world

        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            tok_s = tokens_done / (time.perf_counter() - started)
            log.progress(done, total, loss_value, opt.param_groups[0]["lr"], tok_s, started)
            if d.main:
                log.record(done, loss=loss_value, lr=opt.param_groups[0]["lr"], tokens_per_s=tok_s)
        if dev and (cfg.eval_every and done % cfg.eval_every == 0 or done == total):
            scores = run_eval(model, processor, dev, cfg, d)  # every rank (sharded forwards need them all)
            log(f"eval @ {done}: loss {scores['eval_loss']:.4f}, exact match {scores['exact_match']:.1f}%, "
                f"WER {scores['wer']:.1f}% (n={scores['n']})")
            if d.main:
                log.record(done, **scores)
            if best is None or (scores["exact_match"], -scores["eval_loss"]) > (best["exact_match"], -best["eval_loss"]):
                best = state["best"] = {"step": done, **scores}
                if cfg.keep_best:
                    save_checkpoint(run / "checkpoints" / "best", params, opt, state, d)
        if cfg.save_every and done % cfg.save_every == 0 or done == total:
            save_checkpoint(run / "checkpoints" / f"step-{done:08d}", params, opt, state, d)
            if d.main:
                prune(run, cfg.keep_last)

    # the output: the best checkpoint by dev score, or the last step
    if best is not None and cfg.keep_best and (run / "checkpoints" / "best").is_dir():
        load_checkpoint(run / "checkpoints" / "best", params, None)
        log(f"output: the best dev checkpoint (step {best['step']}, exact match {best['exact_match']:.1f}%)")
    log.close()
    if cfg.fsdp:  # gather the trained tensors, then write them into an unsharded copy of the model
        trained = {n: D.full(p.detach()).cpu() for n, p in params.items()}
        del model, opt, params
        if d.main:
            model = build_model(cfg)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in trained:
                        p.copy_(trained[n])
    if d.main:
        write_output(model, cfg, run)
    D.barrier(d)
    return {"steps": state["step"], "loss": loss_value, "best": best, "out": str(run)}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on the model's device; grid metadata stays on the host (read with .tolist())."""
    if device.type == "cpu":
        return batch
    return {k: v if k.endswith("grid_thw") else v.to(device) for k, v in batch.items()}


def accumulate(model, batches: list[dict], d: D.Dist = D.Dist(), scale: int = 1) -> float:
    """Forward and backward over one step's micro-batches (of this process); each loss is divided by the
    labelled tokens of the whole step on all processes, so the gradient is the mean over them however the
    step is split (`scale`: undoes a gradient average over ranks, FSDP's). Returns that mean loss."""
    n_labels = D.all_sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), d)
    loss_sum = 0.0
    for batch in batches:
        out = model(**batch)
        loss = out.loss_sum * (scale / n_labels)
        if loss.requires_grad:  # a micro-batch that reaches no trainable weight (stage 1 without audio) adds nothing
            loss.backward()
        loss_sum += float(out.loss_sum.detach())
    return D.all_sum(loss_sum, d) / n_labels


def next_sample(samples: list[Sample], index: int, seed: int) -> Sample:
    """The `index`-th sample of the run: epochs of a seeded permutation, so any position can be recomputed."""
    epoch, i = divmod(index, len(samples))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return samples[int(order[i])]


def augmented(model, batch: list[Sample], cfg: TrainConfig, step: int, micro: int) -> list[Sample]:
    """The batch's samples with freshly augmented audio: waveform → log-mel → masks → frozen encoder rows."""
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + micro)
    out = []
    for s in batch:
        if not s.example.audio_sources:
            out.append(s)
            continue
        messages = []
        for m in s.example.messages:
            if isinstance(m["content"], list):
                content = [{**item, "audio": (augment_wave(load_audio(item["audio"]) if not isinstance(item["audio"], tuple)
                                                           else load_audio(*item["audio"]), cfg.augment, g), SAMPLE_RATE)}
                           if isinstance(item, dict) and "audio" in item else item for item in m["content"]]
                m = {**m, "content": content}
            messages.append(m)
        new = encode(Example(messages, s.example.where, s.example.meta), model.processor, cfg.max_seq_len)
        feats = new.media.pop("input_features")
        valid = new.media.pop("audio_valid_frames")
        if cfg.augment.time_masks or cfg.augment.freq_masks:
            feats = spec_augment(feats, valid, cfg.augment, g)
        with torch.no_grad():
            new.audio_rows = model.audio_encoder_rows(feats, valid).float()
        out.append(new)
    return out


@torch.no_grad()
def run_eval(model, processor, dev: list[Sample], cfg: TrainConfig, d: D.Dist = D.Dist()) -> dict:
    """Dev loss (over all dev samples, per labelled token) and greedy exact match / WER (first `eval_limit`)."""
    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    for i in range(0, len(dev), cfg.eval_batch_size):
        out = model(**to_device(collate(dev[i:i + cfg.eval_batch_size], processor.pad_token_id), d.device))
        loss_sum, n = loss_sum + float(out.loss_sum), n + out.n_labels
    scored = dev[: cfg.eval_limit] if cfg.eval_limit else dev
    result = evaluate(model, processor, scored, cfg.eval_batch_size, cfg.max_new_tokens)
    model.train(was_training)
    return {"eval_loss": loss_sum / max(n, 1), "exact_match": result["exact_match"], "wer": result["wer"], "n": result["n"]}


def write_output(model, cfg: TrainConfig, run: Path) -> None:
    """The trained model, loadable by `qva.load(run)`, written atomically with the run's own files kept
    (hard-linked into the new folder, so nothing is lost if the write fails)."""
    with atomic_folder(run) as tmp:
        if cfg.stage == "2":
            base = Path(cfg.model).resolve()
            save_adapter(model, tmp, base)
        else:
            save(model, tmp)
        for name in RUN_FILES:
            src = run / name
            if src.is_dir():
                shutil.copytree(src, tmp / name, copy_function=os.link)
            elif src.is_file():
                os.link(src, tmp / name)
