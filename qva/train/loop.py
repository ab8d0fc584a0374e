"""Teaching the graft to hear: stage 1 (projector), stage 2 (projector + LoRA), stage lm (the whole LLM).

    stage 1   trains `audio_projector` only; vision, Whisper and the LLM are frozen (audio learns to look
              like text the LLM already reads)
    stage 2   trains the projector and LoRA factors on the LLM's linears (`linear.add_lora`); with `qlora`
              those linears are stored in NF4 (`linear.NF4Linear`), and the adapter applies to the
              unquantized base afterwards (what `qva.load(out)` does)
    stage lm  trains the LLM's weights (text or media; vision and Whisper frozen), `freeze` parts excepted

`train(cfg)` reads top to bottom: the run folder claimed (`run.py`) → model and the stage's trainable set
(`stages.py`, checked against the stage's rule before anything runs) → data (bad samples skipped and named; Whisper rows computed once and cached) →
AdamW (no decay on norms and biases) with warmup + cosine → resume from the last intact checkpoint →
steps (gradient accumulation, loss normalised by the labelled tokens of the whole step, clipping), with
evaluation (loss, exact match, WER), best-by-dev kept, checkpoints every N steps (`checkpoints.py`), a clean
stop on SIGTERM / SIGINT (`stop.py`) → the final output:
a `qva.save` folder (stages 1 and lm) or a PEFT-layout adapter beside the projector (stage 2), both loaded
by `qva.load(out)`.

A run folder holds, besides that output, `train_config.json` (the settings, the prompt among them),
`metrics.jsonl`, `checkpoints/step-N/` (trainable weights, optimizer state by parameter name, step, data
position, RNG state; a checksum manifest written last) and `checkpoints/best/`. On CPU in fp32, a resumed
run's losses and weights equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from ..demo import cache_dir
from . import dist as D
from .augment import augmented
from .checkpoints import latest_intact, load_checkpoint, prune, save_checkpoint
from .config import DTYPES, FREEZABLE, STAGES, TrainConfig, TrainError  # noqa: F401  (re-exported: qva.train.loop.TrainConfig)
from .data import Sample, check_max_seq_len, collate, describe_skipped, encode_all, epoch_order, fill_audio_rows, to_device
from .evaluate import run_eval
from .formats import read_data
from .log import Log
from .run import claim, write_output
from .stages import build_model, check_trainable, lr_factor, make_optimizer, trainable_table
from .stop import Preempted, StopFlag
from .stream import Stream


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
        D.teardown(d)


def _train(cfg: TrainConfig, d: D.Dist, run: Path, log: "Log", stop: StopFlag, owned) -> dict:
    for note in owned.notes if owned is not None else ():
        log(note)
    torch.manual_seed(cfg.seed)

    # the model, and exactly the stage's trainable set
    model = build_model(cfg, d.device)
    params = check_trainable(model, cfg)
    log(
        f"stage {cfg.stage}: {cfg.model}"
        + (f" + {cfg.whisper}" if cfg.whisper else "")
        + (f", {d.world} processes" if d.world > 1 else "")
        + "\n"
        + trainable_table(model)
    )
    check_max_seq_len(cfg.max_seq_len, model.config.text.max_position_embeddings)

    samples, dev = load_data(cfg, model, d, log)
    model = D.wrap(model, d, cfg.fsdp)
    params = dict(model.named_parameters()) if cfg.fsdp else params  # FSDP replaced them with sharded ones
    params = {n: params[n] for n in check_trainable(model, cfg)}

    # optimizer, schedule, length: a step is batch_size × grad_accum samples on each of the processes
    per_step = cfg.batch_size * cfg.grad_accum * d.world
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * len(samples) / per_step))  # a stream: --steps
    opt = make_optimizer(params, cfg)
    state = resume(cfg, run, params, opt, d, log)
    best = state.get("best")

    model.train()
    started, tokens_done = time.perf_counter(), 0
    loss_value = float("nan")
    for step in range(state["step"], total):
        batches = step_batches(cfg, model, samples, state["samples_seen"], step, d)
        if isinstance(samples, Stream) and D.all_sum(float(any(b is None for b in batches)), d):
            log(f"step {step + 1}: a micro-batch had no usable sample; step skipped (on every process)")
            state["step"], state["samples_seen"] = step + 1, state["samples_seen"] + per_step
            continue
        factor = lr_factor(step, total, cfg)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss_value = accumulate(model, batches, d, scale=d.world if cfg.fsdp else 1)
        if not math.isfinite(loss_value):
            raise TrainError(
                f"step {step + 1}: the loss is {loss_value}; stopped without saving "
                f"(the last checkpoint in {run / 'checkpoints'} is intact; try a lower --lr)"
            )
        if not cfg.fsdp:
            D.sync_grads(list(params.values()), d)
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if D.all_sum(float(not D.finite(params.values())), d):  # checked before anything is saved from it
            raise TrainError(
                f"step {step + 1}: the update made the trainable weights non-finite (loss {loss_value:.4g}); "
                f"stopped without saving (the last checkpoint in {run / 'checkpoints'} is intact; try a lower --lr)"
            )
        state["step"], state["samples_seen"] = step + 1, state["samples_seen"] + per_step
        tokens_done += sum(int(b["attention_mask"].sum()) for b in batches) * d.world

        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            tok_s = tokens_done / (time.perf_counter() - started)
            log.progress(done, total, loss_value, opt.param_groups[0]["lr"], tok_s, started)
            if d.main:
                log.record(done, loss=loss_value, lr=opt.param_groups[0]["lr"], tokens_per_s=tok_s)
        if any(dev.values()) and (cfg.eval_every and done % cfg.eval_every == 0 or done == total):
            best = evaluate_and_keep_best(cfg, model, dev, done, best, state, params, opt, run, d, log)
        stopping = D.all_sum(float(stop.signum is not None), d) > 0  # every rank stops after the same step
        if cfg.save_every and done % cfg.save_every == 0 or done == total or stopping:
            save_checkpoint(run / "checkpoints" / f"step-{done:08d}", params, opt, state, d)
            if d.main:
                prune(run, cfg.keep_last)
        if stopping:
            log.close()
            raise Preempted(
                f"stopped by {stop.name or 'a signal on another rank'} after step {done} of {total}; "
                f"checkpoint {run / 'checkpoints' / f'step-{done:08d}'}",
                stop.signum or 15,
            )

    if isinstance(samples, Stream) and samples.unusable:
        log(f"stream: {samples.unusable} row(s) or sample(s) could not be used (skipped)")
    # the output: the best checkpoint by dev score, or the last step, written by rank 0
    if best is not None and cfg.keep_best and (run / "checkpoints" / "best").is_dir():
        load_checkpoint(run / "checkpoints" / "best", params, None)
        log(f"output: the best dev checkpoint (step {best['step']}, exact match {best['exact_match']:.1f}%)")
    log.close()
    if cfg.fsdp:  # the trained tensors gathered, the sharded model freed, then an unsharded copy on rank 0
        trained = {n: D.full(p.detach()).cpu() for n, p in params.items()}
        del model, opt, params
        model = unsharded(cfg, trained) if d.main else None
    if d.main:
        graft = {"whisper": cfg.whisper, "audio_frames": cfg.audio_frames, "audio_pool": cfg.audio_pool} if cfg.whisper else None
        write_output(model, cfg, run, graft)
    D.barrier(d)
    return {"steps": state["step"], "loss": loss_value, "best": best, "out": str(run)}


# -- the parts of a run, in the order `_train` calls them ----------------------------------------------------------------
def load_data(cfg: TrainConfig, model, d: D.Dist, log) -> tuple[list[Sample] | Stream, dict[str, list[Sample]]]:
    """Training samples (or, with `stream`, a `Stream` that reads them as they are drawn) and each dev set's,
    encoded once (bad ones skipped and named); Whisper rows computed once (and cached) unless augmentation
    changes the audio or the samples stream."""
    processor = model.processor
    if cfg.stream:
        samples = Stream(cfg, processor, model.config.text.max_position_embeddings, log)
    else:
        examples, bad = read_data(cfg.train_data, cfg.prompt, cfg.data_format, cfg.audio_column, cfg.text_column)
        samples, bad = encode_all(examples, processor, cfg.max_seq_len, cfg.strict, bad)
        if bad:
            log(describe_skipped(bad))
        if not samples:
            raise TrainError(f"{cfg.train_data}: no usable samples")
    dev: dict[str, list[Sample]] = {}
    for name in cfg.eval_sets:
        dev_examples, dev_bad = read_data(name, cfg.prompt, cfg.data_format, cfg.audio_column, cfg.text_column)
        dev[name], dev_bad = encode_all(dev_examples, processor, cfg.max_seq_len, cfg.strict, dev_bad)
        if dev_bad:
            log(f"dev {name}: " + describe_skipped(dev_bad))
    every_dev = [s for part in dev.values() for s in part]
    cache = None if cfg.rows_cache == "none" else Path(cfg.rows_cache) if cfg.rows_cache else cache_dir() / "whisper-rows"
    if model.audio_encoder is not None:
        # training clips are re-encoded each step when augmentation changes their audio, and a stream encodes its own
        to_encode = every_dev + ([] if cfg.augment.reencodes or cfg.stream else samples)
        if d.main:  # rank 0 fills the cache; the others then read it
            encoded = fill_audio_rows(model, to_encode, cache, log=log)
            if encoded:
                log(f"whisper: encoded {encoded} clip(s)" + (f", cached in {cache}" if cache else ""))
        D.barrier(d)
        if not d.main:
            fill_audio_rows(model, to_encode, cache, log=log)
    return samples, dev


def resume(cfg: TrainConfig, run: Path, params: dict, opt, d: D.Dist, log) -> dict:
    """The run's position: step 0, or (with `resume`) the last intact checkpoint's, its weights and optimizer loaded."""
    state = {"step": 0, "samples_seen": 0, "best": None}
    if cfg.resume:
        last = latest_intact(run, log)
        if last is not None:
            state = load_checkpoint(last, params, opt, d.rank)
            log(f"resumed from {last} (step {state['step']})")
        else:
            log(f"--resume: no intact checkpoint in {run / 'checkpoints'}; starting from step 0")
    return state


def step_batches(cfg: TrainConfig, model, samples: list[Sample] | Stream, samples_seen: int, step: int, d: D.Dist) -> list[dict | None]:
    """This process's micro-batches of one step, on its device. The step's global batch is the next
    batch_size × grad_accum × world samples of the seeded order; micro-batch m of this rank is the slice
    [(m · world + rank) · batch_size, …) of it, so the union over ranks is one process's batch. A stream's
    unusable samples are dropped; a micro-batch left with none is None."""
    bucket = cfg.batch_size if cfg.bucket_by_length else None
    indices = [[samples_seen + (m * d.world + d.rank) * cfg.batch_size + i for i in range(cfg.batch_size)] for m in range(cfg.grad_accum)]
    if isinstance(samples, Stream):  # its audio goes to the model as log-mel windows: the forward runs the frozen encoder
        micro = [[s for s in map(samples.take, batch) if s is not None] for batch in indices]
    else:
        micro = [[next_sample(samples, j, cfg.seed, bucket) for j in batch] for batch in indices]
    if cfg.augment.on:
        micro = [augmented(model, batch, cfg.augment, cfg.seed, step, m * d.world + d.rank) for m, batch in enumerate(micro)]
    return [to_device(collate(b, model.processor.pad_token_id), d.device) if b else None for b in micro]


def evaluate_and_keep_best(
    cfg: TrainConfig, model, dev: dict[str, list[Sample]], done: int, best: dict | None, state: dict, params: dict, opt, run: Path,
    d: D.Dist, log
) -> dict | None:
    """Each dev set's scores at step `done` (on every rank: sharded forwards need them all), logged and recorded (the
    first set's flat, as with one set; with several, every set's under "sets"); the best so far by the first set's
    (exact match, -loss) is kept in `checkpoints/best/`. Returns the best."""
    every = {}
    for name, samples in dev.items():
        if not samples:
            continue
        every[name] = run_eval(model, model.processor, samples, cfg.eval_batch_size, cfg.max_new_tokens, cfg.eval_limit, d.device)
        sc = every[name]
        label = f" {name}" if len(dev) > 1 else ""
        log(f"eval{label} @ {done}: loss {sc['eval_loss']:.4f}, exact match {sc['exact_match']:.1f}%, WER {sc['wer']:.1f}% (n={sc['n']})")
    scores = next(iter(every.values()))
    if d.main:
        log.record(done, **scores, **({"sets": every} if len(dev) > 1 else {}))
    if best is None or (scores["exact_match"], -scores["eval_loss"]) > (best["exact_match"], -best["eval_loss"]):
        best = state["best"] = {"step": done, **scores}
        if cfg.keep_best:
            save_checkpoint(run / "checkpoints" / "best", params, opt, state, d)
    return best


def unsharded(cfg: TrainConfig, trained: dict[str, torch.Tensor]):
    """A fresh, unsharded model holding the gathered trained tensors (what FSDP's rank 0 writes out)."""
    model = build_model(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in trained:
                p.copy_(trained[n])
    return model


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


def next_sample(samples: list[Sample], index: int, seed: int, bucket: int | None = None) -> Sample:
    """The `index`-th sample of the run: epochs of a seeded order (`data.epoch_order`: a permutation, or with
    `bucket` (the batch size) batches of similar length), a function of (seed, epoch) only, so any position can
    be recomputed (resume)."""
    epoch, i = divmod(index, len(samples))
    return samples[epoch_order(samples, seed, epoch, bucket)[i]]
