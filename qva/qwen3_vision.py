"""Qwen3-VL vision tower: a ViT with 16-pixel patches, a learned position table, 2-D rotary positions and DeepStack.

pixel rows `[N, 1536]` (3 channels × 2 frames × 16 × 16, in 2×2-merge-window order, as for Qwen2-VL) →
patch embed (with bias) + position table → LayerNorm blocks (GELU-tanh MLP) → merger → `[N / 4, LLM hidden]`,
and one DeepStack tap per `deepstack_visual_indexes` block: that block's output through its own merger
(`deepstack_merger_list.{i}`, LayerNorm after the 2×2 shuffle) → `[N / 4, LLM hidden]`, which the LLM adds to
the output of its layer i at the visual positions (`merge.DeepStack`).

Position table: `num_position_embeddings` = side² rows, a side × side grid, resampled to each image's (h, w)
patch grid bilinearly with aligned corners (as `F.interpolate(align_corners=True)`), the same for every frame,
then put in merge-window order. Attention is per frame, as in Qwen2-VL (`vision.py`).

Module names follow the checkpoints (`model.visual.` in the files, see `qwen2vl_config.CHECKPOINT_PREFIXES`):
`patch_embed.proj`, `pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.linear_fc1,mlp.linear_fc2}`,
`merger.{norm,linear_fc1,linear_fc2}`, `deepstack_merger_list.{i}.{norm,linear_fc1,linear_fc2}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .linear import LayerNorm, Linear
from .qwen2vl_config import VisionConfig
from .vision import LAYER_NORM_EPS, PatchEmbed, VisionBlock, attention_segments, embed_patches


class TanhGeluMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = Linear(cfg.embed_dim, cfg.intermediate_size)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class Merger(nn.Module):
    """Each 2×2 window of consecutive patches (4 × embed) → Linear → GELU → Linear(→ LLM width), with the
    LayerNorm before the shuffle (per patch: the main merger) or after it (per window: DeepStack's)."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool = False):
        super().__init__()
        self.window = cfg.spatial_merge_size**2
        wide = cfg.embed_dim * self.window
        self.postshuffle = postshuffle
        self.norm = LayerNorm(wide if postshuffle else cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.linear_fc1 = Linear(wide, wide)
        self.linear_fc2 = Linear(wide, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, embed] → [N / 4, LLM hidden]
        if self.postshuffle:
            x = self.norm(rearrange(x, "(n w) d -> n (w d)", w=self.window))
        else:
            x = rearrange(self.norm(x), "(n w) d -> n (w d)", w=self.window)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def position_table(table: torch.Tensor, grid: list[list[int]], merge: int) -> torch.Tensor:
    """The learned positions `[side², embed]` resampled to every patch `[N, embed]`, in merge-window order."""
    side = round(table.shape[0] ** 0.5)
    square = rearrange(table, "(h w) d -> 1 d h w", h=side)
    out = []
    for t, h, w in grid:
        rows = F.interpolate(square, size=(h, w), mode="bilinear", align_corners=True)[0]  # [embed, h, w]
        rows = rearrange(rows, "d (hb mh) (wb mw) -> (hb wb mh mw) d", mh=merge, mw=merge)
        out.append(rows.repeat(t, 1))  # every frame alike
    return torch.cat(out)


class Qwen3VisionTransformer(nn.Module):
    """pixel rows `[N, patch_dim]` and `grid_thw` `[images, 3]` → (merged features `[N / 4, LLM hidden]`,
    DeepStack taps: one `[N / 4, LLM hidden]` per `deepstack_visual_indexes` block)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.embed_dim)
        self.blocks = nn.ModuleList(VisionBlock(cfg, norm=LayerNorm, mlp=TanhGeluMLP) for _ in range(cfg.depth))
        self.merger = Merger(cfg)
        self.deepstack_merger_list = nn.ModuleList(Merger(cfg, postshuffle=True) for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg = self.config
        grid = grid_thw.tolist()  # host metadata from the processor (a CPU tensor): no device sync
        x, cos, sin = embed_patches(self, pixel_values, grid)
        x = x + position_table(self.pos_embed.weight, grid, cfg.spatial_merge_size).to(x.dtype)
        segments = attention_segments(grid)
        taps = {block: merger for block, merger in zip(cfg.deepstack_visual_indexes, self.deepstack_merger_list)}
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, segments)
            if i in taps:
                deepstack.append(taps[i](x))
        return self.merger(x), deepstack
