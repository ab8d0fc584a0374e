"""`qva-train`: train the graft, score a trained model, merge an adapter.

    qva-train --stage 1 --model Qwen2-VL-2B-Instruct --whisper whisper-large-v3-turbo \\
              --train train.jsonl --eval dev.jsonl --out runs/stage1 --steps 2000 --lr 1e-3
    qva-train --stage 2 --model runs/stage1 --train train.jsonl --eval dev.jsonl --out runs/stage2 \\
              --lora-rank 16 --lr 2e-4 --projector-lr 1e-3 --epochs 3
    qva-train --stage lm --model small-qwen2-vl --train text.jsonl --out runs/lm --freeze embeddings --steps 700
    qva-train eval runs/stage2 --data test.jsonl --json      # {"exact_match": ..., "wer": ..., "n": ...}
    qva-train merge runs/stage2 --out merged                 # LoRA folded into the base: one qva.save folder

Also `python -m qva.train ...`. Every bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .augment import AugmentConfig
from .config import DTYPES, FREEZABLE, RESULT_CHANGING, STAGES, TrainConfig, TrainError
from .loop import train
from .stop import Aborted, Preempted

DEFAULTS = TrainConfig(stage="1", model="", train="", out="", steps=1)


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def names(text: str) -> tuple[str, ...]:
    return tuple(t.strip().replace("-", "_") for t in text.split(",") if t.strip())


def train_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="qva-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, required=True, help="1: projector; 2: projector + LoRA; lm: the LLM")
    p.add_argument("--model", required=True, help="Qwen2-VL checkpoint, saved graft, or (stage 2) a stage-1 output")
    p.add_argument("--whisper", help="Whisper checkpoint to graft on (stage 1 on a plain Qwen2-VL)")
    p.add_argument("--train", required=True, help="JSONL manifest")
    p.add_argument("--eval", help="dev JSONL: loss, exact match and WER every --eval-every steps")
    p.add_argument("--out", required=True, help="run folder; holds the trained model at the end")
    p.add_argument("--prompt", default=d.prompt, help="user text for short {'audio', 'text'} lines")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int)
    length.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--projector-lr", type=float, help="stage 2: the projector's own learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--lora-targets", default=",".join(d.lora_targets), help="LLM linear names to adapt")
    p.add_argument("--qlora", action="store_true", help="stages 1/2: the LLM's linear weights in NF4 (QLoRA)")
    p.add_argument("--freeze", action="append", default=[], choices=FREEZABLE, help="stage lm: keep this part frozen")
    p.add_argument("--audio-pool", type=int, default=d.audio_pool, help="fresh graft: encoder frames per audio token")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="storage dtype of the frozen weights")
    p.add_argument("--whisper-dtype", choices=DTYPES, help="the frozen encoder's dtype (default: --dtype)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="several processes: shard the model with FSDP2 per decoder layer")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--strict", action="store_true", help="a bad sample is an error instead of being skipped")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-limit", type=int, help="score the first N dev samples")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--no-keep-best", action="store_true", help="output the last step, not the best dev checkpoint")
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--keep-last", type=int, default=d.keep_last)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last intact checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a previous run (its checkpoints, metrics and output are replaced)")
    p.add_argument("--allow-changes", type=names, default=(),
                   help=f"with --resume: settings that may differ from the run's record, e.g. lr,steps ({', '.join(RESULT_CHANGING)})")
    p.add_argument("--cache", help="Whisper-row cache folder ('none': off; default ~/.cache/qva/whisper-rows)")
    a = AugmentConfig()
    p.add_argument("--speed-perturb", type=floats, default=a.speeds, help="augment: speed factors, e.g. 0.9,1.0,1.1")
    p.add_argument("--noise-snr", type=floats, help="augment: white noise at an SNR drawn from LO,HI dB")
    p.add_argument("--noise-prob", type=float, default=a.noise_prob)
    p.add_argument("--time-masks", type=int, default=a.time_masks, help="augment: SpecAugment time masks per window")
    p.add_argument("--time-mask-width", type=int, default=a.time_mask_width)
    p.add_argument("--freq-masks", type=int, default=a.freq_masks, help="augment: SpecAugment frequency masks per window")
    p.add_argument("--freq-mask-width", type=int, default=a.freq_mask_width)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.noise_snr is not None and len(args.noise_snr) != 2:
        raise TrainError(f"--noise-snr takes LO,HI, got {args.noise_snr}")
    augment = AugmentConfig(
        speeds=tuple(args.speed_perturb), noise_snr=tuple(args.noise_snr) if args.noise_snr else None, noise_prob=args.noise_prob,
        time_masks=args.time_masks, time_mask_width=args.time_mask_width, freq_masks=args.freq_masks,
        freq_mask_width=args.freq_mask_width,
    )
    return TrainConfig(
        stage=args.stage, model=args.model, train=args.train, out=args.out, whisper=args.whisper, eval=args.eval,
        prompt=args.prompt, audio_pool=args.audio_pool, dtype=args.dtype, whisper_dtype=args.whisper_dtype,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=tuple(t for t in args.lora_targets.split(",") if t), qlora=args.qlora, lr=args.lr, projector_lr=args.projector_lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
        seed=args.seed, freeze=tuple(args.freeze), activation_checkpointing=args.activation_checkpointing, fsdp=args.fsdp, device=args.device,
        max_seq_len=args.max_seq_len, strict=args.strict, eval_every=args.eval_every, eval_limit=args.eval_limit,
        eval_batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens, keep_best=not args.no_keep_best,
        save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every, resume=args.resume,
        cache=args.cache, augment=augment, overwrite=args.overwrite, allow_changes=args.allow_changes,
    )


def add_relocation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="the base model of a stage-2 run folder, where it has moved since training")
    p.add_argument("--whisper", help="the Whisper checkpoint a stage-2 run grafted, where it has moved since training")


def load_relocated(args):
    """MODEL (a run folder, an adapter folder or a checkpoint), with --adapter, --base or --whisper applied."""
    from ..pretrained import load

    if getattr(args, "adapter", None) and args.base:
        raise TrainError("give --adapter (MODEL is the base) or --base (MODEL is the run folder), not both")
    if args.base:
        return load(args.base, adapter=args.model, whisper=args.whisper)
    return load(args.model, adapter=getattr(args, "adapter", None), whisper=args.whisper)


def eval_main(argv: list[str]) -> int:
    """`qva-train eval DIR --data test.jsonl [--json]`: exact match and WER of greedy answers."""
    import torch

    from .data import describe_skipped, encode_all, fill_audio_rows, read_manifest
    from .evaluate import evaluate

    p = argparse.ArgumentParser(prog="qva-train eval", description=eval_main.__doc__)
    p.add_argument("model", help="a trained model (a run folder) or any qva checkpoint")
    p.add_argument("--data", required=True, help="JSONL manifest")
    p.add_argument("--prompt", help="user text for short lines (default: the prompt the run was trained with)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, help="score the first N samples")
    p.add_argument("--cache", help="Whisper-row cache folder ('none': off)")
    add_relocation_flags(p)
    args = p.parse_args(argv)
    run_cfg = Path(args.model) / "train_config.json"
    prompt = args.prompt or (TrainConfig.from_json(run_cfg.read_text()).prompt if run_cfg.is_file() else None)
    model = load_relocated(args)
    if model.processor is None:
        raise TrainError(f"{args.model}: no tokenizer.json")
    examples, bad = read_manifest(args.data, prompt)
    samples, bad = encode_all(examples[: args.limit] if args.limit else examples, model.processor, model.config.text.max_position_embeddings,
                              bad=bad)
    if bad:
        print(describe_skipped(bad), file=sys.stderr)
    if model.audio_encoder is not None:
        from ..demo import cache_dir

        fill_audio_rows(model, samples, None if args.cache == "none" else Path(args.cache) if args.cache else cache_dir() / "whisper-rows")
    with torch.inference_mode():
        result = evaluate(model, model.processor, samples, args.batch_size, args.max_new_tokens)
    summary = {"exact_match": result["exact_match"], "wer": result["wer"], "n": result["n"]}
    print(json.dumps(summary) if args.json else f"exact match {summary['exact_match']:.1f}%, WER {summary['wer']:.1f}% (n={summary['n']})")
    return 0


def merge_main(argv: list[str]) -> int:
    """`qva-train merge DIR --out OUT`: fold a run's LoRA adapter into its base; write one qva.save folder."""
    from ..linear import lora_linears, merge_lora
    from ..pretrained import save

    p = argparse.ArgumentParser(prog="qva-train merge", description=merge_main.__doc__)
    p.add_argument("model", help="a stage-2 run folder (or base + --adapter)")
    p.add_argument("--adapter", help="an adapter folder to apply to MODEL")
    p.add_argument("--out", required=True, help="a new or empty folder (or one merge wrote before)")
    add_relocation_flags(p)
    args = p.parse_args(argv)
    model = load_relocated(args)
    linears = lora_linears(model)
    if not linears:
        raise TrainError(f"{args.model}: no LoRA adapter to merge")
    for linear in linears.values():
        merge_lora(linear)
    save(model, args.out)
    print(f"merged {len(linears)} LoRA layers into {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from weights_loader import CheckpointError
    from weights_loader.writer import WriteError

    from ..audio import AudioError
    from .data import DataError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["eval"]:
            return eval_main(argv[1:])
        if argv[:1] == ["merge"]:
            return merge_main(argv[1:])
        cfg = config_from_args(train_parser().parse_args(argv))
        summary = train(cfg)
        print(json.dumps(summary))
    except Preempted as e:
        print(f"qva-train: {e}\nresume with: {resume_command(argv)}", file=sys.stderr)
        return 128 + e.signum
    except Aborted as e:
        print(f"qva-train: {e}; the last intact checkpoint is kept", file=sys.stderr)
        return 128 + e.signum
    except (TrainError, DataError, CheckpointError, AudioError, WriteError, ValueError, FileNotFoundError) as e:
        print(f"qva-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments with --resume (and without --overwrite)."""
    import os
    import shlex

    args = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "the same torchrun command with these arguments: " + shlex.join(args)
    return shlex.join(["qva-train", *args])
