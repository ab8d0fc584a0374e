"""Qwen2.5-VL vision tower: Qwen2-VL's ViT with RMSNorm + SwiGLU blocks and window attention.

pixel rows `[N, 1176]` (as for Qwen2-VL, in 2×2-merge-window order) → patch embed → blocks → merger →
`[N / 4, out_hidden_size]`.

Window attention: the merged-token grid of each frame is cut into windows of `window_size / patch_size /
spatial_merge_size` (112 / 14 / 2 = 4) merged tokens a side, from the top-left (edge windows are smaller). The
patches are permuted so that each window's patches are consecutive (`window_order`, in units of the 4 patches
of one merged token), every block but those in `fullatt_block_indexes` attends within its window, those attend
within the whole frame, and the merged rows are permuted back. The rotary cos/sin are permuted with the patches.

Module names follow the checkpoints: `patch_embed.proj`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
mlp.gate_proj,mlp.up_proj,mlp.down_proj}`, `merger.{ln_q,mlp.0,mlp.2}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .linear import Linear
from .qwen2 import RMSNorm
from .qwen2vl_config import VisionConfig
from .vision import PatchEmbed, PatchMerger, VisionBlock, attention_segments, embed_patches, segments_of


class SwiGLU(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.embed_dim, cfg.intermediate_size)
        self.up_proj = Linear(cfg.embed_dim, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def window_order(grid_thw: list[list[int]], cfg: VisionConfig) -> tuple[torch.Tensor, list[int]]:
    """The merged tokens `[N / 4]` in window order (index into the processor's order) and the patches of each
    window, in that order."""
    merge, unit = cfg.spatial_merge_size, cfg.spatial_merge_size**2
    side = cfg.window_size // cfg.patch_size // merge  # merged tokens a window side
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw) + offset
        padded = F.pad(index, (0, -gw % side, 0, -gh % side), value=-1)  # windows from the top-left; -1: outside
        windows = rearrange(padded, "t (wh sh) (ww sw) -> t (wh ww) (sh sw)", sh=side, sw=side)
        inside = windows >= 0
        order.append(windows[inside])  # t-major, then window, then row-major inside the window
        lengths += (inside.sum(-1) * unit).flatten().tolist()
        offset += t * gh * gw
    return torch.cat(order), lengths


class Qwen25VisionTransformer(nn.Module):
    """pixel rows `[N, patch_dim]` and `grid_thw` `[images, 3]` → merged features `[N / 4, LLM hidden]`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg, norm=RMSNorm, mlp=SwiGLU) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm=RMSNorm)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        grid = grid_thw.tolist()  # host metadata from the processor (a CPU tensor): no device sync
        x, cos, sin = embed_patches(self, pixel_values, grid)
        tokens, lengths = window_order(grid, cfg)  # [N / 4]
        unit = cfg.spatial_merge_size**2
        patches = rearrange(tokens[:, None] * unit + torch.arange(unit), "n u -> (n u)").to(x.device)  # [N]
        x, cos, sin = x[patches], cos[:, patches], sin[:, patches]
        windowed, frames = segments_of(lengths), attention_segments(grid)  # frames stay contiguous when permuted
        full = set(cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in full else windowed)
        merged = self.merger(x)  # [N / 4, D], in window order
        out = torch.empty_like(merged)
        out[tokens.to(merged.device)] = merged  # back to the processor's order
        return out
