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

import json
import math
import sys
import time
from pathlib import Path

import torch

from ..audio import SAMPLE_RATE, load_audio
from ..demo import cache_dir
from ..inputs import ModelInputs
from ..linear import add_lora, lora_linears
from ..pretrained import load
from . import dist as D
from .augment import augment_wave, spec_augment
from .checkpoints import latest_intact, load_checkpoint, prune, save_checkpoint
from .config import DTYPES, FREEZABLE, STAGES, TrainConfig, TrainError  # noqa: F401  (re-exported: qva.train.loop.TrainConfig)
from .data import Example, Sample, check_max_seq_len, collate, describe_skipped, encode, encode_all, fill_audio_rows, read_manifest
from .evaluate import evaluate
from .run import claim, write_output
from .stop import Preempted, StopFlag


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


# -- logging -----------------------------------------------------------------------------------------------------------
class Log:
    """A progress line on stderr, metrics as JSONL, and TensorBoard events when `tensorboard` is installed."""

    def __init__(self, run: Path, quiet: bool = False, tensorboard: bool = True):
        self.metrics = run / "metrics.jsonl"
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tensorboard"))
            except ImportError:
                pass

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
    Under `torchrun`, every process runs this; rank 0 logs and writes. SIGTERM / SIGINT stop it after the
    current step with a checkpoint (`Preempted`); a second signal aborts at once."""
    cfg.check()
    d = D.setup(cfg.device)
    run = Path(cfg.out).absolute()
    # the run folder: refused unless new, empty or this run's; locked; settings recorded (rank 0)
    owned = claim(cfg, log=lambda text: print(text, file=sys.stderr)) if d.main else None
    D.barrier(d)
    try:
        with StopFlag() as stop:
            return _train(cfg, d, run, Log(run, quiet or not d.main, tensorboard=d.main), stop, owned)
    finally:
        if owned is not None:
            owned.release()


def _train(cfg: TrainConfig, d: D.Dist, run: Path, log: "Log", stop: StopFlag, owned) -> dict:
    for note in owned.notes if owned is not None else ():
        log(note)
    torch.manual_seed(cfg.seed)

    # the model, and exactly the stage's trainable set
    model = build_model(cfg, d.device)
    params = check_trainable(model, cfg)
    log(f"stage {cfg.stage}: {cfg.model}" + (f" + {cfg.whisper}" if cfg.whisper else "") + (f", {d.world} processes" if d.world > 1 else "")
        + "\n" + trainable_table(model))
    processor = model.processor
    check_max_seq_len(cfg.max_seq_len, model.config.text.max_position_embeddings)

    # data: encoded once; Whisper rows computed once (and cached) unless augmentation changes the audio
    examples, bad = read_manifest(cfg.train_data, cfg.prompt)
    samples, bad = encode_all(examples, processor, cfg.max_seq_len, cfg.strict, bad)
    if bad:
        log(describe_skipped(bad))
    if not samples:
        raise TrainError(f"{cfg.train_data}: no usable samples")
    dev: list[Sample] = []
    if cfg.eval_data:
        dev_examples, dev_bad = read_manifest(cfg.eval_data, cfg.prompt)
        dev, dev_bad = encode_all(dev_examples, processor, cfg.max_seq_len, cfg.strict, dev_bad)
        if dev_bad:
            log("dev: " + describe_skipped(dev_bad))
    cache = None if cfg.rows_cache == "none" else Path(cfg.rows_cache) if cfg.rows_cache else cache_dir() / "whisper-rows"
    if model.audio_encoder is not None:
        if d.main:  # rank 0 fills the cache; the others then read it
            encoded = fill_audio_rows(model, dev + ([] if cfg.augment.on else samples), cache, log=log)
            if encoded:
                log(f"whisper: encoded {encoded} clip(s)" + (f", cached in {cache}" if cache else ""))
        D.barrier(d)
        if not d.main:
            fill_audio_rows(model, dev + ([] if cfg.augment.on else samples), cache, log=log)
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
            state = load_checkpoint(last, params, opt, d.rank)
            log(f"resumed from {last} (step {state['step']})")
        else:
            log(f"--resume: no intact checkpoint in {run / 'checkpoints'}; starting from step 0")
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
        if D.all_sum(float(not D.finite(params.values())), d):  # checked before anything is saved from it
            raise TrainError(f"step {step + 1}: the update made the trainable weights non-finite (loss {loss_value:.4g}); "
                             f"stopped without saving (the last checkpoint in {run / 'checkpoints'} is intact; try a lower --lr)")
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
        stopping = D.all_sum(float(stop.signum is not None), d) > 0  # every rank stops after the same step
        if cfg.save_every and done % cfg.save_every == 0 or done == total or stopping:
            save_checkpoint(run / "checkpoints" / f"step-{done:08d}", params, opt, state, d)
            if d.main:
                prune(run, cfg.keep_last)
        if stopping:
            log.close()
            raise Preempted(f"stopped by {stop.name or 'a signal on another rank'} after step {done} of {total}; "
                            f"checkpoint {run / 'checkpoints' / f'step-{done:08d}'}", stop.signum or 15)

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
        graft = {"whisper": cfg.whisper, "audio_frames": cfg.audio_frames, "audio_pool": cfg.audio_pool} if cfg.whisper else None
        write_output(model, cfg, run, graft)
    D.barrier(d)
    return {"steps": state["step"], "loss": loss_value, "best": best, "out": str(run)}


def to_device(batch: ModelInputs, device: torch.device) -> ModelInputs:
    """The batch on the model's device; grid metadata stays on the host (read with .tolist())."""
    return batch if device.type == "cpu" else batch.to(device)


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
        # a slowed-down clip is longer than the sample that passed --max-seq-len: the model's context bounds it
        new = encode(Example(messages, s.example.where, s.example.meta), model.processor, model.config.text.max_position_embeddings)
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
