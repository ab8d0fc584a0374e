"""The dtype policy: which dtype a product over bf16/fp16-stored weights is computed in.

Weights stay stored as loaded (fp32, bf16, fp16). A stack (LLM, vision, Whisper) picks its activation dtype
once, with `large_matmul_dtype`: on a CPU without native half-precision matmul, products with bf16/fp16
weights are many times slower than fp32, so many-row products (prefill, vision, Whisper) run in fp32 there
(which CPU is which is measured once per machine, `cpu_has_fast_half_matmul`); one-token decoding stays in
the storage dtype (bound by bandwidth, and half the bytes). Override with `QVA_COMPUTE_DTYPE=auto|storage|
float32` or `set_policy(...)`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .measure import fastest

# -- the dtype policy ---------------------------------------------------------------------------------------
POLICIES = ("auto", "storage", "float32")


HALF = (torch.bfloat16, torch.float16)  # the storage dtypes the policy is about


_policy: str | None = None


def set_policy(policy: str | None) -> None:
    """"auto" (fp32 for large products only where bf16/fp16 is slow), "storage" (never upcast), "float32"
    (always); None: back to `QVA_COMPUTE_DTYPE` or "auto"."""
    global _policy
    if policy is not None and policy not in POLICIES:
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


_FAST_HALF_MATMUL: bool | None = None  # decided once per process (then compiled code sees a constant)


def cpu_has_fast_half_matmul() -> bool:
    """Whether a bf16 product of many rows beats casting to fp32 on this CPU: measured once per machine (a
    prefill-sized product each way, cached with the kernel choices, `fastest`), not read from the flags —
    builds and BIOS settings differ (oneDNN may not use AMX; `ONEDNN_MAX_CPU_ISA` may cap it). While tracing
    for `torch.compile` before it is known, the flags (AVX512-BF16 / AMX) answer instead."""
    global _FAST_HALF_MATMUL
    if _FAST_HALF_MATMUL is None:
        if torch.compiler.is_compiling():
            return _cpu_flags_say_fast_half_matmul()
        x, w = torch.randn(128, 1024, dtype=torch.bfloat16), torch.randn(1024, 1024, dtype=torch.bfloat16)
        with torch.no_grad():
            choice = fastest("half-matmul:bf16:128x1024x1024",  # the cache file is per thread count already
                             {"half": lambda: F.linear(x, w), "float32": lambda: F.linear(x.float(), w.float())})
        _FAST_HALF_MATMUL = choice == "half"
    return _FAST_HALF_MATMUL


def large_matmul_dtype(weight_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The activation dtype for compute-bound products (many rows) over weights stored in `weight_dtype`."""
    if weight_dtype not in HALF:
        return weight_dtype
    p = policy()
    if p == "storage":
        return weight_dtype
    if p == "float32" or device.type == "cpu" and not cpu_has_fast_half_matmul():
        return torch.float32
    return weight_dtype
