"""Band-limited resampling in torch: a polyphase, Kaiser-windowed sinc filter.

For a rate change orig → new (reduced by their gcd), output sample j sits at input time j * orig / new.
Its value is a sum of input samples weighted by a low-pass sinc (cut-off at `rolloff` × the lower Nyquist
frequency) tapered by a Kaiser window `zeros` zero-crossings wide. The `new` distinct fractional offsets
give `new` kernels, so the whole resampling is one strided `conv1d`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=16)
def _kernels(orig: int, new: int, zeros: int, rolloff: float, beta: float) -> tuple[torch.Tensor, int]:
    """Filters `[new, 1, taps]` (float64) and the left padding they need, for reduced rates."""
    cutoff = min(orig, new) * rolloff  # in units of "orig samples per period"
    half = math.ceil(zeros * orig / cutoff)  # half-width of the kernel in input samples
    taps = torch.arange(-half, half + orig, dtype=torch.float64)  # input offsets covered by one stride
    phase = torch.arange(new, dtype=torch.float64)[:, None] * orig / new  # output j's position within stride
    t = (taps[None, :] - phase) * cutoff / orig  # time in units of the cut-off period
    window = torch.special.i0(beta * torch.sqrt((1 - (t / zeros) ** 2).clamp(min=0))) / torch.special.i0(
        torch.tensor(beta, dtype=torch.float64)
    )
    window = torch.where(t.abs() <= zeros, window, torch.zeros_like(window))
    kernel = torch.sinc(t) * window * (cutoff / orig)
    return kernel[:, None, :], half


def resample(
    waveform: torch.Tensor, orig_rate: int, new_rate: int, *, zeros: int = 64, rolloff: float = 0.96, beta: float = 12.0
) -> torch.Tensor:
    """Resample `[..., samples]` from `orig_rate` to `new_rate` Hz; output length ceil(n * new / orig)."""
    orig_rate, new_rate = int(orig_rate), int(new_rate)
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} → {new_rate}")
    if orig_rate == new_rate:
        return waveform
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    kernel, half = _kernels(orig, new, zeros, rolloff, beta)
    kernel = kernel.to(waveform.dtype)
    lead = waveform.shape[:-1]
    n = waveform.shape[-1]
    x = waveform.reshape(-1, 1, n)  # [batch, 1, samples]
    x = F.pad(x, (half, half + orig))
    y = F.conv1d(x, kernel, stride=orig)  # [batch, new phases, strides]
    y = y.transpose(1, 2).reshape(x.shape[0], -1)  # interleave phases: [batch, strides * new]
    out_len = math.ceil(n * new / orig)
    return y[:, :out_len].reshape(*lead, out_len)
