"""The one door to files: loading and saving checkpoints, grafting Whisper on, applying adapters.

    model = qva.load("Qwen2-VL-2B-Instruct", whisper="whisper-large-v3-turbo")   # a fresh graft
    qva.save(model, "my-qva")                                                     # one folder, atomically
    model = qva.load("my-qva")                                                    # everything restored
    model = qva.load("run/stage2")            # a LoRA run's output: its base, its projector and adapter applied
    encoder = qva.load_whisper_encoder("whisper-large-v3-turbo")                  # Whisper's encoder alone

Modules are built on the `meta` device and filled tensor by tensor from the lazily opened checkpoint
(`weights_loader`), so loading costs the model's bytes once. A saved folder is an HF-style checkpoint:
the Qwen2-VL config plus `audio_config`, `audio_hidden_size`, `has_audio_encoder`, the audio token ids,
`audio_frames` and `audio_pool`; sharded safetensors with the family's key names (Qwen2-VL's legacy ones;
Qwen3-VL's `model.language_model.*`, `model.visual.*`, see `qwen2vl_config.CHECKPOINT_PREFIXES`) plus
`audio_encoder.*` and `audio_projector.weight`; the tokenizer with the audio tokens;
`preprocessor_config.json` (image processor + Whisper feature extractor fields).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from weights_loader import Checkpoint, CheckpointError, assert_materialized, load_into
from weights_loader.writer import atomic_folder, tensor_bytes, write_checkpoint_files

from .adapters import apply_adapter, base_of, graft_of, is_adapter_folder
from .model import QVAModel
from .processor import AUDIO_TOKENS, Processor
from .quantize import Plan
from .quantize import record as record_quantization
from .qwen2vl_config import AUDIO_TOKEN_IDS, Qwen2VLConfig, file_name, module_name
from .whisper_encoder import WhisperEncoder, WhisperEncoderConfig

AUDIO_PREFIXES = ("audio_encoder.", "audio_projector.")
WHISPER_PREFIXES = ("model.encoder.", "encoder.", "audio_encoder.")  # ForConditionalGeneration, WhisperModel, a qva graft


@contextlib.contextmanager
def on_meta():
    """Build modules on the meta device (no memory) without running `nn.init.normal_`: on meta it goes through
    `torch._refs`, whose first call imports torch._dynamo and sympy, ~90 MiB of resident memory (a third of a
    2B decoder layer's weights, counted against every load's peak) for values that are overwritten anyway."""
    saved = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.nn.init.normal_ = saved


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
    group_size: int = 64,
    progress=None,
) -> QVAModel:
    """Load a Qwen2-VL checkpoint, grafting the encoder of the Whisper checkpoint `whisper` if given, or a
    folder written by `save`, or a training run's adapter folder (its base is loaded, then the adapter
    and projector applied). `adapter=` applies a PEFT-layout LoRA adapter folder on top. The model
    carries `model.processor` when the folder has a tokenizer. A fresh projector is drawn from
    N(0, initializer_range) with `seed`. `quantize="int8" | "int4" | "nf4" | "w8a8"` stores the linear weights of the
    stacks named in `quantize_modules` ("llm": the decoder layers; "vision", "whisper"; "head": the vocabulary
    head) quantized, each as it is read (int4 in groups of `group_size` along the input; biases, norms and
    embeddings keep `dtype`; w8a8 stores int8's weights and also rounds one-row activations to 8 bits); a folder
    that `save` wrote from a quantized model loads quantized as it was (its config.json says how).
    `progress(done, total)` is called as tensors load."""
    dtype, device = check_dtype(dtype), check_device(device)
    path = Path(path)
    if adapter is None and is_adapter_folder(path):
        adapter, path = path, base_of(path)
    cfg = Qwen2VLConfig.from_pretrained(path)
    graft = graft_of(Path(adapter), whisper) if adapter is not None and cfg.audio is None else None
    if graft is not None:  # an adapter trained on a fresh graft: graft the same Whisper the same way first
        whisper, audio_frames, audio_pool, seed = graft["whisper"], graft["audio_frames"], graft["audio_pool"], graft["seed"]
    if whisper is not None:
        if cfg.audio is not None:
            raise CheckpointError(f"{path}: already has an audio encoder; load it without whisper= to use it")
        cfg = cfg.with_audio(WhisperEncoderConfig.from_pretrained(whisper), audio_frames, audio_pool)
    processor, cfg = load_processor(path, cfg, fresh_graft=whisper is not None)
    plan = Plan.for_load(cfg, path, quantize, quantize_modules, group_size)

    with on_meta():
        model = QVAModel(cfg)  # the grafted encoder too, filled from `whisper` below
    targets = plan.read_targets(model, fresh_graft=whisper is not None) if plan else {}
    if plan:
        plan.prepare(model, targets)
    with Checkpoint(path).rename(lambda n: module_name(n, cfg.family)) as ckpt:
        load_weights(model, ckpt, dtype=dtype, device=device, with_audio=whisper is None, progress=progress,
                     deferred=plan.deferred(targets) if plan else set())
        if plan:
            plan.quantize_as_read(model, ckpt, targets, dtype, device)
    if whisper is not None:
        graft_whisper(model, whisper, seed, dtype or model.dtype, device)
        if plan and "whisper" in plan.modules:
            plan.quantize_stack(model, "whisper")
    assert_materialized(model, str(path))
    if adapter is not None:
        apply_adapter(model, adapter)
    model.processor = processor
    return model.eval()


def load_processor(path: Path, cfg: Qwen2VLConfig, fresh_graft: bool = False) -> tuple[Processor | None, Qwen2VLConfig]:
    """The folder's processor (None without a tokenizer), checked against the audio encoder's mel bins, and the
    config. A fresh graft takes its audio token ids from the tokenizer, which adds the audio tokens after its
    last entry (Qwen2-VL's tokenizer ends at 151656, Qwen2.5-VL's at 151664); a saved graft's are checked."""
    if not (path / "tokenizer.json").is_file():
        return None, cfg
    if fresh_graft:
        from dataclasses import replace

        processor = Processor.from_pretrained(path, config=replace(cfg, audio=None))
        ids = {k: processor.token_id(t) for k, t in zip(AUDIO_TOKEN_IDS, AUDIO_TOKENS)}
        for k, tid in ids.items():
            if tid >= cfg.text.vocab_size:
                raise CheckpointError(f"{path / 'tokenizer.json'}: the audio token {k} would be id {tid}, outside the "
                                      f"model's {cfg.text.vocab_size} embedding rows")
        cfg = replace(cfg, **ids)
        processor.config = cfg
    else:
        processor = Processor.from_pretrained(path, config=cfg)
    if cfg.audio is not None and processor.feature_size not in (None, cfg.audio.num_mel_bins):
        raise CheckpointError(
            f"{path}: preprocessor_config.json feature_size {processor.feature_size} (mel bins) disagrees with the "
            f"audio encoder's num_mel_bins {cfg.audio.num_mel_bins}"
        )
    return processor, cfg


def graft_whisper(model: QVAModel, whisper, seed: int, dtype: torch.dtype, device) -> None:
    """Fill the meta-built `model.audio_encoder` from the Whisper checkpoint and draw a fresh projector."""
    fill_whisper_encoder(model.audio_encoder, whisper, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(model.audio_projector.weight.shape).normal_(0.0, model.config.initializer_range, generator=g)
    model.audio_projector.weight = nn.Parameter(w.to(dtype).to(device or "cpu"))


DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}


def check_dtype(dtype) -> torch.dtype | None:
    """`dtype` as a floating torch dtype (a name such as "bf16" is accepted), else a `ValueError` saying what is."""
    if dtype is None or dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower()]
    raise ValueError(f"dtype must be torch.float32, torch.bfloat16, torch.float16 (or one of {sorted(DTYPE_NAMES)}), got {dtype!r}")


def check_device(device) -> torch.device | None:
    """`device` as a torch device this machine has, else a `ValueError` naming it."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine (torch {torch.__version__}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={str(device)!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps", "meta", "xpu"):
        raise ValueError(f"device={str(device)!r}: qva runs on 'cpu', 'cuda' or 'mps'")
    return dev


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
    model.tie_weights()


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
    with on_meta():
        model = WhisperEncoder(cfg)
    fill_whisper_encoder(model, path, dtype, device, checkpoint)
    return model.eval()


def fill_whisper_encoder(encoder: WhisperEncoder, path, dtype=None, device=None, checkpoint: Checkpoint | None = None) -> None:
    """Assign a meta-built encoder's tensors from a Whisper checkpoint (any of `WHISPER_PREFIXES`)."""
    ckpt = checkpoint or Checkpoint(path)
    try:
        prefix = next((p for p in WHISPER_PREFIXES if ckpt.names(p)), None)
        if prefix is None:
            raise CheckpointError(f"{path}: no Whisper encoder tensors (expected names under {' or '.join(WHISPER_PREFIXES)})")
        load_into(encoder, ckpt, prefix=prefix, dtype=dtype, device=device)
    finally:
        if checkpoint is None:
            ckpt.close()
    assert_materialized(encoder, str(path))


def save(model: QVAModel, path: str | os.PathLike, processor: Processor | None = None, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write `model` (and its processor's tokenizer and preprocessing configs) to one folder, atomically.
    LoRA factors are not part of it: merge them first (`linear.merge_lora`) or save them as an adapter.
    `path` must be new, empty, or a folder `save` wrote before (then only its files are replaced; anything
    else in it stays); a file, a link or a folder of other files is refused (`WriteError`)."""
    with atomic_folder(path, "model", need=tensor_bytes(model.state_dict())) as tmp:
        write_model_files(model, tmp, processor, max_shard_bytes)
    return Path(os.path.abspath(path))


def write_model_files(model: QVAModel, folder: Path, processor: Processor | None = None, max_shard_bytes: int = 5 * 1024**3) -> None:
    """What `save` writes, into an existing (temporary) folder."""
    processor = processor or getattr(model, "processor", None)
    tied = model.config.tie_word_embeddings
    family = model.config.family
    tensors = {file_name(n, family): t for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight") and ".lora_" not in n}
    files = processor.files() if processor is not None else {}
    if processor is not None and model.config.audio is not None:
        files = with_audio_tokens(files, processor)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    quantization = record_quantization(model)
    if quantization is not None:
        config["quantization_config"] = quantization
    write_checkpoint_files(folder, tensors, config, files, max_shard_bytes)


def with_audio_tokens(files: dict[str, str], processor: Processor) -> dict[str, str]:
    """A graft's `tokenizer_config.json` (kept from the source checkpoint) with the audio tokens in it: its
    `added_tokens_decoder` overrides `tokenizer.json`'s added tokens in transformers (5.x, so in vLLM too), which
    otherwise split `<|audio_pad|>` into text pieces. tokenizer.json, where qva added them, is authoritative."""
    text = files.get("tokenizer_config.json")
    if text is None:
        return files
    cfg = json.loads(text)
    decoder = cfg.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for token in AUDIO_TOKENS:
            decoder[str(processor.token_id(token))] = {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                                       "single_word": False, "special": True}
    extra = cfg.get("additional_special_tokens")
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra + [t for t in AUDIO_TOKENS if t not in extra]
    return {**files, "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False)}
