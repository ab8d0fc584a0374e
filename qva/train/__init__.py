"""Training the graft: `qva-train` (`python -m qva.train`), or `qva.train.loop.train(TrainConfig(...))`.

    config.py       the settings (TrainConfig: each field is a flag), checked, compared on resume
    run.py          the run folder: claimed, locked, resumed, the output written
    stages.py       what each stage trains, AdamW groups, the schedule
    loop.py         the run itself, top to bottom
    checkpoints.py  step checkpoints: atomic, checked before use
    stop.py         SIGTERM / SIGINT: stop after the step with a checkpoint
    log.py          progress, metrics.jsonl, TensorBoard
    formats.py      ms-swift / LLaMA-Factory (sharegpt, alpaca) / parquet / save_to_disk → the same samples
    normalize.py    English text normalisation for WER / CER
    data.py         JSONL manifests → samples with labels on assistant spans → batches; Whisper-row cache
    augment.py      speed perturbation, noise, SpecAugment masks, masks over the cached encoder rows
    evaluate.py     greedy answers, exact match, WER; the dev scores of a run
    dist.py         torchrun: DDP, FSDP2
    cli.py          the command line (its training flags are TrainConfig's fields)

Inference never imports this package.
"""
