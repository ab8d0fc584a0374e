"""Build the LLM's input embeddings: text rows, with image/video/audio feature rows at their placeholders.

One fused gather instead of one `masked_scatter` per modality. All rows that can appear are stacked in a
single table — the token embeddings of the batch, then each modality's features — and every position
picks its row by index. The indices come from prefix sums over each placeholder mask, computed on the
device: no host synchronisation, no data-dependent shapes, no Python loop over positions. Gradients
flow into every feature tensor (the gather's backward is a scatter-add).

Placeholder and feature counts must agree; the processor checks this on the host before any compute.
`check=True` adds a device-side check for debugging (it syncs).

`DeepStack` (Qwen3-VL) adds further vision rows to the hidden states of the first LLM layers at the same
placeholders, with the same kind of index: a gather from [a zero row; the rows], added everywhere (+0 off
the visual positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def merge_embeddings(
    input_ids: torch.Tensor,
    token_embeds: torch.Tensor,
    features: list[tuple[int, torch.Tensor | None]],
    check: bool = False,
) -> torch.Tensor:
    """input_ids `[B, S]`, token_embeds `[B, S, D]`, features [(placeholder id, rows `[N_m, D]`)] → `[B, S, D]`.

    The k-th placeholder of modality m (in row-major order over the batch) receives `rows_m[k]`.
    """
    b, s, d = token_embeds.shape
    present = [(tid, rows) for tid, rows in features if rows is not None]
    if not present:
        return token_embeds
    own = torch.arange(b * s, device=input_ids.device)  # default: a token's own embedding row
    index = placeholder_index(input_ids, [(tid, rows.shape[0]) for tid, rows in present], b * s, own, check)
    table = torch.cat([token_embeds.reshape(b * s, d), *(rows.to(token_embeds.dtype) for _, rows in present)])  # [B*S + ΣN_m, D]
    return table[index].view(b, s, d)


def placeholder_index(input_ids: torch.Tensor, counts: list[tuple[int, int]], offset: int, default: torch.Tensor,
                      check: bool = False) -> torch.Tensor:
    """`[B*S]` row of a table for each position: the k-th placeholder of the m-th (id, rows) pair takes row
    offset + N_0 + … + N_{m-1} + k, any other position its `default` entry."""
    flat_ids = input_ids.reshape(-1)  # [B*S]
    index = default
    for token_id, n in counts:
        is_slot = flat_ids == token_id  # [B*S]
        rank = torch.cumsum(is_slot, 0) - 1  # k for the k-th placeholder
        if check and int(is_slot.sum()) != n:
            raise ValueError(f"placeholder id {token_id}: {int(is_slot.sum())} tokens but {n} feature rows")
        index = torch.where(is_slot, offset + rank, index)
        offset += n
    return index


@dataclass
class DeepStack:
    """Qwen3-VL's DeepStack: rows from intermediate vision blocks, one set per LLM layer 0, 1, …, added to
    that layer's output at the image and video placeholders."""

    index: torch.Tensor  # [B, S]: 0 off the visual positions, 1 + k at the k-th visual row
    taps: list[torch.Tensor]  # per LLM layer: [N, D], images' rows then videos'

    @classmethod
    def of(cls, input_ids: torch.Tensor, features: list[tuple[int, list[torch.Tensor]]]) -> "DeepStack | None":
        """`features`: (placeholder id, its rows per tap) per modality present."""
        if not features:
            return None
        zero = torch.zeros(input_ids.numel(), dtype=torch.long, device=input_ids.device)
        index = placeholder_index(input_ids, [(tid, taps[0].shape[0]) for tid, taps in features], 1, zero)
        layers = len(features[0][1])
        return cls(index.view(input_ids.shape), [torch.cat([taps[i] for _, taps in features]) for i in range(layers)])

    def add(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """hidden `[B, S, D]` + this layer's rows at the visual positions."""
        rows = self.taps[layer].to(hidden.dtype)
        table = torch.cat([rows.new_zeros(1, rows.shape[1]), rows])  # [1 + N, D]
        return hidden + table[self.index]
