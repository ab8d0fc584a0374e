"""Kept buffers for casts and dequantized weights: one per (use, shape, dtype, device), reused by every layer
and forward. A fresh allocation the size of a weight costs more in page faults than the copy itself;
`clear_scratch()` frees them all. A buffer's content is valid only until the next use of the same shape.
Also a kernel's own copy of one weight (`kernel_copy`: fbgemm's packed int8, int4 in the CPU kernel's order),
kept while that weight lives.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

# -- products over a stored weight ---------------------------------------------------------------------------
_scratch = threading.local()


SCRATCH_MAX_BYTES = 256 * 2**20  # larger casts (a vocabulary head) are not kept between calls


def clear_scratch() -> None:
    """Free the buffers that hold cast copies of weights between forwards (one per weight shape)."""
    _scratch.__dict__.clear()


def cast_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`w` in `dtype`. Without autograd the copy is written into a scratch buffer reused for every weight of
    that shape, so it is valid only until the next cast of the same shape: use it at once."""
    if w.dtype == dtype:
        return w
    nbytes = w.numel() * dtype.itemsize
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or nbytes > SCRATCH_MAX_BYTES:
        return w.to(dtype)
    return scratch(tuple(w.shape), dtype, w.device).copy_(w)


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device, use: str = "cast") -> torch.Tensor:
    """The kept buffer of `shape` and `dtype` for one `use` (cast weights, dequantized weights, quantizer rows),
    made on first request; `clear_scratch` frees them all."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (use, shape, dtype, device)
    if key not in buffers:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode alike
            buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffers[key]


def dequantize_out(shape, like: torch.Tensor) -> torch.Tensor | None:
    """The kept buffer a dequantized weight of `shape` in `like`'s dtype is written into, used at once (None
    when compiling: inductor allocates its own)."""
    return None if torch.compiler.is_compiling() else scratch(tuple(shape), like.dtype, like.device, "dequantize")


# -- a kernel's own copy of a weight ------------------------------------------------------------------------------
_copies: WeakIdKeyDictionary = WeakIdKeyDictionary()  # owner tensor → {use: (stamp, copy)}: dies with the owner


def kernel_copy(owner: torch.Tensor, sources: tuple[torch.Tensor, ...], use: str, make: Callable[[], object]):
    """`make()`'s copy of `owner` (a weight in the layout one kernel reads), kept while `owner` lives; made again
    if any of `sources` (the buffers it is made from) was replaced or written since (data pointer and version)."""
    stamp = tuple((t.data_ptr(), t._version) for t in sources)
    held = _copies.setdefault(owner, {}).get(use)
    if held is None or held[0] != stamp:
        held = (stamp, make())
        _copies[owner][use] = held
    return held[1]
