"""Tiny random-weight checkpoints in the Hub's layouts, for demos and tests that have no real weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from weights_loader.writer import save_checkpoint

from .whisper_encoder import WhisperEncoder, WhisperEncoderConfig


def cache_dir() -> Path:
    return Path(os.environ.get("QVA_CACHE", Path.home() / ".cache" / "qva"))


def demo_checkpoints() -> tuple[Path, Path]:
    """The demo's tiny Qwen2-VL and Whisper folders under the cache, written on first use."""
    root = cache_dir() / "demo"
    if not (root / "qwen2-vl" / "config.json").is_file():
        write_tiny_qwen2vl(root / "qwen2-vl")
    if not (root / "whisper" / "config.json").is_file():
        write_tiny_whisper(root / "whisper")
    return root / "qwen2-vl", root / "whisper"


def randomize_(model: nn.Module, seed: int, std: float = 0.1, gain_std: float = 0.2) -> nn.Module:
    """Re-draw every weight from N(0, std), LayerNorm/RMSNorm gains from 1 + N(0, gain_std); returns it in eval mode.

    Std 0.02 models barely attend, which hides position and ordering bugs; these do not.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or name.endswith("ln_q.weight"):
                p.copy_(1 + gain_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def random_whisper_encoder(cfg: WhisperEncoderConfig, seed: int = 0, std: float = 0.1) -> WhisperEncoder:
    """A Whisper encoder with N(0, std) weights and non-unit LayerNorm gains (so positions matter)."""
    return randomize_(WhisperEncoder(cfg), seed, std)


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


# -- a tiny Qwen2-VL in the Hub's layout, with a tokenizer that has Qwen2-VL's special-token ids -----------
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
QWEN_REGULAR_TOKENS = 151_643


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def demo_tokenizer():
    """A byte-level BPE tokenizer laid out like Qwen2-VL's: 151 643 regular ids (the 256 bytes, then unused
    placeholders), the 14 special tokens at 151643–151656. Real text round-trips, one token per byte."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    vocab.update({f"<|unused_{i}|>": i for i in range(256, QWEN_REGULAR_TOKENS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tok


def tiny_qwen2vl_config(dtype: torch.dtype = torch.bfloat16) -> dict:
    """The demo Qwen2-VL's `config.json`: the Hub's flat layout at a tiny size (hidden 64, 2 layers)."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096,
        "tie_word_embeddings": True, "torch_dtype": str(dtype).removeprefix("torch."), "vocab_size": 151936,
        "use_sliding_window": False, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_config": {"depth": 2, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 4, "in_chans": 3, "hidden_size": 64,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    }


def write_tiny_qwen2vl(folder: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random-weight Qwen2-VL as the Hub stores it: flat config, tied embeddings (no lm_head), tokenizer."""
    import json

    from .model import QVAModel
    from .qwen2vl_config import Qwen2VLConfig

    config = tiny_qwen2vl_config(dtype)
    model = randomize_(QVAModel(Qwen2VLConfig.from_dict(config)), seed, std=0.1, gain_std=0.1)
    with torch.no_grad():
        # tied embeddings: every row but the printable ASCII bytes' is zero, so the random model's
        # (meaningless) answer prints as visible characters rather than placeholder or special tokens
        ascii_ids = [i for i, c in enumerate(_byte_alphabet()) if 32 <= ord(c) < 127]
        keep = torch.zeros(model.model.embed_tokens.weight.shape[0], dtype=torch.bool)
        keep[ascii_ids] = True
        model.model.embed_tokens.weight[~keep] = 0
    tensors = {n: t.to(dtype) for n, t in model.state_dict().items() if n != "lm_head.weight"}
    files = {
        "tokenizer.json": demo_tokenizer().to_str(),
        "preprocessor_config.json": json.dumps({"min_pixels": 3136, "max_pixels": 28 * 28 * 64, "patch_size": 14,
                                                "temporal_patch_size": 2, "merge_size": 2}),
    }
    return save_checkpoint(folder, tensors, config, files)
