"""How the next token is chosen: `SamplingParams` (checked once, where they are made) and `sample_next`.

`generate`, `qva-generate` and the server all build one `SamplingParams`; a value torch would fail on, or
one that would silently change the output, is a `ValueError` naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_k: int | None = None  # 0 or None: off
    top_p: float | None = None  # 1.0 or None: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None  # sampling's generator; None: torch's global one

    def __post_init__(self):
        def number(name, ok, want):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name} must be {want}, got {v!r}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer ≥ 0, got {self.max_new_tokens!r}")
        number("temperature", lambda v: v >= 0, "a finite number ≥ 0 (0 or do_sample=False: greedy)")
        number("repetition_penalty", lambda v: v > 0, "a finite number > 0 (1.0: off)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be an integer ≥ 0 (0 or None: off), got {self.top_k!r}")
        if self.top_p is not None:
            number("top_p", lambda v: 0 < v <= 1, "in (0, 1] (1.0 or None: off)")
        if self.do_sample and self.temperature == 0:
            raise ValueError("temperature must be > 0 when do_sample=True (use do_sample=False for greedy decoding)")

    def generator(self, device) -> torch.Generator | None:
        return torch.Generator(device=device).manual_seed(self.seed) if self.seed is not None else None


def sample_next(logits: torch.Tensor, history: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits `[B, V]`; `history` `[B, T]` are the ids seen so far (for the penalty)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        penalty = params.repetition_penalty
        logits = logits.scatter(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    if not params.do_sample:
        return logits.argmax(-1)
    logits = logits / max(params.temperature, 1e-5)
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > params.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
