"""Qwen2-VL vision tower: a ViT with 2-D rotary positions and a 2×2 patch merger.

pixel rows `[N, 1176]` (3 channels × 2 frames × 14 × 14, in 2×2-merge-window order, see
image_processing.py) → patch embed → blocks → merger → `[N / 4, LLM hidden]`.

Attention is block-diagonal: each temporal slice of each image or video attends only to itself, so all
images of a request go through in one pass. Slices of equal length are batched into one SDPA call.

Module names follow the checkpoints: `patch_embed.proj`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}`, `merger.{ln_q,mlp.0,mlp.2}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .linear import LayerNorm, Linear, large_matmul_dtype, matmul
from .mrope import apply_rotary, vision_cos_sin
from .qwen2vl_config import VisionConfig

LAYER_NORM_EPS = 1e-6


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (2, patch, patch), applied to pre-cut patches: a Linear. No bias but
    in Qwen3-VL (`bias=True`)."""

    def __init__(self, cfg: VisionConfig, bias: bool = False):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, bias=bias)  # checkpoint shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 1176] → [N, embed], in x's dtype
        w, b = self.proj.weight, self.proj.bias
        y = matmul(x, rearrange(w, "e c t h w -> e (c t h w)"))
        return y if b is None else y + b.to(y.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "n (three h e) -> three h n e", three=3, h=self.heads)  # each [H, N, e]
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)  # rotary in fp32, as trained
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        out = torch.empty_like(q)
        for start, length, count in segments:  # `count` consecutive segments of `length` patches
            end = start + length * count
            qs, ks, vs = (rearrange(t[:, start:end], "h (c l) e -> c h l e", c=count) for t in (q, k, v))
            out[:, start:end] = rearrange(F.scaled_dot_product_attention(qs, ks, vs), "c h l e -> h (c l) e")
        return self.proj(rearrange(out, "h n e -> n (h e)"))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = Linear(cfg.embed_dim, hidden)
        self.fc2 = Linear(hidden, cfg.embed_dim)
        if cfg.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} unsupported")
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """x + attn(norm1(x)); x + mlp(norm2(x)). `norm` and `mlp`: LayerNorm and the GELU MLP (Qwen2-VL), or RMSNorm
    and SwiGLU (Qwen2.5-VL), built as `norm(dim, eps=1e-6)` and `mlp(cfg)`."""

    def __init__(self, cfg: VisionConfig, norm=LayerNorm, mlp=None):
        super().__init__()
        self.norm1 = norm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = norm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.mlp = (mlp or VisionMLP)(cfg)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LN, then each 2×2 window of consecutive patches (4 × embed) → Linear → GELU → Linear(→ LLM width).
    `norm`: the LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL) class, built as `norm(dim, eps=1e-6)`."""

    def __init__(self, cfg: VisionConfig, norm=LayerNorm):
        super().__init__()
        self.window = cfg.spatial_merge_size**2
        wide = cfg.embed_dim * self.window
        self.ln_q = norm(cfg.embed_dim, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(Linear(wide, wide), nn.GELU(), Linear(wide, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(rearrange(self.ln_q(x), "(n w) d -> n (w d)", w=self.window))


def patch_hw_ids(grid_thw: list[list[int]], merge: int) -> torch.Tensor:
    """(h, w) of every patch `[N, 2]`, in the merge-window order the processor emits patches in."""
    ids = []
    for t, h, w in grid_thw:
        hh = torch.arange(h)[:, None].expand(h, w)
        ww = torch.arange(w)[None, :].expand(h, w)
        hw = torch.stack([hh, ww], dim=-1)  # [h, w, 2]
        hw = rearrange(hw, "(hb mh) (wb mw) two -> (hb wb mh mw) two", mh=merge, mw=merge)
        ids.append(hw.repeat(t, 1))
    return torch.cat(ids)


def attention_segments(grid_thw: list[list[int]]) -> list[tuple[int, int, int]]:
    """Runs of equal-length temporal slices: (start, slice length, number of slices)."""
    return segments_of([h * w for t, h, w in grid_thw for _ in range(t)])


def segments_of(lengths: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive attention blocks of these lengths as runs of equal ones: (start, length, count); empty ones skipped."""
    runs: list[list[int]] = []
    start = 0
    for n in lengths:
        if not n:
            continue
        if runs and runs[-1][1] == n:
            runs[-1][2] += 1
        else:
            runs.append([start, n, 1])
        start += n
    return [tuple(r) for r in runs]


class VisionTransformer(nn.Module):
    """pixel rows `[N, patch_dim]` and `grid_thw` `[images, 3]` → merged features `[N / 4, LLM hidden]`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid = grid_thw.tolist()  # host metadata from the processor (a CPU tensor): no device sync
        x, cos, sin = embed_patches(self, pixel_values, grid)
        segments = attention_segments(grid)
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.merger(x)


def embed_patches(tower: nn.Module, pixel_values: torch.Tensor, grid: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tower's input (pixel rows checked against `grid`): patch embeddings `[N, embed]` and the 2-D rotary
    cos, sin `[1, N, head_dim]` (broadcast over heads), in the processor's merge-window order."""
    cfg = tower.config
    n = sum(t * h * w for t, h, w in grid)
    if pixel_values.dim() != 2 or pixel_values.shape != (n, cfg.patch_dim):
        raise ValueError(f"pixel_values must be [{n}, {cfg.patch_dim}] for grid_thw {grid}, got {list(pixel_values.shape)}")
    w = tower.patch_embed.proj.weight
    x = tower.patch_embed(pixel_values.to(large_matmul_dtype(w.dtype, w.device)))  # [N, embed]
    cos, sin = vision_cos_sin(patch_hw_ids(grid, cfg.spatial_merge_size).to(x.device), cfg.head_dim, cfg.rope_theta)
    return x, cos[None], sin[None]
