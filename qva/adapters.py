"""LoRA adapters in PEFT's layout: written by training, read by `qva.load`, loadable by PEFT itself.

A folder holds `adapter_config.json` (PEFT's `LoraConfig` fields: `peft_type` "LORA", `r`, `lora_alpha`,
`lora_dropout`, `target_modules`, `base_model_name_or_path`) and `adapter_model.safetensors` with the
factors under PEFT's names. A qva training run also puts the trained audio projector beside them
(`audio_projector.safetensors`), so `qva.load(folder)` gives the trained model: the base named in the
config, the projector, then the adapter. An adapter trained on a fresh graft (a plain Qwen2-VL plus
`--whisper`) records that graft in `audio_graft.json` (the Whisper checkpoint, `audio_frames`,
`audio_pool`), so loading grafts the same encoder first. Paths are recorded relative to the adapter
folder when the two sit under one parent (moving `runs/` keeps them valid), absolute otherwise.

Key forms: PEFT on transformers 5 names the LLM `model.language_model.layers.N…` under `base_model.model.`
and loads nothing (it only warns) from the older `base_model.model.model.layers.N…`; we write the
former and read both (and PEFT's in-memory `.default` infix). qva's own names are the legacy checkpoint
names (`model.layers.N…`, `visual.…`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from weights_loader import Checkpoint, CheckpointError
from weights_loader.writer import atomic_folder

from .linear import QUANTIZED_LINEARS, Linear, add_lora, lora_linears
from .qwen2vl_config import TRANSFORMERS5_PREFIXES, swap_prefix

CONFIG, WEIGHTS, PROJECTOR, GRAFT = "adapter_config.json", "adapter_model.safetensors", "audio_projector.safetensors", "audio_graft.json"
PEFT_PREFIX = "base_model.model."
HF5 = TRANSFORMERS5_PREFIXES  # (qva prefix, transformers-5 prefix)


def to_peft_name(name: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A.weight` → `base_model.model.model.language_model.layers.0…`."""
    return PEFT_PREFIX + swap_prefix(name, HF5)


def from_peft_name(key: str) -> str:
    """Either PEFT key form (and `.default`) → qva's name."""
    return swap_prefix(key.removeprefix(PEFT_PREFIX).replace(".default.", "."), HF5, forward=False)


def is_adapter_folder(path: Path) -> bool:
    """A folder with an adapter and no model of its own (a LoRA training run's output)."""
    return (path / CONFIG).is_file() and not (path / "config.json").is_file()


def read_adapter_config(folder: Path) -> dict:
    file = Path(folder) / CONFIG
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read the adapter config ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: field 'peft_type' must be 'LORA' (qva applies LoRA adapters only)")
    unsupported = {k: cfg[k] for k in ("use_dora", "fan_in_fan_out", "use_rslora", "rank_pattern", "alpha_pattern") if cfg.get(k)}
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg["bias"]
    if unsupported:
        raise CheckpointError(f"{file}: unsupported adapter options {unsupported} (qva applies plain LoRA)")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), kind) or cfg[key] <= 0:
            raise CheckpointError(f"{file}: field {key!r} must be a positive number, got {cfg.get(key)!r}")
    return cfg


def base_of(folder: Path) -> Path:
    """The base model an adapter folder names (`base_model_name_or_path`, relative to the folder if relative)."""
    cfg = read_adapter_config(folder)
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{folder / CONFIG}: no base_model_name_or_path: load the base with qva.load(base, adapter={str(folder)!r})")
    path = Path(base) if Path(base).is_absolute() else folder / base
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{folder / CONFIG}: base model {base!r} not found (looked in {os.path.normpath(path)}): point to it "
                              f"with qva.load(BASE, adapter={str(folder)!r}) or qva-train merge/eval BASE --adapter {folder}")
    return Path(os.path.normpath(path))


def path_ref(target: str | os.PathLike, folder: str | os.PathLike) -> str:
    """How `folder` records `target`: relative when both sit under the folder's parent, else absolute."""
    target, folder = Path(os.path.abspath(target)), Path(os.path.abspath(folder))
    if folder.parent == target or folder.parent in target.parents:
        return os.path.relpath(target, folder)
    return str(target)


def graft_of(folder: Path, whisper: str | os.PathLike | None = None) -> dict | None:
    """The fresh graft an adapter was trained on (`audio_graft.json`), its Whisper path resolved (`whisper`
    overrides it); None for an adapter of a model that had its encoder already."""
    file = folder / GRAFT
    if not file.is_file():
        if (folder / PROJECTOR).is_file() and whisper is None:
            raise CheckpointError(f"{folder / PROJECTOR}: the base model has no audio encoder and {folder} records no Whisper "
                                  f"checkpoint ({GRAFT}): load it with qva.load(BASE, whisper=WHISPER, adapter={str(folder)!r})")
        return None
    try:
        graft = json.loads(file.read_text())
        frames, pool, ref = graft["audio_frames"], int(graft["audio_pool"]), graft["whisper"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot read the graft record ({type(e).__name__}: {e})") from None
    if whisper is None:
        whisper = Path(ref) if Path(ref).is_absolute() else folder / ref
        if not (Path(whisper) / "config.json").is_file():
            raise CheckpointError(f"{file}: Whisper checkpoint {ref!r} not found (looked in {os.path.normpath(whisper)}): point to it "
                                  f"with qva.load({str(folder)!r}, whisper=WHISPER) or qva-train merge/eval --whisper WHISPER")
    return {"whisper": Path(os.path.normpath(whisper)), "audio_frames": frames, "audio_pool": pool, "seed": int(graft.get("seed", 0))}


def targets_match(targets, module: str) -> bool:
    """Whether PEFT's `target_modules` (a list of names or suffixes, a regex, or "all-linear") covers `module`."""
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        peft_form = to_peft_name(module).removeprefix(PEFT_PREFIX)
        return bool(re.fullmatch(targets, module) or re.fullmatch(targets, peft_form))
    return any(module == t or module.endswith("." + t) for t in targets)


def apply_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Add LoRA factors from a PEFT-layout folder to the matching `Linear`s, and the trained projector if saved."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    if not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS}")
    with Checkpoint(folder / WEIGHTS) as ckpt:
        by_module: dict[str, dict[str, str]] = {}
        for key in ckpt.names():
            name = from_peft_name(key)
            module, _, leaf = name.rpartition(".lora_")
            if leaf not in ("A.weight", "B.weight"):
                raise CheckpointError(f"{folder / WEIGHTS}: tensor {key!r} is not a LoRA factor (lora_A / lora_B weight)")
            by_module.setdefault(module, {})[leaf[0]] = key
        if not by_module:
            raise CheckpointError(f"{folder / WEIGHTS}: holds no LoRA tensors")
        targets = cfg.get("target_modules")
        if targets is not None and not isinstance(targets, (str, list)):
            raise CheckpointError(f"{folder / CONFIG}: field 'target_modules' must be a list of names or a regex, got {targets!r}")
        outside = [m for m in sorted(by_module) if not targets_match(targets, m)]
        if outside:
            raise CheckpointError(f"{folder / WEIGHTS}: LoRA tensors for {outside[:3]} ({len(outside)} modules) are not in "
                                  f"target_modules {targets!r} of {CONFIG}")
        if isinstance(targets, list):
            unused = [t for t in targets if not any(m == t or m.endswith("." + t) for m in by_module)]
            if unused:
                raise CheckpointError(f"{folder / CONFIG}: target_modules names {unused} but {WEIGHTS} has no LoRA tensors for them")
        for module_name, keys in sorted(by_module.items()):
            try:
                linear = model.get_submodule(module_name)
            except AttributeError:
                linear = None
            if not isinstance(linear, (Linear, *QUANTIZED_LINEARS.values())) or set(keys) != {"A", "B"}:
                raise CheckpointError(f"{folder / WEIGHTS}: {module_name!r} is not a linear layer of this model with both LoRA factors")
            add_lora(linear, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0))
            for part in ("A", "B"):
                factor = getattr(linear, f"lora_{part}").weight
                info = ckpt.info(keys[part])
                if tuple(info.shape) != tuple(factor.shape):
                    raise CheckpointError(f"{folder / WEIGHTS}: {keys[part]} has shape {list(info.shape)}, expected {list(factor.shape)}")
                value = ckpt.read(keys[part])
                if not bool(torch.isfinite(value).all()):
                    raise CheckpointError(f"{folder / WEIGHTS}: {keys[part]} holds NaN or infinite values")
                with torch.no_grad():
                    factor.copy_(value)
    if (folder / PROJECTOR).is_file():
        if getattr(model, "audio_projector", None) is None:
            raise CheckpointError(f"{folder / PROJECTOR}: the base model has no audio projector")
        with Checkpoint(folder / PROJECTOR) as ckpt:
            weight = ckpt.read("audio_projector.weight", dtype=torch.float32)
        if not bool(torch.isfinite(weight).all()):
            raise CheckpointError(f"{folder / PROJECTOR}: audio_projector.weight holds NaN or infinite values")
        if weight.shape != model.audio_projector.weight.shape:
            raise CheckpointError(f"{folder / PROJECTOR}: shape {list(weight.shape)}, "
                                  f"the model's projector is {list(model.audio_projector.weight.shape)}")
        model.audio_projector.weight = nn.Parameter(weight.to(model.audio_projector.weight.device))


def save_adapter(model: nn.Module, folder: str | os.PathLike, base: str | os.PathLike | None,
                 projector: bool = True, files: dict[str, str] | None = None, graft: dict | None = None) -> Path:
    """Write the model's LoRA factors (and, with `projector`, its audio projector) as a PEFT-layout folder,
    atomically (a new or empty folder, or an adapter folder written before). `base` goes into
    `base_model_name_or_path`; `graft` ({"whisper", "audio_frames", "audio_pool"}) records a fresh graft."""
    with atomic_folder(folder, "adapter") as tmp:
        write_adapter_files(model, tmp, base, projector, files, graft, at=folder)
    return Path(os.path.abspath(folder))


def write_adapter_files(model: nn.Module, folder: Path, base: str | os.PathLike | None, projector: bool = True,
                        files: dict[str, str] | None = None, graft: dict | None = None, at: str | os.PathLike | None = None) -> None:
    """What `save_adapter` writes, into an existing (temporary) folder; paths are recorded as seen from `at`,
    the folder's final place."""
    at = at or folder
    linears = lora_linears(model)
    if not linears:
        raise ValueError("the model has no LoRA factors to save")
    first = next(iter(linears.values()))
    rank = first.lora_A.out_features
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None if base is None else path_ref(base, at),
        "r": rank, "lora_alpha": first.lora_scaling * rank, "lora_dropout": dropout,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in linears}), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    tensors = {}
    for name, linear in linears.items():
        for part in ("A", "B"):
            tensors[to_peft_name(f"{name}.lora_{part}.weight")] = getattr(linear, f"lora_{part}").weight.detach().contiguous().cpu()
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    if projector and getattr(model, "audio_projector", None) is not None:
        save_file({"audio_projector.weight": model.audio_projector.weight.detach().contiguous().cpu()}, folder / PROJECTOR,
                  metadata={"format": "pt"})
    if graft is not None:
        record = {"whisper": path_ref(graft["whisper"], at), "audio_frames": graft["audio_frames"], "audio_pool": graft["audio_pool"]}
        (folder / GRAFT).write_text(json.dumps(record, indent=2))
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
