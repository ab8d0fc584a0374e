"""Rotary position embeddings: 1-D/3-axis M-RoPE for the LLM, 2-D axial RoPE for the vision tower.

M-RoPE (Qwen2-VL): each token has three position ids (t, h, w). The head_dim/2 rotary frequencies are
split into contiguous chunks `mrope_section` = [t, h, w] (e.g. [16, 24, 24]); chunk i rotates by the
position on axis i. Qwen3-VL interleaves instead: frequency j follows h if j % 3 == 1 and j < 3·h, w if
j % 3 == 2 and j < 3·w, else t (sections [24, 20, 20]: t h w t h w … t t t t). Text tokens carry the same
id on all three axes, which reduces to ordinary RoPE. Angles are computed in fp32.
"""

from __future__ import annotations

import torch


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """`[dim / 2]` inverse frequencies theta^(-2i/dim), fp32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def mrope_axes(mrope_section: list[int], interleaved: bool = False) -> torch.Tensor:
    """The position axis (0 t, 1 h, 2 w) each of the head_dim/2 frequencies follows `[hd/2]`."""
    if not interleaved:  # contiguous chunks: frequencies [0, t) follow axis t, [t, t+h) axis h, [t+h, hd/2) axis w
        return torch.repeat_interleave(torch.arange(3), torch.tensor(mrope_section))
    j = torch.arange(sum(mrope_section))
    axis = torch.zeros_like(j)
    axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axis


def mrope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int], dtype: torch.dtype,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids `[3, B, S]` → cos, sin `[B, 1, S, head_dim]` in `dtype` (broadcast over heads)."""
    freqs = position_ids[..., None].float() * inv_freq(head_dim, theta, position_ids.device)  # [3, B, S, hd/2]
    axis = mrope_axes(mrope_section, interleaved).to(freqs.device)
    freqs = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]  # [B, S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def vision_cos_sin(hw_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch (h, w) ids `[N, 2]` → fp32 cos, sin `[N, head_dim]`: half the frequencies follow h, half w."""
    freqs = hw_ids[..., None].float() * inv_freq(head_dim // 2, theta, hw_ids.device)  # [N, 2, hd/4]
    freqs = freqs.flatten(1)  # [N, hd/2]: (h freqs, w freqs)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
