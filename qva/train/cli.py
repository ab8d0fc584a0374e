"""`qva-train`: train the graft, score a trained model, merge an adapter.

    qva-train --stage 1 --model Qwen2-VL-2B-Instruct --whisper whisper-large-v3-turbo \\
              --train train.jsonl --eval dev.jsonl --out runs/stage1 --steps 2000 --lr 1e-3
    qva-train --stage 2 --model runs/stage1 --train train.jsonl --eval dev.jsonl --out runs/stage2 \\
              --lora-rank 16 --lr 2e-4 --projector-lr 1e-3 --epochs 3
    qva-train --stage lm --model small-qwen2-vl --train text.jsonl --out runs/lm --freeze embeddings --steps 700
    qva-train eval runs/stage2 --data test.jsonl --json      # {"exact_match": ..., "wer": ..., "cer": ..., "n": ...}
    qva-train merge runs/stage2 --out merged                 # LoRA folded into the base: one qva.save folder

Also `python -m qva.train ...`. Every bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_common import add_arguments, one_line_errors
from .augment import AugmentConfig
from .config import TrainConfig, TrainError
from .data import DataError
from .loop import train
from .stop import Aborted, Preempted


def train_parser() -> argparse.ArgumentParser:
    """The training flags: one per `TrainConfig` / `AugmentConfig` field (`qva/train/config.py` holds the help)."""
    p = argparse.ArgumentParser(prog="qva-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, TrainConfig)
    add_arguments(p.add_argument_group("audio augmentation (off by default)"), AugmentConfig)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.from_args(args)


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
    """`qva-train eval DIR --data test.jsonl [--data other.parquet ...] [--json]`: exact match, WER and CER (both
    after English normalisation) of greedy answers, per set."""
    import torch

    from .data import describe_skipped, encode_all, fill_audio_rows
    from .evaluate import evaluate
    from .formats import FORMATS, read_data

    p = argparse.ArgumentParser(prog="qva-train eval", description=eval_main.__doc__)
    p.add_argument("model", help="a trained model (a run folder) or any qva checkpoint")
    p.add_argument("--data", required=True, action="append",
                   help="a dataset in any --train format (repeatable: each set scored on its own)")
    p.add_argument("--data-format", default="auto", choices=FORMATS, help="format of --data (auto: detected from the content)")
    p.add_argument("--audio-column", default="audio", help="parquet / Arrow: the audio column")
    p.add_argument("--text-column", default="text", help="parquet / Arrow: the transcript column")
    p.add_argument("--prompt", help="user text for short lines (default: the prompt the run was trained with)")
    p.add_argument("--json", action="store_true", help="print one JSON object (several --data: {\"sets\": {data: scores}})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, help="score the first N samples of each set")
    p.add_argument("--cache", help="Whisper-row cache folder ('none': off)")
    add_relocation_flags(p)
    args = p.parse_args(argv)
    run_cfg = Path(args.model) / "train_config.json"
    prompt = args.prompt or (TrainConfig.from_json(run_cfg.read_text()).prompt if run_cfg.is_file() else None)
    model = load_relocated(args)
    if model.processor is None:
        raise TrainError(f"{args.model}: no tokenizer.json")
    sets = {}
    for data in args.data:
        examples, bad = read_data(data, prompt, args.data_format, args.audio_column, args.text_column)
        samples, bad = encode_all(examples[: args.limit] if args.limit else examples, model.processor,
                                  model.config.text.max_position_embeddings, bad=bad)
        if bad:
            print(describe_skipped(bad), file=sys.stderr)
        if model.audio_encoder is not None:
            from ..demo import cache_dir

            fill_audio_rows(model, samples, None if args.cache == "none" else Path(args.cache) if args.cache else cache_dir() / "whisper-rows")
        with torch.inference_mode():
            result = evaluate(model, model.processor, samples, args.batch_size, args.max_new_tokens)
        sets[data] = {k: result[k] for k in ("exact_match", "wer", "cer", "wer_plain", "n")}
    if args.json:
        print(json.dumps(next(iter(sets.values())) if len(sets) == 1 else {"sets": sets}))
    else:
        for data, s in sets.items():
            print((f"{data}: " if len(sets) > 1 else "") + f"exact match {s['exact_match']:.1f}%, WER {s['wer']:.1f}%, "
                  f"CER {s['cer']:.1f}% (n={s['n']})")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        return one_line_errors("qva-train", eval_main, argv[1:], errors=(TrainError, DataError))
    if argv[:1] == ["merge"]:
        return one_line_errors("qva-train", merge_main, argv[1:], errors=(TrainError, DataError))
    return one_line_errors("qva-train", train_main, argv, errors=(TrainError, DataError))


def train_main(argv: list[str]) -> int:
    try:
        summary = train(config_from_args(train_parser().parse_args(argv)))
    except Preempted as e:
        print(f"qva-train: {e}\nresume with: {resume_command(argv)}", file=sys.stderr)
        return 128 + e.signum
    except Aborted as e:
        print(f"qva-train: {e}; the last intact checkpoint is kept", file=sys.stderr)
        return 128 + e.signum
    print(json.dumps(summary))
    return 0


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments with --resume (and without --overwrite)."""
    import os
    import shlex

    args = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "the same torchrun command with these arguments: " + shlex.join(args)
    return shlex.join(["qva-train", *args])
