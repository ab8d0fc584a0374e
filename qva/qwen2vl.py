"""Qwen2-VL: vision tower + Qwen2 LLM with M-RoPE, loaded straight from Hugging Face safetensors.

Attribute names equal the checkpoints' legacy key prefixes (`visual.*`, `model.*`, `lm_head`), so the
state dict maps one-to-one onto the files. With tied embeddings (the 2B model) `lm_head.weight` is the
embedding matrix itself and is not stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from weights_loader import Checkpoint, CheckpointError, assert_materialized, load_into

from .merge import merge_embeddings
from .qwen2 import Qwen2Model
from .qwen2vl_config import Qwen2VLConfig
from .rope_index import rope_index
from .vision import VisionTransformer


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, vocab]
    rope_deltas: torch.Tensor  # [B, 1]: decode position = cache length + delta


class Qwen2VL(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.model = Qwen2Model(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- inputs ---------------------------------------------------------------------------------------
    def media_features(self, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
        """(placeholder id, merged vision rows) per modality present; all images and videos in one pass."""
        cfg = self.config
        out: list[tuple[int, torch.Tensor | None]] = []
        parts = [(cfg.image_token_id, pixel_values, image_grid_thw), (cfg.video_token_id, pixel_values_videos, video_grid_thw)]
        present = [(tid, px, grid) for tid, px, grid in parts if px is not None]
        for tid, _, grid in present:
            if grid is None:
                raise ValueError(f"{'image' if tid == cfg.image_token_id else 'video'} pixels given without their grid_thw")
        if not present:
            return out
        pixels = torch.cat([px for _, px, _ in present])
        grids = torch.cat([grid.cpu() for _, _, grid in present])
        rows = self.visual(pixels, grids)  # [Σ tokens, D]
        start = 0
        for tid, _, grid in present:
            n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()) // cfg.vision.spatial_merge_size**2
            out.append((tid, rows[start : start + n]))
            start += n
        return out

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None):
        cfg = self.config
        return rope_index(
            input_ids, attention_mask, image_grid_thw, video_grid_thw,
            image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        rope_deltas: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for a batch of prompts (left-padded), with any images and videos they reference."""
        features = self.media_features(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        embeds = merge_embeddings(input_ids, self.model.embed_tokens(input_ids), features)
        if position_ids is None:
            position_ids, rope_deltas = self.position_ids(input_ids, attention_mask, image_grid_thw, video_grid_thw)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention
        hidden = self.model(embeds, position_ids, attention_mask)
        return ModelOutput(logits=self.lm_head(hidden), rope_deltas=rope_deltas)

    # -- loading --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device=None) -> "Qwen2VL":
        """Load a Qwen2-VL checkpoint folder (Hub or transformers 5 layout, single or sharded)."""
        cfg = Qwen2VLConfig.from_pretrained(path)
        with torch.device("meta"):
            model = cls(cfg)
        with Checkpoint(path) as ckpt:
            load_weights(model, ckpt, dtype=dtype, device=device)
        return model.eval()


def load_weights(model: Qwen2VL, ckpt: Checkpoint, dtype=None, device=None, ignore=None) -> None:
    """Assign the Qwen2-VL tensors of `ckpt` to a meta-built `model` (visual, LLM, untied lm_head)."""
    tied = model.config.tie_word_embeddings
    skip = {"lm_head.weight"} if tied else set()
    extra = lambda n: (tied and n == "lm_head.weight") or (ignore is not None and ignore(n))  # noqa: E731
    if not tied and "lm_head.weight" not in ckpt:
        raise CheckpointError(
            f"{ckpt.path}: config says tie_word_embeddings=false but there is no lm_head.weight"
        )
    load_into(model, ckpt, skip=skip, ignore=extra, dtype=dtype, device=device)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    assert_materialized(model, str(ckpt.path))
