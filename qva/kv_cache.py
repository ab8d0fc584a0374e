"""A preallocated key/value cache: one `[batch, kv_heads, max_len, head_dim]` buffer per layer, written in place.

Slots are absolute sequence positions (prompt slots first, left padding included). Because the buffers
never change shape, a decode step has static shapes and can be compiled (as in gpt-fast).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.max_len = max_len

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v `[B, H, q, e]` at `slots` `[q]`; return the first `kv_len` slots of the buffers, in k's
        dtype (an fp32 prefill over a bf16 cache reads them back as fp32)."""
        self.k[layer][:, :, slots] = k.to(self.k[layer].dtype)
        self.v[layer][:, :, slots] = v.to(self.v[layer].dtype)
        return self.k[layer][:, :, :kv_len].to(k.dtype), self.v[layer][:, :, :kv_len].to(v.dtype)
