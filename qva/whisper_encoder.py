"""The Whisper audio encoder (Radford et al., 2022), from scratch.

log-mel `[B, n_mels, 3000]` → conv1 (k3, p1) → GELU → conv2 (k3, stride 2, p1) → GELU → `[B, 1500, d]`
→ + positional table (stored in the checkpoint) → pre-LN transformer layers → final LayerNorm.

Sub-module names equal Hugging Face's `WhisperEncoder` (`conv1`, `conv2`, `embed_positions`,
`layers.{i}.self_attn.{q,k,v,out}_proj`, `self_attn_layer_norm`, `fc1`, `fc2`, `final_layer_norm`,
`layer_norm`), so checkpoints map one-to-one (loading: `pretrained.load_whisper_encoder`, which never reads
the decoder's tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from weights_loader import CheckpointError, Fields, read_config

from .audio import N_FRAMES
from .linear import Conv1d, LayerNorm, Linear, large_matmul_dtype

LAYER_NORM_EPS = 1e-5


@dataclass
class WhisperEncoderConfig:
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    activation_function: str = "gelu"

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config") -> "WhisperEncoderConfig":
        return cls.from_fields(Fields(cfg, source))

    @classmethod
    def from_fields(cls, f: Fields) -> "WhisperEncoderConfig":
        """Read and check every field: a wrong type or impossible value names the file and the field."""
        if f.data.get("model_type", "whisper") != "whisper":
            raise f.error("model_type", f"is {f.data.get('model_type')!r}: not a Whisper config")
        f.str("activation_function", "gelu", choices=("gelu",))
        missing = [x.name for x in fields(cls) if x.name not in f.data and x.name != "activation_function"]
        if missing:
            raise CheckpointError(f"{f.source}: Whisper config lacks {', '.join(f.where + m for m in missing)}")
        d_model, heads = f.int("d_model"), f.int("encoder_attention_heads")
        if d_model % heads:
            raise f.error("encoder_attention_heads", f"must divide d_model {d_model}, got {heads}")
        positions = f.int("max_source_positions")
        if positions != N_FRAMES // 2:
            raise f.error("max_source_positions", f"must be {N_FRAMES // 2} (30 s windows of {N_FRAMES} mel frames), got {positions}")
        return cls(
            num_mel_bins=f.int("num_mel_bins"), d_model=d_model, encoder_layers=f.int("encoder_layers"),
            encoder_attention_heads=heads, encoder_ffn_dim=f.int("encoder_ffn_dim"), max_source_positions=positions,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "WhisperEncoderConfig":
        cfg = read_config(path, "Whisper")
        return cls.from_dict(cfg.get("audio_config", cfg), str(Path(path) / "config.json"))

    def to_dict(self) -> dict:
        return {"model_type": "whisper", **{f.name: getattr(self, f.name) for f in fields(self)}}

    @property
    def input_frames(self) -> int:
        return 2 * self.max_source_positions  # conv2 halves the 3000 mel frames to 1500


class WhisperAttention(nn.Module):
    """Bidirectional multi-head self-attention; `k_proj` has no bias."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d, bias=False)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, d]
        q, k, v = (rearrange(p(x), "b t (h e) -> b h t e", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # scale = head_dim ** -0.5
        return self.out_proj(rearrange(y, "b h t e -> b t (h e)"))


class WhisperEncoderLayer(nn.Module):
    """Pre-LN: x + attn(LN(x)); x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = WhisperAttention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = LayerNorm(d, eps=LAYER_NORM_EPS)
        self.fc1 = Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = LayerNorm(d, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Log-mel windows `[B, n_mels, 3000]` → encoder states `[B, 1500, d_model]` (in the compute dtype:
    fp32 for bf16/fp16 weights on a CPU without native half-precision matmul)."""

    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.conv1 = Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(WhisperEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = LayerNorm(d, eps=LAYER_NORM_EPS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if features.dim() == 2:
            features = features[None]
        if features.dim() != 3 or features.shape[1:] != (cfg.num_mel_bins, cfg.input_frames):
            raise ValueError(
                f"WhisperEncoder: input_features must be [windows, {cfg.num_mel_bins}, {cfg.input_frames}] "
                f"(log-mel of padded 30 s windows), got {list(features.shape)}"
            )
        x = features.to(large_matmul_dtype(self.conv1.weight.dtype, self.conv1.weight.device))  # see linear/dtype_policy.py
        x = F.gelu(self.conv1(x))  # [B, d, 3000]
        x = F.gelu(self.conv2(x))  # [B, d, 1500]
        x = rearrange(x, "b d t -> b t d") + self.embed_positions.weight.to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)
