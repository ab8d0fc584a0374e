"""Training the graft: `qva-train` (`python -m qva.train`), or `qva.train.loop.train(TrainConfig(...))`.

    loop.py      stages, freezing, optimizer and schedule, checkpoints and resume, the run itself
    data.py      JSONL manifests → samples with labels on assistant spans → batches; Whisper-row cache
    augment.py   speed perturbation, noise, SpecAugment masks
    evaluate.py  greedy answers, exact match, WER
    cli.py       the command line

Inference never imports this package.
"""
