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

import contextlib
import math
import os
from pathlib import Path

import torch
from torch import nn

from weights_loader import Checkpoint, CheckpointError, assert_materialized, load_into
from weights_loader.writer import atomic_folder, tensor_bytes, write_checkpoint_files

from .adapters import apply_adapter, base_of, graft_of, is_adapter_folder
from .linear import (
    INT4_GROUPS,
    INT4_ROW_BLOCK,
    QUANTIZED_LINEARS,
    Linear,
    clear_scratch,
)
from .model import QVAModel
from .processor import Processor
from .qwen2vl_config import Qwen2VLConfig
from .whisper_encoder import WhisperEncoder, WhisperEncoderConfig

AUDIO_PREFIXES = ("audio_encoder.", "audio_projector.")
QUANTIZABLE = {"llm": "model.layers.", "vision": "visual.blocks.", "whisper": "audio_encoder.layers."}  # stacks' linears
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
    N(0, initializer_range) with `seed`. `quantize="int8" | "int4" | "nf4"` stores the linear weights of the
    stacks named in `quantize_modules` ("llm": the decoder layers; "vision", "whisper") quantized, each as it
    is read (int4 in groups of `group_size` along the input; biases, norms and embeddings keep `dtype`); a
    folder that `save` wrote from a quantized model loads quantized as it was (its config.json says how).
    `progress(done, total)` is called as tensors load."""
    dtype, device = check_dtype(dtype), check_device(device)
    path = Path(path)
    if adapter is None and is_adapter_folder(path):
        adapter, path = path, base_of(path)
    cfg = Qwen2VLConfig.from_pretrained(path)
    graft = graft_of(Path(adapter), whisper) if adapter is not None and cfg.audio is None else None
    if graft is not None:  # an adapter trained on a fresh graft: graft the same Whisper the same way first
        whisper, audio_frames, audio_pool, seed = graft["whisper"], graft["audio_frames"], graft["audio_pool"], graft["seed"]
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

    stored = stored_quantization(cfg, path)
    if stored is not None and quantize is not None:
        raise ValueError(f"{path} is already quantized ({stored['format']}): load it without quantize=")
    if stored is not None:
        quantize, quantize_modules, group_size = stored["format"], tuple(stored["modules"]), stored.get("group_size", group_size)
    check_quantize(quantize, quantize_modules, group_size)
    with on_meta():
        model = QVAModel(cfg)
    targets = quantization_targets(model, quantize, quantize_modules, group_size)
    if fresh_graft:
        targets = {n: m for n, m in targets.items() if not n.startswith(AUDIO_PREFIXES)}  # quantized after grafting
    kind = QUANTIZED_LINEARS.get(quantize)
    if stored is not None:  # empty quantized modules, filled from the checkpoint like any other
        for name, linear in targets.items():
            _replace(model, name, kind.empty_like(linear, group_size=group_size))
    with Checkpoint(path) as ckpt:
        load_weights(model, ckpt, dtype=dtype, device=device, with_audio=not fresh_graft, progress=progress,
                     deferred=set() if stored is not None else {f"{n}.weight" for n in targets})
        if stored is None:
            infos = {name: ckpt.info(f"{name}.weight") for name in targets}
            read_dtype = dtype or next(iter(infos.values())).dtype if infos else None
            # one read buffer, the size of the largest weight, reused for each (fresh ones fragment the heap)
            buffer = torch.empty(max((i.nbytes // i.dtype.itemsize for i in infos.values()), default=0), dtype=read_dtype)
            for name, linear in targets.items():  # one high-precision weight at a time, quantized as read
                info = infos[name]
                weight = ckpt.read(f"{name}.weight", out=buffer[: math.prod(info.shape)].view(info.shape))
                if info.dtype != buffer.dtype and dtype is None:  # a checkpoint of mixed dtypes: read as stored
                    weight = ckpt.read(f"{name}.weight")
                _replace(model, name, kind.from_linear(linear, weight if device is None else weight.to(device), group_size=group_size))
            del buffer
            clear_scratch()  # the quantizer's row buffers
    if fresh_graft:
        model.audio_encoder = load_whisper_encoder(whisper, dtype=dtype or model.lm_head.weight.dtype, device=device)
        g = torch.Generator().manual_seed(seed)
        w = torch.empty(model.audio_projector.weight.shape).normal_(0.0, cfg.initializer_range, generator=g)
        model.audio_projector.weight = nn.Parameter(w.to(dtype or model.lm_head.weight.dtype).to(device or "cpu"))
        if quantize and "whisper" in quantize_modules:
            for name, linear in quantization_targets(model, quantize, ("whisper",), group_size).items():
                _replace(model, name, kind.from_linear(linear, group_size=group_size))
    assert_materialized(model, str(path))
    if adapter is not None:
        apply_adapter(model, adapter)
    model.processor = processor
    return model.eval()


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


def check_quantize(quantize: str | None, modules: tuple[str, ...], group_size: int) -> None:
    if quantize is not None and quantize not in QUANTIZED_LINEARS:
        raise ValueError(f"quantize must be one of {sorted(QUANTIZED_LINEARS)}, got {quantize!r}")
    unknown = set(modules) - set(QUANTIZABLE)
    if unknown:
        raise ValueError(f"quantize_modules takes {sorted(QUANTIZABLE)}, got {sorted(unknown)}")
    if quantize == "int4" and group_size not in INT4_GROUPS:
        raise ValueError(f"group_size must be one of {INT4_GROUPS} for int4, got {group_size!r}")


def quantization_targets(model: QVAModel, quantize: str | None, modules: tuple[str, ...], group_size: int) -> dict[str, Linear]:
    """The `Linear`s of the named stacks that `quantize` applies to (int4 needs in % group and out % 64 == 0:
    others stay as loaded, and a saved model reloads by the same rule)."""
    if quantize is None:
        return {}
    prefixes = tuple(QUANTIZABLE[m] for m in modules)
    found = {n: m for n, m in model.named_modules() if isinstance(m, Linear) and n.startswith(prefixes)}
    if quantize == "int4":
        found = {n: m for n, m in found.items() if m.in_features % group_size == 0 and m.out_features % INT4_ROW_BLOCK == 0}
    return found


def stored_quantization(cfg, path) -> dict | None:
    """The `quantization_config` that `save` writes for a quantized model, checked; None for a plain checkpoint."""
    q = cfg.raw.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "qva" or q.get("format") not in QUANTIZED_LINEARS or \
            not isinstance(q.get("modules"), list) or set(q["modules"]) - set(QUANTIZABLE):
        raise CheckpointError(f"{Path(path) / 'config.json'}: quantization_config must be qva's "
                              f"{{'quant_method': 'qva', 'format': one of {sorted(QUANTIZED_LINEARS)}, 'modules': [...]}}, got {q!r}")
    return q


def model_quantization(model: QVAModel) -> dict | None:
    """What `save` records of a quantized model: the format, its group size and the quantized stacks."""
    by_kind = {kind: fmt for fmt, kind in QUANTIZED_LINEARS.items()}
    found = {(by_kind[type(m)], getattr(m, "group_size", None), stack) for n, m in model.named_modules() if type(m) in by_kind
             for stack, prefix in QUANTIZABLE.items() if n.startswith(prefix)}
    if not found:
        return None
    if len({(f, g) for f, g, _ in found}) > 1:
        raise ValueError(f"cannot save a model quantized in several formats: {sorted({(f, g) for f, g, _ in found})}")
    fmt, group, _ = next(iter(found))
    out = {"quant_method": "qva", "format": fmt, "modules": sorted({s for _, _, s in found})}
    return out | ({"group_size": group} if group is not None else {})


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
    with on_meta():
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
    tensors = {n: t for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight") and ".lora_" not in n}
    files = processor.files() if processor is not None else {}
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    quantization = model_quantization(model)
    if quantization is not None:
        config["quantization_config"] = quantization
    write_checkpoint_files(folder, tensors, config, files, max_shard_bytes)
