"""Continuous batching: one thread drives the engine; requests join and leave between decode steps.

    submit(job) ─► waiting (bounded: QueueFull when full) ─► a free engine row: prefill (encoders + prompt)
                                                              ─► decode steps, all rows together ─► job.emit

Each loop: drop cancelled jobs (a disconnected client's row is freed before the next step), prefill
waiting jobs into free rows (lowest first, so decode steps stay over as few rows as possible), then one
decode step over the rows up to the highest busy one. Every job samples with its own settings and
generator (`generate.sample_next`, the same function offline `generate` uses), so a greedy answer is the
one `generate` gives for the same prompt, whatever else is in the batch.

Jobs talk back through `job.emit(kind, value)` from this thread: ("token", id), ("done", finish reason
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
from ..generate import sample_next


class QueueFull(Exception):
    pass


@dataclass
class Job:
    inputs: dict  # the processor's tensors: input_ids [1, S], attention_mask, media
    max_tokens: int
    eos: set[int]
    emit: Callable[[str, object], None]
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    # set by the scheduler
    produced: int = 0
    last: int = 0
    history: torch.Tensor | None = None
    generator: torch.Generator | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


class Stats:
    """Counters for /metrics, written by the engine thread and read by the HTTP one (the deque under a lock)."""

    TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

    def __init__(self):
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft_counts = [0] * (len(self.TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.recent = collections.deque()  # (time, tokens) of decode steps in the last 10 s
        self.lock = threading.Lock()

    def first_token(self, seconds: float) -> None:
        self.ttft_sum += seconds
        for i, edge in enumerate(self.TTFT_BUCKETS):
            if seconds <= edge:
                self.ttft_counts[i] += 1
                return
        self.ttft_counts[-1] += 1

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        self.generation_tokens += n
        with self.lock:
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - 10:
                self.recent.popleft()

    def tokens_per_second(self) -> float:
        with self.lock:
            now, recent = time.monotonic(), list(self.recent)
        recent = [(t, n) for t, n in recent if t >= now - 10]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1e-3)


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
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(job)
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
            if job.seed is not None:
                job.generator = torch.Generator(device=self.engine.device).manual_seed(job.seed)
            self._next(row, job, logits)

    def _step(self) -> None:
        n = max(self.active) + 1
        ids = torch.zeros(n, dtype=torch.long)
        for row, job in self.active.items():
            ids[row] = job.last
        logits = self.engine.decode(ids)  # [n, V]
        self.stats.tokens(len(self.active))
        for row, job in list(self.active.items()):
            self._next(row, job, logits[row : row + 1])

    def _next(self, row: int, job: Job, logits: torch.Tensor) -> None:
        """Sample the job's next token from `[1, V]` logits, hand it over, finish the job if it is done (a job
        cancelled meanwhile is dropped at the start of the next loop, `_drop_cancelled`)."""
        token = int(sample_next(logits, job.history, job.do_sample, job.temperature, job.top_k, job.top_p,
                                job.repetition_penalty, job.generator)[0])
        job.produced += 1
        job.last = token
        if job.repetition_penalty != 1.0:
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

