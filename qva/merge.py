"""Build the LLM's input embeddings: text rows, with image/video/audio feature rows at their placeholders.

One fused gather instead of one `masked_scatter` per modality. All rows that can appear are stacked in a
single table — the token embeddings of the batch, then each modality's features — and every position
picks its row by index. The indices come from prefix sums over each placeholder mask, computed on the
device: no host synchronisation, no data-dependent shapes, no Python loop over positions. Gradients
flow into every feature tensor (the gather's backward is a scatter-add).

Placeholder and feature counts must agree; the processor checks this on the host before any compute.
`check=True` adds a device-side check for debugging (it syncs).
"""

from __future__ import annotations

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
    flat_ids = input_ids.reshape(-1)  # [B*S]
    tables = [token_embeds.reshape(b * s, d)]
    index = torch.arange(b * s, device=input_ids.device)  # default: a token's own embedding row
    offset = b * s
    for token_id, rows in features:
        if rows is None:
            continue
        is_slot = flat_ids == token_id  # [B*S]
        rank = torch.cumsum(is_slot, 0) - 1  # k for the k-th placeholder
        if check:
            n = int(is_slot.sum())
            if n != rows.shape[0]:
                raise ValueError(f"placeholder id {token_id}: {n} tokens but {rows.shape[0]} feature rows")
        index = torch.where(is_slot, offset + rank, index)
        tables.append(rows.to(token_embeds.dtype))
        offset += rows.shape[0]
    if len(tables) == 1:
        return token_embeds
    table = torch.cat(tables)  # [B*S + ΣN_m, D]
    return table[index].view(b, s, d)
