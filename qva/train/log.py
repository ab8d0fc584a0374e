"""What a run tells: a progress line on stderr, metrics as JSONL (`metrics.jsonl`), and TensorBoard events
when `tensorboard` is installed (rank 0 only)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


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
