"""Grafting a Whisper encoder onto Qwen2-VL, and saving/loading the result as one checkpoint folder.

    model = qva.load("Qwen2-VL-2B-Instruct", whisper="whisper-large-v3-turbo")   # a fresh graft
    qva.save(model, "my-qva")                                                     # one folder, atomically
    model = qva.load("my-qva")                                                    # everything restored

A saved folder is an HF-style checkpoint: the Qwen2-VL config plus `audio_config`, `audio_hidden_size`,
`has_audio_encoder`, the audio token ids, `audio_frames` and `audio_pool`; sharded safetensors with the
legacy Qwen2-VL key names plus `audio_encoder.*` and `audio_projector.weight`; the tokenizer with the
audio tokens; `preprocessor_config.json` (image processor + Whisper feature extractor fields).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from weights_loader import Checkpoint, CheckpointError, assert_materialized
from weights_loader.writer import save_checkpoint

from .model import QVAModel, load_weights
from .processor import Processor
from .qwen2vl_config import Qwen2VLConfig
from .whisper_encoder import WhisperEncoder, WhisperEncoderConfig


def load(
    path: str | os.PathLike,
    whisper: str | os.PathLike | None = None,
    *,
    audio_frames: str = "valid",
    audio_pool: int = 1,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress=None,
) -> QVAModel:
    """Load a Qwen2-VL checkpoint, grafting the encoder of the Whisper checkpoint `whisper` if given,
    or a folder written by `save`. The returned model carries `model.processor` when the folder has a
    tokenizer. A fresh projector is drawn from N(0, initializer_range) with `seed`. `progress(done, total)`
    is called as tensors load."""
    path = Path(path)
    cfg = Qwen2VLConfig.from_pretrained(path)
    fresh_graft = whisper is not None
    if fresh_graft:
        if cfg.audio is not None:
            raise CheckpointError(f"{path}: already has an audio encoder; load it without whisper= to use it")
        cfg = cfg.with_audio(WhisperEncoderConfig.from_pretrained(whisper), audio_frames, audio_pool)
    processor = Processor.from_pretrained(path, config=cfg) if (path / "tokenizer.json").is_file() else None
    if cfg.audio is not None and processor is not None and processor.feature_size not in (None, cfg.audio.num_mel_bins):
        raise CheckpointError(
            f"{path}: preprocessor_config.json feature_size {processor.feature_size} (mel bins) disagrees with the "
            f"audio encoder's num_mel_bins {cfg.audio.num_mel_bins}"
        )

    with torch.device("meta"):
        model = QVAModel(cfg)
    with Checkpoint(path) as ckpt:
        load_weights(model, ckpt, dtype=dtype, device=device, with_audio=not fresh_graft, progress=progress)
    if fresh_graft:
        model.audio_encoder = WhisperEncoder.from_pretrained(whisper, dtype=dtype or model.lm_head.weight.dtype, device=device)
        g = torch.Generator().manual_seed(seed)
        w = torch.empty(model.audio_projector.weight.shape).normal_(0.0, cfg.initializer_range, generator=g)
        model.audio_projector.weight = nn.Parameter(w.to(dtype or model.lm_head.weight.dtype).to(device or "cpu"))
    assert_materialized(model, str(path))
    model.processor = processor
    return model.eval()


def save(model: QVAModel, path: str | os.PathLike, processor: Processor | None = None, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write `model` (and its processor's tokenizer and preprocessing configs) to one folder, atomically."""
    processor = processor or getattr(model, "processor", None)
    tensors = {n: t for n, t in model.state_dict().items() if not (model.config.tie_word_embeddings and n == "lm_head.weight")}
    files = processor.files() if processor is not None else {}
    return save_checkpoint(path, tensors, model.config.to_dict(), files, max_shard_bytes)
