"""Decoding's matrix–vector products over bf16/fp16 weights on CPU, written so that inductor fuses them.

One-token decoding reads every weight once per step, so its speed is the rate at which the weights stream
from memory. PyTorch's CPU kernels for `x @ W.T` over half-precision `W` fall short of that: with one row
they keep one accumulator per output (a chain of dependent adds; ~20 GB/s on a 2-core AVX2 machine whose
reductions read 36 GB/s) and with 2–4 rows they take a GEMM path that converts the weights once per row
(~4× slower per step). Written as below — 16 weights per vector, one product-and-sum per input row —
`torch.compile` emits one loop per weight row that loads and converts each 16 weights once, keeps two
accumulators for each of up to 4 input rows, and finishes the 16-lane sums while they are in cache.

Used by `Linear` only while compiling for CPU; eager mode and other devices keep `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .compute_dtype import HALF

LANES = 16  # weights per AVX2 step: two 8-float vectors, two independent accumulators
MAX_ROWS = 4  # more input rows than this run out of vector registers; those go to F.linear
MIN_IN_FEATURES = 512  # the 16-lane partial sums (64 bytes a row per input row) must stay small next to a weight row


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` for `x` `[..., I]` with at most `MAX_ROWS` rows, accumulated in fp32, in x's dtype."""
    out_features, in_features = weight.shape
    w = rearrange(weight, "o (k l) -> o k l", l=LANES).float()  # [O, I/16, 16]: converted in registers once fused
    rows = rearrange(x, "... (k l) -> (...) k l", l=LANES).float().contiguous()  # [R, I/16, 16]
    # as_strided makes inductor write `rows` to memory; otherwise it inlines x's producer (an RMSNorm, a
    # SiLU gate) into the loop below and recomputes it for every weight row.
    rows = rows.as_strided(rows.shape, rows.stride())
    partial = torch.stack([(w * row).sum(1) for row in rows.unbind(0)])  # [R, O, 16]: one pass over w
    y = partial.sum(-1)  # [R, O]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `gemv` beats `F.linear`: compiling for CPU, half-precision weights, wide rows, ≤ MAX_ROWS rows."""
    return (
        torch.compiler.is_compiling()
        and weight.device.type == "cpu"
        and weight.dtype in HALF
        and weight.shape[1] % LANES == 0
        and weight.shape[1] >= MIN_IN_FEATURES
        and x.numel() <= MAX_ROWS * x.shape[-1]
    )


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and checkpoint names) whose compiled CPU decode products use `gemv`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_gemv(x, self.weight):
            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
