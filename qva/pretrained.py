"""The one door to files: loading and saving checkpoints, grafting Whisper on, applying adapters.

    model = qva.load("Qwen2-VL-2B-Instruct", whisper="whisper-large-v3-turbo")   # a fresh graft
    qva.save(model, "my-qva")                                                     # one folder, atomically
    model = qva.load("my-qva")                                                    # everything restored
    model = qva.load("run/stage2")            # a LoRA run's output: its base, its projector and adapter applied
    encoder = qva.load_whisper_encoder("whisper-large-v3-turbo")                  # Whisper's encoder alone

Modules are built on the `meta` device and filled tensor by tensor from the lazily opened checkpoint
(`weights_loader`), so loading costs the model's bytes once. A saved folder is an HF-style checkpoint:
the Qwen2-VL config plus `audio_config`, `audio_hidden_size`, `has_audio_encoder`, the audio token ids,
`audio_frames` and `audio_pool`; sharded safetensors with the legacy Qwen2-VL key names plus
`audio_encoder.*` and `audio_projector.weight`; the tokenizer with the audio tokens;
`preprocessor_config.json` (image processor + Whisper feature extractor fields).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from weights_loader import Checkpoint, CheckpointError, assert_materialized, load_into
from weights_loader.writer import save_checkpoint

from .adapters import apply_adapter, base_of, is_adapter_folder
from .linear import QUANTIZED_LINEARS, Linear
from .model import QVAModel
from .processor import Processor
from .qwen2vl_config import Qwen2VLConfig
from .whisper_encoder import WhisperEncoder, WhisperEncoderConfig

AUDIO_PREFIXES = ("audio_encoder.", "audio_projector.")
QUANTIZABLE = {"llm": "model.layers.", "vision": "visual.blocks.", "whisper": "audio_encoder.layers."}  # stacks' linears
WHISPER_PREFIXES = ("model.encoder.", "encoder.", "audio_encoder.")  # ForConditionalGeneration, WhisperModel, a qva graft


def load(
    path: str | os.PathLike,
    whisper: str | os.PathLike | None = None,
    *,
    adapter: str | os.PathLike | None = None,
    audio_frames: str = "valid",
    audio_pool: int = 1,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    quantize_modules: tuple[str, ...] = ("llm",),
    progress=None,
) -> QVAModel:
    """Load a Qwen2-VL checkpoint, grafting the encoder of the Whisper checkpoint `whisper` if given, or a
    folder written by `save`, or a training run's adapter folder (its base is loaded, then the adapter
    and projector applied). `adapter=` applies a PEFT-layout LoRA adapter folder on top. The model
    carries `model.processor` when the folder has a tokenizer. A fresh projector is drawn from
    N(0, initializer_range) with `seed`. `quantize="nf4"` stores the linear weights of the stacks named in
    `quantize_modules` ("llm": the decoder layers; "vision", "whisper") quantized, each quantized as it is
    read (biases, norms and embeddings keep `dtype`). `progress(done, total)` is called as tensors load."""
    path = Path(path)
    if adapter is None and is_adapter_folder(path):
        adapter, path = path, base_of(path)
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

    if quantize is not None and quantize not in QUANTIZED_LINEARS:
        raise ValueError(f"quantize must be one of {sorted(QUANTIZED_LINEARS)}, got {quantize!r}")
    unknown = set(quantize_modules) - set(QUANTIZABLE)
    if unknown:
        raise ValueError(f"quantize_modules takes {sorted(QUANTIZABLE)}, got {sorted(unknown)}")
    with torch.device("meta"):
        model = QVAModel(cfg)
    prefixes = tuple(QUANTIZABLE[m] for m in quantize_modules) if quantize else ()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, Linear) and n.startswith(prefixes)}
    if fresh_graft:
        targets = {n: m for n, m in targets.items() if not n.startswith(AUDIO_PREFIXES)}  # quantized after grafting
    with Checkpoint(path) as ckpt:
        load_weights(model, ckpt, dtype=dtype, device=device, with_audio=not fresh_graft, progress=progress,
                     deferred={f"{n}.weight" for n in targets})
        for name, linear in targets.items():  # one high-precision weight at a time, quantized as read
            weight = ckpt.read(f"{name}.weight", dtype=dtype, device=device)
            _replace(model, name, QUANTIZED_LINEARS[quantize].from_linear(linear, weight))
            del weight
    if fresh_graft:
        model.audio_encoder = load_whisper_encoder(whisper, dtype=dtype or model.lm_head.weight.dtype, device=device)
        g = torch.Generator().manual_seed(seed)
        w = torch.empty(model.audio_projector.weight.shape).normal_(0.0, cfg.initializer_range, generator=g)
        model.audio_projector.weight = nn.Parameter(w.to(dtype or model.lm_head.weight.dtype).to(device or "cpu"))
        if quantize and "whisper" in quantize_modules:
            for name, linear in [(n, m) for n, m in model.audio_encoder.named_modules() if isinstance(m, Linear) and n.startswith("layers.")]:
                _replace(model.audio_encoder, name, QUANTIZED_LINEARS[quantize].from_linear(linear))
    assert_materialized(model, str(path))
    if adapter is not None:
        apply_adapter(model, adapter)
    model.processor = processor
    return model.eval()


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def load_weights(model: QVAModel, ckpt: Checkpoint, dtype=None, device=None, ignore=None, with_audio: bool = True, progress=None,
                 deferred: set[str] = frozenset()) -> None:
    """Assign the tensors of `ckpt` to a meta-built `model`: visual, LLM, untied lm_head and, unless
    `with_audio=False` (a fresh graft, whose audio parts come from elsewhere), the audio encoder and projector.
    `deferred` names the caller reads itself (weights to be quantized as they are read)."""
    tied = model.config.tie_word_embeddings
    skip = ({"lm_head.weight"} if tied else set()) | set(deferred)
    if not with_audio:
        skip |= {n for n in model.state_dict() if n.startswith(AUDIO_PREFIXES)}
    extra = lambda n: (tied and n == "lm_head.weight") or n in deferred or (ignore is not None and ignore(n))  # noqa: E731
    if not tied and "lm_head.weight" not in ckpt:
        raise CheckpointError(f"{ckpt.path}: config says tie_word_embeddings=false but there is no lm_head.weight")
    load_into(model, ckpt, skip=skip, ignore=extra, dtype=dtype, device=device, progress=progress)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def load_whisper_encoder(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    checkpoint: Checkpoint | None = None,
) -> WhisperEncoder:
    """The encoder of a Hugging Face Whisper checkpoint (or a qva graft); decoder tensors are never read.

    `dtype` defaults to the stored dtype; pass an open `checkpoint` to inspect what was read.
    """
    cfg = WhisperEncoderConfig.from_pretrained(path)
    ckpt = checkpoint or Checkpoint(path)
    prefix = next((p for p in WHISPER_PREFIXES if ckpt.names(p)), None)
    if prefix is None:
        raise CheckpointError(f"{path}: no Whisper encoder tensors (expected names under {' or '.join(WHISPER_PREFIXES)})")
    with torch.device("meta"):
        model = WhisperEncoder(cfg)
    try:
        load_into(model, ckpt, prefix=prefix, dtype=dtype, device=device)
    finally:
        if checkpoint is None:
            ckpt.close()
    assert_materialized(model, str(path))
    return model.eval()


def save(model: QVAModel, path: str | os.PathLike, processor: Processor | None = None, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write `model` (and its processor's tokenizer and preprocessing configs) to one folder, atomically.
    LoRA factors are not part of it: merge them first (`linear.merge_lora`) or save them as an adapter."""
    processor = processor or getattr(model, "processor", None)
    tied = model.config.tie_word_embeddings
    tensors = {n: t for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight") and ".lora_" not in n}
    files = processor.files() if processor is not None else {}
    return save_checkpoint(path, tensors, model.config.to_dict(), files, max_shard_bytes)
