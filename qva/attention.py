"""Grouped-query attention over a prompt or a cache: PyTorch's `scaled_dot_product_attention`, laid out per step.

    q [B, H, S, e], k and v [B, Hkv, T, e] (H = G · Hkv: G query heads share each key head),
    visible [B, 1, S, T] (True: may attend) or None (causal) → [B, H, S, e]

A prompt (S > 1) goes to the kernel as it is (`enable_gqa`). A decode step has one query a row (S = 1): there
the G query heads of a key head are folded into that head's query axis, `[B, Hkv, G, e]`, so the kernel makes one
G-row product per key head instead of G one-row products that each stream the same keys — the same sums in the
same order, far fewer passes over the cache (on a CPU, PyTorch's flash kernel at one query a head is bound by
its per-head overhead and by rereading the cache). The mask of one query broadcasts over the G folded ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Softmax(q kᵀ / √e, masked by `visible`) v for grouped heads; shapes in the module docstring."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and q.shape[2] == 1 and visible is not None and visible.shape[-2] == 1:  # one query a row
        folded = rearrange(q, "b (h g) s e -> b h (g s) e", g=groups)  # [B, Hkv, G, e]
        y = F.scaled_dot_product_attention(folded, k, v, attn_mask=visible)  # visible [B, 1, 1, T] → every G
        return rearrange(y, "b h (g s) e -> b (h g) s e", g=groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=visible is None, enable_gqa=groups > 1)
