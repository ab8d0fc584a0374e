"""The qva model: Qwen2-VL (vision tower + Qwen2 LLM with M-RoPE) with an optional Whisper audio graft.
The same glue runs Qwen2.5-VL (`qwen2_5_vision.py`) and Qwen3-VL (`qwen3_vision.py`, the Qwen3 LLM of `qwen2.py`
with DeepStack) — `config.family` picks the tower.

Attribute names equal the checkpoints' key prefixes: `visual.*`, `model.*`, `lm_head` (Qwen2-VL's legacy
names) and `audio_encoder.*` (HF `WhisperEncoder` sub-names), `audio_projector.weight` for the graft, so
the state dict maps one-to-one onto the files. With tied embeddings (the 2B model) `lm_head.weight` is
the embedding matrix itself and is not stored.

Audio: log-mel windows → Whisper encoder (always on padded 30 s windows, as it was trained) → keep the
frames `audio_frames` selects, average-pool by `audio_pool` → `audio_projector` → rows that replace the
`<|audio_pad|>` tokens, in the same fused merge as image and video rows (`merge.py`).

`forward` gives the logits of whole prompts, for parity tests and training (`labels`: logits and loss only
where a label is); the engine's two modes share its parts: `prefill` (a prompt batch into KV-cache rows)
and `decode_step` (one token per row, compiled). All three embed through `embed_inputs` and project through
`logits`. This file knows nothing about files: loading and saving are `pretrained.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .audio import audio_token_count
from .generate import generate
from .inputs import ModelInputs
from .kv_cache import KVCache
from .linear import Linear
from .merge import DeepStack, merge_embeddings
from .qwen2 import Qwen2Model, causal_padding_mask
from .qwen2_5_vision import Qwen25VisionTransformer
from .qwen2vl_config import Qwen2VLConfig
from .qwen3_vision import Qwen3VisionTransformer
from .rope_index import rope_index
from .vision import VisionTransformer
from .whisper_encoder import WhisperEncoder

FEW_ROWS = 16  # up to here a half-precision vocabulary product beats upcasting the 0.5–1 GB head


IGNORE = -100  # label of a position that is not scored
WINDOWS_AT_ONCE = 4  # 30 s Whisper windows encoded together (2 minutes of audio)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S or logits_to_keep, vocab]; with labels: [N, vocab], the N labelled positions
    rope_deltas: torch.Tensor | None  # [B, 1]: decode position = real tokens so far + delta (None for a decode step)
    loss: torch.Tensor | None = None  # with labels: mean cross-entropy over the labelled tokens
    loss_sum: torch.Tensor | None = None  # with labels: summed cross-entropy (for normalising across batches)
    n_labels: int = 0  # with labels: how many tokens were scored


class Embedded(NamedTuple):
    """A prompt batch as the LLM takes it."""

    embeds: torch.Tensor  # [B, S, D]
    positions: torch.Tensor  # [3, B, S]
    rope_deltas: torch.Tensor  # [B, 1]
    deepstack: DeepStack | None  # Qwen3-VL with images or videos: rows added after the first layers


TOWERS = {"qwen2_vl": VisionTransformer, "qwen2_5_vl": Qwen25VisionTransformer, "qwen3_vl": Qwen3VisionTransformer}


def as_inputs(args: tuple, kwargs: dict) -> ModelInputs:
    """A `ModelInputs` given as such, or as its fields (positionally in its order, or by name)."""
    if len(args) == 1 and not kwargs and isinstance(args[0], ModelInputs):
        return args[0]
    return ModelInputs(*args, **kwargs)


class QVAModel(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.config = cfg
        self.visual = TOWERS[cfg.family](cfg.vision)
        self.model = Qwen2Model(cfg.text)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.tie_weights()
        self.processor = None  # the folder's `Processor`, set by `qva.load` when the folder has a tokenizer
        self.audio_encoder = WhisperEncoder(cfg.audio) if cfg.audio else None
        self.audio_projector = Linear(cfg.audio.d_model, cfg.text.hidden_size, bias=False) if cfg.audio else None

    def tie_weights(self) -> None:
        """With tied embeddings (the 2B model) the head is the embedding matrix itself: after loading or casting.
        A quantized head (`quantize_modules` "head") holds its own quantized copy; the embedding keeps the load dtype."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The load dtype (the embedding's: the head may be quantized)."""
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # -- inputs ---------------------------------------------------------------------------------------
    def media_features(self, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                       deepstack: list | None = None):
        """(placeholder id, merged vision rows) per modality present; all images and videos in one pass. A tower
        with DeepStack taps (Qwen3-VL) appends (placeholder id, its rows per tap) to the `deepstack` list."""
        cfg = self.config
        out: list[tuple[int, torch.Tensor | None]] = []
        parts = [(cfg.image_token_id, pixel_values, image_grid_thw), (cfg.video_token_id, pixel_values_videos, video_grid_thw)]
        present = [(tid, px, grid) for tid, px, grid in parts if px is not None]
        for tid, _, grid in present:
            if grid is None:
                raise ValueError(f"{'image' if tid == cfg.image_token_id else 'video'} pixels given without their grid_thw")
        if not present:
            return out
        pixels = torch.cat([px for _, px, _ in present]).to(self.device)
        grids = torch.cat([grid.cpu() for _, _, grid in present])
        rows = self.visual(pixels, grids)  # [Σ tokens, D], or with DeepStack (rows, [Σ tokens, D] per tap)
        rows, taps = rows if isinstance(rows, tuple) else (rows, [])
        start = 0
        for tid, _, grid in present:
            n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()) // cfg.vision.spatial_merge_size**2
            out.append((tid, rows[start : start + n]))
            if taps and deepstack is not None:
                deepstack.append((tid, [tap[start : start + n] for tap in taps]))
            start += n
        return out

    def audio_encoder_rows(self, input_features: torch.Tensor, audio_valid_frames: torch.Tensor | None = None) -> torch.Tensor:
        """Log-mel windows `[W, mels, 3000]` + valid mel frames per window `[W]` → the kept encoder rows
        `[Σ tokens, d_audio]` (Whisper's part: frozen in training, so its output may be computed once)."""
        cfg = self.config
        if self.audio_encoder is None:
            raise ValueError("this model has no audio encoder: load it with qva.load(..., whisper=PATH) to use audio")
        windows = input_features.shape[0]
        valid = audio_valid_frames.tolist() if audio_valid_frames is not None else [cfg.audio.input_frames] * windows
        if len(valid) != windows:
            raise ValueError(f"audio_valid_frames has {len(valid)} entries for {windows} input_features windows")
        # a long clip is encoded WINDOWS_AT_ONCE windows at a time, keeping only their rows: the encoder's
        # activations then do not grow with the clip's length
        parts = [self._kept_rows(input_features[w:w + WINDOWS_AT_ONCE], valid[w:w + WINDOWS_AT_ONCE])
                 for w in range(0, windows, WINDOWS_AT_ONCE)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # [Σ tokens, d_audio]

    def _kept_rows(self, features: torch.Tensor, valid: list[int]) -> torch.Tensor:
        cfg = self.config
        states = self.audio_encoder(features.to(self.audio_encoder.conv1.weight.device))  # [W, 1500, d_audio]
        if cfg.audio_pool > 1:  # [W, ceil(1500 / pool), d_audio]
            states = F.avg_pool1d(states.transpose(1, 2), cfg.audio_pool, cfg.audio_pool, ceil_mode=True).transpose(1, 2)
        windows, per_window, d = states.shape
        counts = [audio_token_count(v, cfg.audio_frames, cfg.audio_pool) for v in valid]
        index = torch.cat([w * per_window + torch.arange(n) for w, n in enumerate(counts)])  # built on the host
        return states.reshape(windows * per_window, d)[index.to(states.device)]  # [Σ tokens, d_audio]

    def audio_features(self, input_features=None, audio_valid_frames=None, audio_rows=None) -> torch.Tensor:
        """LLM rows `[Σ tokens, D]` for the audio: the projector over the encoder rows (given, or computed)."""
        rows = self.audio_encoder_rows(input_features, audio_valid_frames) if audio_rows is None else audio_rows
        return self.audio_projector(rows.to(self.audio_projector.weight.device))

    def check_inputs(self, *args, **kwargs) -> None:
        """Refuse a prompt batch before any compute, naming the argument: shapes, the context length, token
        ids outside the vocabulary, placeholders without (or with the wrong amount of) media, NaN/inf media.
        Takes a `ModelInputs` or its fields (as `forward` does). Runs once per prompt on the host (a few
        reductions), never per decoded token."""
        i = as_inputs(args, kwargs)
        input_ids, attention_mask, audio_valid_frames, audio_rows = i.input_ids, i.attention_mask, i.audio_valid_frames, i.audio_rows
        input_features = i.input_features
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
        n_audio = None
        if input_features is not None or audio_rows is not None:
            if self.audio_encoder is None:
                raise ValueError("this model has no audio encoder: load it with qva.load(..., whisper=PATH) to use audio")
        if audio_rows is not None:
            n_audio = audio_rows.shape[0]
        elif input_features is not None:
            windows = input_features.shape[0] if input_features.dim() == 3 else 1
            valid = audio_valid_frames.tolist() if audio_valid_frames is not None else [cfg.audio.input_frames] * windows
            n_audio = sum(audio_token_count(v, cfg.audio_frames, cfg.audio_pool) for v in valid)
        media = (
            ("image", "pixel_values", cfg.image_token_id, i.pixel_values, i.image_grid_thw),
            ("video", "pixel_values_videos", cfg.video_token_id, i.pixel_values_videos, i.video_grid_thw),
            ("audio", "input_features", cfg.audio_token_id, input_features if audio_rows is None else audio_rows, None),
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
                rows = n_audio
            else:
                raise ValueError(f"{name} given without {kind}_grid_thw")
            if n != rows:
                raise ValueError(f"input_ids has {n} {kind} placeholder token(s) (id {token_id}) but {name} make {rows} {kind} rows")
            if values.is_floating_point() and not bool(torch.isfinite(values).all()):
                raise ValueError(f"{name} has {int((~torch.isfinite(values)).sum())} NaN/inf value(s)")
        seconds = i.second_per_grid_ts
        if seconds is not None:
            videos = 0 if i.video_grid_thw is None else i.video_grid_thw.shape[0]
            if seconds.dim() != 1 or seconds.shape[0] != videos or not bool((torch.isfinite(seconds) & (seconds >= 0)).all()):
                raise ValueError(f"second_per_grid_ts must be {videos} finite seconds ≥ 0 (one per video), got {seconds.tolist()}")

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None):
        cfg = self.config
        if cfg.family == "qwen3_vl" and video_grid_thw is not None:
            # each frame is its own placeholder block, after its timestamp text: grids [t, h, w] → t × [1, h, w]
            video_grid_thw = torch.repeat_interleave(video_grid_thw.cpu(), video_grid_thw[:, 0].cpu(), dim=0)
            video_grid_thw[:, 0] = 1
        return rope_index(
            input_ids, attention_mask, image_grid_thw, video_grid_thw,
            image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size,
            second_per_grid_ts=second_per_grid_ts, tokens_per_second=cfg.vision.tokens_per_second,
        )

    def embed_inputs(self, *args, check: bool = True, **kwargs) -> Embedded:
        """The LLM's inputs for a prompt batch (a `ModelInputs` or its fields): embeddings `[B, S, D]`, positions
        `[3, B, S]`, rope deltas `[B, 1]`, and the DeepStack rows (Qwen3-VL; else None). `audio_rows` (encoder
        rows computed before) replaces `input_features`; `check=False` skips `check_inputs`."""
        i = as_inputs(args, kwargs)
        if check:
            self.check_inputs(i)
        taps: list = []
        features = self.media_features(i.pixel_values, i.image_grid_thw, i.pixel_values_videos, i.video_grid_thw, taps)
        if i.input_features is not None or i.audio_rows is not None:
            features.append((self.config.audio_token_id, self.audio_features(i.input_features, i.audio_valid_frames, i.audio_rows)))
        embeds = merge_embeddings(i.input_ids, self.model.embed_tokens(i.input_ids), features)
        position_ids, rope_deltas = self.position_ids(i.input_ids, i.attention_mask, i.image_grid_thw, i.video_grid_thw, i.second_per_grid_ts)
        return Embedded(embeds, position_ids.to(embeds.device), rope_deltas.to(embeds.device), DeepStack.of(i.input_ids, taps))

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
        audio_rows: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
        check: bool = True,
    ) -> ModelOutput:
        """Logits for a batch of prompts (left-padded), with any images, videos and audio they reference
        (`model(**inputs)` with the processor's `ModelInputs`); no cache.

        - `logits_to_keep=n`: logits of the last n positions only (0: all), as in transformers; the next
          token needs just the last, and the vocabulary projection is the costliest product.
        - `labels` `[B, S]` (−100: not scored): the loss of predicting `labels[:, t + 1]` at position t, with
          logits computed at the labelled positions only (`logits` is then `[N, vocab]`).
        The engine's two modes are `prefill` (a prompt batch into cache rows) and `decode_step`.
        """
        embeds, positions, rope_deltas, deepstack = self.embed_inputs(
            ModelInputs(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                        input_features, audio_valid_frames, audio_rows, second_per_grid_ts), check=check,
        )
        positions = positions if position_ids is None else position_ids
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention
        hidden = self.model(embeds, positions, attention_mask, deepstack=deepstack)
        if labels is not None:
            return self.labelled_loss(hidden, labels, rope_deltas)
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden  # [B, S or n, D]
        return ModelOutput(logits=self.logits(hidden), rope_deltas=rope_deltas)

    def prefill(self, inputs, cache: KVCache, logits_to_keep: int = 1, check: bool = False) -> ModelOutput:
        """A prompt batch (`ModelInputs`, or a mapping of its fields) into `cache` (the rows it views), slots 0…S-1:
        the next-token logits `[B, logits_to_keep, V]` and the rope deltas `[B, 1]` that place the next tokens."""
        inputs = ModelInputs.of(inputs)
        embeds, positions, rope_deltas, deepstack = self.embed_inputs(ModelInputs(inputs.input_ids, inputs.attention_mask, **inputs.media()),
                                                                      check=check)
        ids = inputs.input_ids
        mask = torch.ones_like(ids) if inputs.attention_mask is None else inputs.attention_mask
        slots = torch.arange(ids.shape[1], device=embeds.device)  # [S]
        hidden = self.model(embeds, positions, cache=cache, slots=slots, visible=causal_padding_mask(mask.to(embeds.device)),
                            deepstack=deepstack)
        return ModelOutput(logits=self.logits(hidden[:, -logits_to_keep:]), rope_deltas=rope_deltas)

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                    visible: torch.Tensor) -> torch.Tensor:
        """One token per row: ids `[B, 1]` at M-RoPE `positions` `[3, B, 1]`, written at each row's cache slot
        `slots` `[B, 1]`, attending as `visible` `[B, 1, 1, kv_len]` allows → next-token logits `[B, V]`.
        No media and no host work, so it compiles."""
        hidden = self.model(self.model.embed_tokens(ids), positions, cache=cache, slots=slots, visible=visible)
        return self.logits(hidden[:, -1:])[:, -1]

    def labelled_loss(self, hidden: torch.Tensor, labels: torch.Tensor, rope_deltas=None) -> ModelOutput:
        """Cross-entropy of `labels[:, t + 1]` from `hidden[:, t]`, over labelled positions only."""
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels must have input_ids' shape {list(hidden.shape[:2])}, got {list(labels.shape)}")
        targets = labels[:, 1:].to(hidden.device)  # [B, S-1]
        scored = targets != IGNORE
        rows = hidden[:, :-1][scored]  # [N, D]
        logits = self.logits(rows).float()  # [N, V]
        loss_sum = F.cross_entropy(logits, targets[scored], reduction="sum")
        n = int(scored.sum())
        return ModelOutput(logits=logits, rope_deltas=rope_deltas, loss=loss_sum / max(n, 1), loss_sum=loss_sum, n_labels=n)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits `[..., V]` of hidden rows `[..., D]`, in the hidden rows' dtype.

        A few rows (next-token logits) are matrix–vector products over the weights as stored; many rows
        run in the hidden rows' dtype (see linear/dtype_policy.py).
        """
        if hidden.numel() <= FEW_ROWS * hidden.shape[-1] and not torch.is_grad_enabled():
            return self.lm_head(hidden.to(self.dtype)).to(hidden.dtype)
        return self.lm_head(hidden)

    def generate(self, **kwargs):
        """Greedy or sampled generation with a static KV cache: see `qva.generate.generate`."""
        return generate(self, **kwargs)
