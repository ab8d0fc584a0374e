"""A preallocated key/value cache: one `[batch, kv_heads, max_len, head_dim]` buffer per layer, written in place.

Slots are sequence positions within a row (prompt slots first, left padding included). A prefill writes
its S tokens at the same slots `[S]` in every row; a decode step writes one token per row at that row's
own slot (`[B, 1]`), so rows can hold sequences of different lengths (continuous batching). Because the
buffers never change shape, a decode step has static shapes and can be compiled (as in gpt-fast).
"""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's keys and values `[batch, kv_heads, max_len, head_dim]`: what that layer's attention is handed."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v `[B, H, q, e]` at `slots`: `[q]` (the same slots in every row) or `[B, 1]` (one slot per
        row, q = 1); return the first `kv_len` slots of the buffers, in k's dtype (an fp32 prefill over a
        bf16 cache reads them back as fp32)."""
        ck, cv = self.k, self.v
        if slots.dim() == 2:  # decode: row b's token goes to slot slots[b]
            batch = torch.arange(k.shape[0], device=k.device)
            ck[batch, :, slots[:, 0]] = k[:, :, 0].to(ck.dtype)  # [B, H, e]
            cv[batch, :, slots[:, 0]] = v[:, :, 0].to(cv.dtype)
        else:
            ck[:, :, slots] = k.to(ck.dtype)
            cv[:, :, slots] = v.to(cv.dtype)
        return ck[:, :, :kv_len].to(k.dtype), cv[:, :, :kv_len].to(v.dtype)


class KVCache:
    """Every layer's `LayerCache`, allocated once."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None):
        shape = (batch, kv_heads, max_len, head_dim)
        self.layers = [LayerCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(layers)]
        self.max_len = max_len

    @property
    def rows_held(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].k.dtype

    def rows(self, rows: slice) -> "KVCache":
        """A view of some rows (no copy): writes through it land in this cache."""
        view = KVCache.__new__(KVCache)
        view.layers, view.max_len = [LayerCache(c.k[rows], c.v[rows]) for c in self.layers], self.max_len
        return view
