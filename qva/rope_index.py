"""3-axis position ids for a mixed text/vision sequence, with the original Qwen2-VL / Qwen2.5-VL semantics.

- Text (and any token that is not an image/video placeholder, e.g. audio): consecutive ids, equal on
  all three axes.
- A vision block starting at s with LLM grid (t, h, w) = (gt, gh/2, gw/2): ids (s + i, s + j, s + k)
  for its tokens in (t, h, w) row-major order. Qwen2.5-VL video: temporal id s + ⌊i · tokens_per_second ·
  second_per_grid_t⌋ (absolute time), so the block's largest id may be a temporal one.
- The token after a vision block starts at max(all ids so far) + 1. transformers 5.x instead advances
  by max(gh, gw)/2, which differs when a video has more temporal steps than spatial ones; the released
  models were trained with max + 1 (see ../shared/docs/parity-notes.md).
- Left padding: ids are computed over the real tokens only; padded slots hold 1.

Runs on the host over the processor's CPU tensors, like the tokenizer: one pass per prompt at prefill.
"""

from __future__ import annotations

import torch


def vision_block_ids(start: int, t: int, h: int, w: int, interval: float = 1.0) -> torch.Tensor:
    """`[3, t*h*w]` ids of one vision block in LLM grid units, starting at `start`; temporal step i has id
    `start + int(i · interval)` (Qwen2.5-VL's absolute time: interval = tokens_per_second × seconds per step)."""
    tt = (torch.arange(t) * interval).long().view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def rope_index(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
    second_per_grid_ts: torch.Tensor | None = None,
    tokens_per_second: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids `[3, B, S]` and `rope_deltas` `[B, 1]` (max id + 1 − real length, for decoding).
    With `tokens_per_second` (Qwen2.5-VL), video temporal ids advance by tokens_per_second × the video's
    `second_per_grid_ts` entry (1 s where none is given) per temporal patch; images keep steps of 1."""
    ids = input_ids.cpu()
    b, s = ids.shape
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    grids = {
        image_token_id: iter((image_grid_thw.tolist() if image_grid_thw is not None else [])),
        video_token_id: iter((video_grid_thw.tolist() if video_grid_thw is not None else [])),
    }
    merge = spatial_merge_size
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    positions = torch.ones(3, b, s, dtype=torch.long)
    deltas = torch.zeros(b, 1, dtype=torch.long)
    for row in range(b):
        tokens = ids[row][mask[row]].tolist()
        pieces, next_id, i = [], 0, 0
        while i < len(tokens):
            tok = tokens[i]
            if tok in grids:
                try:
                    t, h, w = next(grids[tok])
                except StopIteration:
                    kind = "image" if tok == image_token_id else "video"
                    raise ValueError(f"more {kind} placeholder blocks than {kind}_grid_thw rows") from None
                n = t * (h // merge) * (w // merge)
                if tokens[i : i + n] != [tok] * n:
                    raise ValueError(f"a grid {[t, h, w]} needs {n} consecutive placeholder tokens at position {i}")
                interval = 1.0
                if tok == video_token_id and tokens_per_second is not None:
                    interval = tokens_per_second * next(seconds, 1.0)
                block = vision_block_ids(next_id, t, h // merge, w // merge, interval)
                pieces.append(block)
                next_id = int(block.max()) + 1
                i += n
            else:
                j = i
                while j < len(tokens) and tokens[j] not in grids:
                    j += 1
                pieces.append(torch.arange(next_id, next_id + j - i).expand(3, -1))
                next_id += j - i
                i = j
        real = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        positions[:, row, mask[row]] = real
        deltas[row] = next_id - len(tokens)
    return positions.to(input_ids.device), deltas.to(input_ids.device)
