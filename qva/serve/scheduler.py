"""Continuous batching: one thread drives the engine; requests join and leave between decode steps.

    submit(job) ─► waiting (bounded: QueueFull when full) ─► a free engine row: prefill (encoders + prompt)
                                                              ─► decode steps, all rows together ─► job.emit

Each loop: drop cancelled jobs (a disconnected client's row is freed before the next step), prefill
waiting jobs into free rows (lowest first, so decode steps stay over as few rows as possible), then one
decode step over the rows up to the highest busy one. Every job samples with its own settings and
generator (`sampling.sample_next`, the same function offline `generate` uses), so a greedy answer is the
one `generate` gives for the same prompt, whatever else is in the batch.

A job is one prompt: a chat request, or one window of a transcription. Jobs talk back through
`job.emit(kind, value)` from this thread: ("token", id), ("done", finish reason
"stop" | "length"), ("error", exception). The HTTP side turns those into text and responses.

Shutting down (`drain`): jobs run on until the grace period ends; then every running and waiting job is
finished with "length" (its answer cut short, as by max_tokens), so each response ends cleanly.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine import Engine
from ..sampling import SamplingParams, sample_next
from .metrics import Stats


class QueueFull(Exception):
    pass


@dataclass
class Job:
    inputs: dict  # the processor's tensors: input_ids [1, S], attention_mask, media
    sampling: SamplingParams  # how its tokens are chosen; max_new_tokens is its token budget
    eos: set[int]
    emit: Callable[[str, object], None]
    logprobs: bool = False  # keep the sum of the chosen tokens' log-probabilities (transcription's avg_logprob)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    # set by the scheduler
    produced: int = 0
    logprob_sum: float = 0.0
    last: int = 0
    history: torch.Tensor | None = None
    generator: torch.Generator | None = None

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


class Scheduler:
    def __init__(self, model, max_batch: int, max_len: int, max_queue: int, compile: bool = False):
        self.engine = Engine(model, max_batch, max_len, compile)
        self.max_queue = max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: dict[int, Job] = {}  # engine row → job
        self.cond = threading.Condition()
        self.stats = Stats()
        self.heartbeat = time.monotonic()  # last time the loop made progress
        self.error: BaseException | None = None  # what stopped the loop, if anything did
        self.stopping = False
        self.cutoff: float | None = None  # when draining: the time at which every job is finished
        self.thread = threading.Thread(target=self._run, name="qva-engine", daemon=True)
        self.thread.start()

    # -- called from the HTTP side ----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue jobs together (all or none): the engine thread sees them at once, so they are prefilled into free
        rows before the next decode step and decoded as one batch (a transcription's windows)."""
        with self.cond:
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.extend(jobs)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self.cond:
            self.cond.notify()

    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def stuck(self, after: float) -> bool:
        """The loop died, or has work and has not moved for `after` seconds."""
        return self.error is not None or not self.thread.is_alive() or (self.busy() and time.monotonic() - self.heartbeat > after)

    def drain(self, timeout: float) -> None:
        """Finish every job, running or waiting, `timeout` seconds from now (sooner if they end by themselves)."""
        with self.cond:
            self.cutoff = time.monotonic() + timeout
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    # -- the engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not (self.waiting or self.active or self.stopping):
                        self.cond.wait()
                        self.heartbeat = time.monotonic()
                    if self.stopping:
                        return
                self.heartbeat = time.monotonic()
                self._drop_cancelled()
                if self.cutoff is not None and time.monotonic() >= self.cutoff:
                    self._cut()
                    continue
                self._admit()
                if self.active:
                    self._step()
        except BaseException as e:  # a bug, or the device failing: fail every job, report stuck
            self.error = e
            for job in list(self.active.values()) + list(self.waiting):
                job.emit("error", e)
            raise

    def _drop_cancelled(self) -> None:
        for row, job in list(self.active.items()):
            if job.cancelled:
                self._finish(row, None)
        with self.cond:
            self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)

    def _cut(self) -> None:
        """The grace period is over: every job ends now, with "length"."""
        for row in list(self.active):
            self._finish(row, "length")
        with self.cond:
            waiting, self.waiting = list(self.waiting), collections.deque()
        for job in waiting:
            job.emit("done", "length")

    def _admit(self) -> None:
        while True:
            free = [r for r in range(self.engine.rows) if r not in self.active]
            with self.cond:
                if not free or not self.waiting:
                    return
                job = self.waiting.popleft()
            row = free[0]
            try:
                logits = self.engine.prefill(row, job.inputs)  # [1, V]
            except (ValueError, RuntimeError) as e:  # e.g. a prompt the engine cannot hold
                self.engine.release(row)
                job.emit("error", e)
                continue
            self.stats.prompt_tokens += job.prompt_tokens
            self.stats.first_token(time.perf_counter() - job.submitted)
            self.stats.tokens(1)
            self.active[row] = job
            job.history = job.inputs["input_ids"].to(self.engine.device)
            job.generator = job.sampling.generator(self.engine.device)
            self._next(row, job, logits)

    def _step(self) -> None:
        n = max(self.active) + 1
        ids = torch.zeros(n, dtype=torch.long)
        for row, job in self.active.items():
            ids[row] = job.last
        logits = self.engine.decode(ids)  # [n, V]
        self.stats.tokens(len(self.active))
        self.stats.decoded(len(self.active))
        for row, job in list(self.active.items()):
            self._next(row, job, logits[row : row + 1])

    def _next(self, row: int, job: Job, logits: torch.Tensor) -> None:
        """Sample the job's next token from `[1, V]` logits, hand it over, finish the job if it is done (a job
        cancelled meanwhile is dropped at the start of the next loop, `_drop_cancelled`)."""
        token = int(sample_next(logits, job.history, job.sampling, job.generator)[0])
        job.produced += 1
        job.last = token
        if job.logprobs:  # of the model's distribution, before temperature (Whisper's avg_logprob)
            job.logprob_sum += float(torch.log_softmax(logits[0].float(), -1)[token])
        if job.sampling.repetition_penalty != 1.0:
            job.history = torch.cat([job.history, job.history.new_tensor([[token]])], dim=1)
        if token in job.eos:
            return self._finish(row, "stop")
        job.emit("token", token)
        if job.produced >= job.max_tokens or self.engine.length[row] >= self.engine.max_len:
            self._finish(row, "length")

    def _finish(self, row: int, reason: str | None) -> None:
        job = self.active.pop(row)
        self.engine.release(row)
        if reason is not None:
            job.emit("done", reason)

