"""Grouped-query attention over a prompt or a cache: PyTorch's `scaled_dot_product_attention`, laid out per step.

    q [B, H, S, e], k and v [B, Hkv, T, e] (H = G · Hkv: G query heads share each key head),
    visible [B, 1, S, T] (True: may attend) or None (causal) → [B, H, S, e] in q's dtype

A prompt (S > 1) goes to the kernel as it is (`enable_gqa`), in the dtype of large products
(`linear.large_matmul_dtype`: fp32 on a CPU without native half-precision matmul). A decode step has one query
a row (S = 1): there the G query heads of a key head are folded into that head's query axis, `[B, Hkv, G, e]`, so
the kernel makes one G-row product per key head instead of G one-row products that each stream the same keys —
the same sums, far fewer passes over the cache (on a CPU, PyTorch's flash kernel at one query a head is bound by
its per-head overhead and by rereading the cache). The mask of one query broadcasts over the G folded ones. The
folded step runs in the cache's dtype or in fp32, whichever `fastest` measured faster on this machine
(`decode_dtype`; `QVA_COMPUTE_DTYPE` still forces one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .linear import HALF, fastest, known_choice, large_matmul_dtype, policy

# one shape stands for every decode step: a 2B-like layer (2 key heads × 6 query heads × 128) over 1 024 keys
DECODE_KEY = "decode-attention:{dtype}:2x6x128:t1024"


def decode_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a one-query step over keys stored in `stored` runs in: `stored` or fp32, measured once per
    machine (`fastest`); while tracing a compiled step, the choice made before (`Decoder` asks first), else `stored`."""
    p = policy()
    if stored not in HALF or device.type != "cpu" or p == "storage":
        return stored
    if p == "float32":
        return torch.float32
    key = DECODE_KEY.format(dtype=str(stored)[6:])
    choice = known_choice(key)  # the common case, and the only answer while tracing: no tensors made
    if choice not in ("storage", "float32") and not torch.compiler.is_compiling():
        q, k, v = (torch.randn(1, h, t, 128).to(stored) for h, t in ((12, 1), (2, 1024), (2, 1024)))
        visible = torch.ones(1, 1, 1, 1024, dtype=torch.bool)
        with torch.no_grad():
            choice = fastest(key, {"storage": lambda: _attend(q, k, v, visible, fold=True),
                                   "float32": lambda: _attend(q.float(), k.float(), v.float(), visible, fold=True)})
    return torch.float32 if choice == "float32" else stored


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Softmax(q kᵀ / √e, masked by `visible`) v for grouped heads, in q's dtype; shapes in the module docstring."""
    one_query = q.shape[2] == 1 and visible is not None  # a decode step (its mask `[B, 1, 1, T]`)
    dt = decode_dtype(q.dtype, q.device) if one_query else large_matmul_dtype(q.dtype, q.device)
    return _attend(q.to(dt), k.to(dt), v.to(dt), visible, fold=one_query).to(q.dtype)


def _attend(q, k, v, visible, fold: bool):
    groups = q.shape[1] // k.shape[1]
    if fold and groups > 1:
        folded = rearrange(q, "b (h g) s e -> b h (g s) e", g=groups)  # [B, Hkv, G, e]
        y = F.scaled_dot_product_attention(folded, k, v, attn_mask=visible)  # visible [B, 1, 1, T] → every G
        return rearrange(y, "b h (g s) e -> b (h g) s e", g=groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=visible is None, enable_gqa=groups > 1)
