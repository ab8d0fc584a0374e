"""Tiny random-weight checkpoints in the Hub's layouts, for demos and tests that have no real weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from weights_loader.writer import save_checkpoint

from .whisper_encoder import WhisperEncoder, WhisperEncoderConfig


def cache_dir() -> Path:
    return Path(os.environ.get("QVA_CACHE", Path.home() / ".cache" / "qva"))


def random_whisper_encoder(cfg: WhisperEncoderConfig, seed: int = 0, std: float = 0.1) -> WhisperEncoder:
    """A Whisper encoder with N(0, std) weights and non-unit LayerNorm gains (so positions matter)."""
    g = torch.Generator().manual_seed(seed)
    model = WhisperEncoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def write_tiny_whisper(
    folder: str | os.PathLike,
    cfg: WhisperEncoderConfig | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    layout: str = "model.encoder.",
) -> Path:
    """Write a random Whisper checkpoint as the Hub stores it (fp16, `model.encoder.*`, full config)."""
    cfg = cfg or WhisperEncoderConfig(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
    model = random_whisper_encoder(cfg, seed)
    tensors = {layout + n: t.to(dtype) for n, t in model.state_dict().items()}
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        **cfg.to_dict(),
        "encoder_layerdrop": 0.0, "decoder_layers": 2, "decoder_attention_heads": cfg.encoder_attention_heads,
        "decoder_ffn_dim": cfg.encoder_ffn_dim, "max_target_positions": 448, "vocab_size": 51866,
        "scale_embedding": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    return save_checkpoint(folder, tensors, config)
