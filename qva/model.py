"""The qva model: Qwen2-VL (vision tower + Qwen2 LLM with M-RoPE) with an optional Whisper audio graft.

Attribute names equal the checkpoints' key prefixes: `visual.*`, `model.*`, `lm_head` (Qwen2-VL's legacy
names) and `audio_encoder.*` (HF `WhisperEncoder` sub-names), `audio_projector.weight` for the graft, so
the state dict maps one-to-one onto the files. With tied embeddings (the 2B model) `lm_head.weight` is
the embedding matrix itself and is not stored.

Audio: log-mel windows → Whisper encoder (always on padded 30 s windows, as it was trained) → keep the
frames `audio_frames` selects, average-pool by `audio_pool` → `audio_projector` → rows that replace the
`<|audio_pad|>` tokens, in the same fused merge as image and video rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weights_loader import Checkpoint, CheckpointError, load_into

from .audio import audio_token_count
from .compute_dtype import upcast
from .gemv import Linear
from .merge import merge_embeddings
from .qwen2 import Qwen2Model
from .qwen2vl_config import Qwen2VLConfig
from .rope_index import rope_index
from .vision import VisionTransformer
from .whisper_encoder import WhisperEncoder

FEW_ROWS = 16  # up to here a half-precision vocabulary product beats upcasting the 0.5–1 GB head


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, vocab]
    rope_deltas: torch.Tensor  # [B, 1]: decode position = real tokens so far + delta


class QVAModel(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.model = Qwen2Model(cfg.text)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.audio_encoder = WhisperEncoder(cfg.audio) if cfg.audio else None
        self.audio_projector = nn.Linear(cfg.audio.d_model, cfg.text.hidden_size, bias=False) if cfg.audio else None

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

    def audio_features(self, input_features: torch.Tensor, audio_valid_frames: torch.Tensor | None = None) -> torch.Tensor:
        """Log-mel windows `[W, mels, 3000]` + valid mel frames per window `[W]` → LLM rows `[Σ tokens, D]`."""
        cfg = self.config
        if self.audio_encoder is None:
            raise ValueError("this model has no audio encoder: load it with qva.load(..., whisper=PATH) to use audio")
        states = self.audio_encoder(input_features)  # [W, 1500, d_audio]
        if cfg.audio_pool > 1:  # [W, ceil(1500 / pool), d_audio]
            states = F.avg_pool1d(states.transpose(1, 2), cfg.audio_pool, cfg.audio_pool, ceil_mode=True).transpose(1, 2)
        windows, per_window, d = states.shape
        valid = audio_valid_frames.tolist() if audio_valid_frames is not None else [2 * cfg.audio.max_source_positions] * windows
        if len(valid) != windows:
            raise ValueError(f"audio_valid_frames has {len(valid)} entries for {windows} input_features windows")
        counts = [audio_token_count(v, cfg.audio_frames, cfg.audio_pool) for v in valid]
        index = torch.cat([w * per_window + torch.arange(n) for w, n in enumerate(counts)])  # built on the host
        rows = states.reshape(windows * per_window, d)[index.to(states.device)]  # [Σ tokens, d_audio]
        with upcast(self.audio_projector, dtype=rows.dtype):
            return self.audio_projector(rows)

    def check_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                     video_grid_thw=None, input_features=None, audio_valid_frames=None) -> None:
        """Refuse a prompt batch before any compute, naming the argument: shapes, the context length, token
        ids outside the vocabulary, placeholders without (or with the wrong amount of) media, NaN/inf media.
        Runs once per prompt on the host (a few reductions), never per decoded token."""
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.numel() == 0:
            got = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a non-empty [batch, seq] integer tensor, got {got}")
        limit = cfg.text.max_position_embeddings
        if input_ids.shape[1] > limit:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, over the model's context of {limit} (max_position_embeddings)")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}, got {list(attention_mask.shape)}")
        ids = input_ids.cpu()
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= cfg.text.vocab_size:
            raise ValueError(f"input_ids has token id {lo if lo < 0 else hi}, outside the vocabulary [0, {cfg.text.vocab_size})")
        merge = cfg.vision.spatial_merge_size**2
        audio_rows = None
        if input_features is not None:
            if self.audio_encoder is None:
                raise ValueError("this model has no audio encoder: load it with qva.load(..., whisper=PATH) to use audio")
            windows = input_features.shape[0] if input_features.dim() == 3 else 1
            valid = audio_valid_frames.tolist() if audio_valid_frames is not None else [cfg.audio.input_frames] * windows
            audio_rows = sum(audio_token_count(v, cfg.audio_frames, cfg.audio_pool) for v in valid)
        media = (
            ("image", "pixel_values", cfg.image_token_id, pixel_values, image_grid_thw),
            ("video", "pixel_values_videos", cfg.video_token_id, pixel_values_videos, video_grid_thw),
            ("audio", "input_features", cfg.audio_token_id, input_features, None),
        )
        for kind, name, token_id, values, grid in media:
            n = int((ids == token_id).sum()) if kind != "audio" or cfg.audio is not None else 0
            if values is None:
                if n:
                    raise ValueError(f"input_ids has {n} {kind} placeholder token(s) (id {token_id}) but no {name} were given")
                continue
            if grid is not None:
                rows = int(grid.prod(-1).sum()) // merge
            elif kind == "audio":
                rows = audio_rows
            else:
                raise ValueError(f"{name} given without {kind}_grid_thw")
            if n != rows:
                raise ValueError(f"input_ids has {n} {kind} placeholder token(s) (id {token_id}) but {name} make {rows} {kind} rows")
            if values.is_floating_point() and not bool(torch.isfinite(values).all()):
                raise ValueError(f"{name} has {int((~torch.isfinite(values)).sum())} NaN/inf value(s)")

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None):
        cfg = self.config
        return rope_index(
            input_ids, attention_mask, image_grid_thw, video_grid_thw,
            image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size,
        )

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        audio_valid_frames: torch.Tensor | None = None,
        check: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The LLM's inputs for a prompt batch: embeddings `[B, S, D]`, positions `[3, B, S]`, rope deltas `[B, 1]`.
        `check=False` skips `check_inputs` (for a caller that has just run it)."""
        if check:
            self.check_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                              input_features, audio_valid_frames)
        features = self.media_features(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if input_features is not None:
            features.append((self.config.audio_token_id, self.audio_features(input_features, audio_valid_frames)))
        embeds = merge_embeddings(input_ids, self.model.embed_tokens(input_ids), features)
        position_ids, rope_deltas = self.position_ids(input_ids, attention_mask, image_grid_thw, video_grid_thw)
        return embeds, position_ids.to(embeds.device), rope_deltas.to(embeds.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        audio_valid_frames: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Logits for a batch of prompts (left-padded), with any images, videos and audio they reference.

        `logits_to_keep=n` computes logits for the last n positions only (0: all), as in transformers;
        the next token needs just the last, and the vocabulary projection is the costliest product.
        """
        embeds, default_positions, rope_deltas = self.embed_inputs(
            input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
            input_features, audio_valid_frames,
        )
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention
        hidden = self.model(embeds, default_positions if position_ids is None else position_ids, attention_mask)
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden  # [B, S or n, D]
        return ModelOutput(logits=self.logits(hidden), rope_deltas=rope_deltas)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits `[..., V]` of hidden rows `[..., D]`, in the hidden rows' dtype.

        A few rows (next-token logits) are matrix–vector products over the weights as stored; many rows
        run in the hidden rows' dtype, upcasting half-precision weights (see compute_dtype.py).
        """
        stored = self.lm_head.weight.dtype
        if hidden.numel() <= FEW_ROWS * hidden.shape[-1]:
            return self.lm_head(hidden.to(stored)).to(hidden.dtype)
        with upcast(self.lm_head, dtype=hidden.dtype):
            return self.lm_head(hidden)

    def generate(self, **kwargs):
        """Greedy or sampled generation with a static KV cache: see `qva.generate.generate`."""
        from .generate import generate

        return generate(self, **kwargs)

    # -- loading --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device=None) -> "QVAModel":
        """Load a Qwen2-VL checkpoint folder (Hub or transformers 5 layout, single or sharded) or a saved
        graft: `qva.load` without a Whisper checkpoint to graft."""
        from .graft import load

        return load(path, dtype=dtype, device=device)


AUDIO_PREFIXES = ("audio_encoder.", "audio_projector.")


def load_weights(model: QVAModel, ckpt: Checkpoint, dtype=None, device=None, ignore=None, with_audio: bool = True, progress=None) -> None:
    """Assign the tensors of `ckpt` to a meta-built `model`: visual, LLM, untied lm_head and, unless
    `with_audio=False` (a fresh graft, whose audio parts come from elsewhere), the audio encoder and projector."""
    tied = model.config.tie_word_embeddings
    skip = {"lm_head.weight"} if tied else set()
    if not with_audio:
        skip |= {n for n in model.state_dict() if n.startswith(AUDIO_PREFIXES)}
    extra = lambda n: (tied and n == "lm_head.weight") or (ignore is not None and ignore(n))  # noqa: E731
    if not tied and "lm_head.weight" not in ckpt:
        raise CheckpointError(
            f"{ckpt.path}: config says tie_word_embeddings=false but there is no lm_head.weight"
        )
    load_into(model, ckpt, skip=skip, ignore=extra, dtype=dtype, device=device, progress=progress)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
