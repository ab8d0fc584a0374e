"""Which dtype large matrix products run in, given the weights' storage dtype and the device.

Many CPUs (this project's CI machine, most laptops) have no native bf16/fp16 matmul: products with
weights stored that way run ~40–100× slower than fp32 there, while matrix–vector products (one-token
decoding, bound by memory bandwidth) are fine and read half the bytes. So on such a CPU qva keeps the
weights stored as they are and runs each *large* product — prefill, vision blocks, Whisper layers — in
fp32, upcasting one layer's weights at a time (`upcast`, into the stack's `Workspace`, reused by every layer);
decoding stays in the storage dtype (compiled on CPU, its products go through `qva/gemv.py`).

The capability is detected once (CPU flags `avx512_bf16` / `amx_bf16`); override with the environment
variable `QVA_COMPUTE_DTYPE=auto|storage|float32` or `set_policy(...)`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

POLICIES = ("auto", "storage", "float32")
HALF = (torch.bfloat16, torch.float16)  # the storage dtypes this policy is about
_policy: str | None = None


def set_policy(policy: str) -> None:
    """"auto" (fp32 for large products only where bf16/fp16 is slow), "storage" (never upcast), "float32" (always)."""
    global _policy
    if policy not in POLICIES:
        raise ValueError(f"compute dtype policy must be one of {POLICIES}, got {policy!r}")
    _policy = policy


def policy() -> str:
    if _policy is not None:
        return _policy
    env = os.environ.get("QVA_COMPUTE_DTYPE", "auto")
    if env not in POLICIES:
        raise ValueError(f"QVA_COMPUTE_DTYPE must be one of {POLICIES}, got {env!r}")
    return env


def _cpu_flags_say_fast_half_matmul() -> bool:
    """True if this CPU multiplies bf16/fp16 matrices natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags or "amx_fp16" in flags


_FAST_HALF_MATMUL = _cpu_flags_say_fast_half_matmul()  # read once, at import: compiled code sees a constant


def cpu_has_fast_half_matmul() -> bool:
    return _FAST_HALF_MATMUL


def large_matmul_dtype(weight_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype for compute-bound products (many rows) with weights stored in `weight_dtype`."""
    if weight_dtype not in HALF:
        return weight_dtype
    p = policy()
    if p == "storage":
        return weight_dtype
    if p == "float32" or device.type == "cpu" and not cpu_has_fast_half_matmul():
        return torch.float32
    return weight_dtype


class Workspace:
    """Buffers reused by `upcast` from one layer to the next, and from one forward to the next.

    Layers of one stack have the same parameter shapes, so the copies go into memory that is already
    mapped: a fresh 100 MB allocation costs ~8× the copy itself in page faults. Each stack (LLM, vision,
    Whisper) keeps one, so it holds one layer's weights in fp32 between forwards — 0.19 GB for the 2B
    LLM, 0.93 GB for the 7B — once a forward has upcast; `clear()` gives that back.
    Used only without autograd (a layer's copies must outlive it when gradients are recorded).
    """

    def __init__(self):
        self.buffers: list[torch.Tensor] = []

    def clear(self) -> None:
        self.buffers = []

    def copy(self, i: int, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`p` cast to `dtype`, written into the i-th buffer (allocated, or replaced if its shape differs)."""
        if i == len(self.buffers):
            self.buffers.append(torch.empty(0))
        buf = self.buffers[i]
        if buf.shape != p.shape or buf.dtype != dtype or buf.device != p.device:
            buf = self.buffers[i] = torch.empty(p.shape, dtype=dtype, device=p.device)
        return buf.copy_(p)


@contextmanager
def upcast(*modules: nn.Module | None, dtype: torch.dtype, workspace: Workspace | None = None):
    """Inside the block, the modules' floating parameters are `dtype` copies; the stored ones come back after.

    Used one layer at a time, so the extra memory is one layer's weights in `dtype`. With autograd on,
    the copies are differentiable casts of the stored parameters, so gradients still reach them; without
    it they are written into `workspace` (if given), reused by the next layer.
    """
    swapped = []
    for module in modules:
        for mod in module.modules() if module is not None else ():
            for name, p in mod._parameters.items():
                if p is not None and p.is_floating_point() and p.dtype != dtype:
                    swapped.append((mod, name, p))
    reuse = workspace is not None and not torch.is_grad_enabled()
    try:
        for i, (mod, name, p) in enumerate(swapped):
            mod._parameters[name] = workspace.copy(i, p, dtype) if reuse else p.to(dtype)
        yield
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p
