"""Stopping cleanly when asked: SIGTERM (a cluster scheduler, `timeout`, a spot instance's notice) or SIGINT
(Ctrl-C) during training.

The first signal only sets a flag; the loop reads it after each optimizer step (summed over ranks, so
under torchrun every rank stops at the same step), writes an intact checkpoint and raises `Preempted`,
whose message names the checkpoint. A second signal raises `Aborted` at once: every write is atomic,
so what is on disk stays intact (the checkpoint being written is simply not there).
"""

from __future__ import annotations

import signal
import threading

from .config import TrainError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(TrainError):
    """Training stopped by a signal after writing a checkpoint; `signum` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Aborted(BaseException):
    """A second signal: stop at once (like KeyboardInterrupt, not caught by ordinary handlers)."""

    def __init__(self, signum: int):
        super().__init__(f"aborted by a second {signal.Signals(signum).name}")
        self.signum = signum


class StopFlag:
    """Installs the handlers for the `with` block (main thread only; elsewhere it never fires)."""

    def __init__(self):
        self.signum: int | None = None
        self._saved: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
