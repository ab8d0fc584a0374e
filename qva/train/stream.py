"""Streaming training data (`--stream`): a dataset read as it is used, never held whole.

    stream = Stream(cfg, processor, context)      # opens nothing yet
    sample = stream.take(index)                    # the run's index-th sample (increasing indices), encoded now

The run's sample sequence is epoch 0, epoch 1, … of the dataset in file order (any `--train` format; parquet and
Arrow one record batch at a time, JSON Lines one line at a time) passed through a **bounded shuffle buffer** of
`--shuffle-buffer` examples: the buffer is filled, then each next row replaces a seeded-random slot whose example
is emitted; at the end of the epoch the rest leave in a seeded-random order. The order is a function of (seed,
epoch, the data) only, so a resumed run recomputes it: the cursor reads forward to the checkpoint's
`samples_seen` without encoding what it passes (bit-exact resume, at the cost of re-reading). Memory holds the
buffer (examples: paths, or a parquet row's audio bytes), one record batch and the step's samples; it does not grow
with the dataset.

Rules:
  - rows that cannot be parsed never get an index (as when the set is read whole); an example that parses but
    cannot be encoded (a corrupt clip, too many tokens) is dropped from its micro-batch when it is drawn — the same
    in a resumed run, since it keeps its index; a step in which some micro-batch is left empty is skipped on every
    process; the first few are named, all counted (`--strict`: an error)
  - each process reads the whole stream and encodes only the samples of its slice of every step
  - the run's length is `--steps` (a stream's length is not known before it is read); `--bucket-by-length`
    needs the whole set and is refused
  - a streamed sample's audio reaches the model as log-mel windows, and the forward runs the frozen encoder on them
    (the Whisper-row cache holds a whole set's rows; a stream's are computed as they are drawn; under FSDP the
    encoder's weights are sharded and only the forward may use them)
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

from .data import DataError, Example, Sample, encode
from .formats import iter_data

SHOWN = 3  # unusable samples named in the log; the rest are counted


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """`items` through a shuffle buffer of `size` slots: at most `size` items held at once."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class Stream:
    """The run's samples, read from `cfg.train_data` as they are asked for (see the module docstring)."""

    def __init__(self, cfg, processor, context: int | None = None, log: Callable[[str], None] = print):
        self.cfg, self.processor, self.context, self.log = cfg, processor, context, log
        self.position = 0  # the index of the next example `_examples` yields
        self.epoch = -1
        self._examples: Iterator[Example] = iter(())
        self.unusable = 0  # rows that did not parse and samples that did not encode, in the first epoch read
        self.epoch_rows: int | None = None  # examples in one epoch, once the first has been read through

    def _epoch(self, epoch: int) -> Iterator[Example]:
        cfg = self.cfg
        rows = iter_data(cfg.train_data, cfg.prompt, cfg.data_format, cfg.audio_column, cfg.text_column)

        def parsed() -> Iterator[Example]:
            n = 0
            for item in rows:
                if isinstance(item, Example):
                    n += 1
                    yield item
                else:
                    self._unusable(*item)
            if n == 0:
                raise DataError(f"{cfg.train_data}: no usable samples")
            self.epoch_rows = n

        return shuffled(parsed(), cfg.shuffle_buffer, random.Random(cfg.seed * 100_003 + epoch))

    def _next(self) -> Example:
        while True:
            try:
                example = next(self._examples)
                self.position += 1
                return example
            except StopIteration:
                self.epoch += 1
                self._examples = self._epoch(self.epoch)

    def take(self, index: int) -> Sample | None:
        """The run's `index`-th sample, encoded; None when it cannot be encoded (named once). Indices must not
        decrease within a process."""
        if index < self.position:
            raise ValueError(f"stream at {self.position}: sample {index} has passed (indices must not decrease)")
        while self.position < index:
            self._next()
        example = self._next()
        try:
            return encode(example, self.processor, self.cfg.max_seq_len, self.context)
        except DataError as e:
            if self.cfg.strict:
                raise
            self._unusable(example.where, str(e).removeprefix(f"{example.where}: "))
            return None

    def _unusable(self, where: str, why: str) -> None:
        if self.cfg.strict:
            raise DataError(f"{where}: {why}")
        if self.epoch == 0:  # each bad row once, however many epochs pass over it
            self.unusable += 1
            if self.unusable <= SHOWN:
                self.log(f"skipped {where}: {why} (--strict makes this an error)" + ("; further ones are counted" if self.unusable == SHOWN else ""))
