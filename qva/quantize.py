"""Which linears are stored quantized, how a folder records it, and when they are swapped (the model never knows).

    plan = Plan.for_load(cfg, path, quantize, modules, group_size)   # asked for, or recorded by a saved folder
    plan.prepare(model)                  # a saved quantized folder: empty quantized layers, filled like any other
    plan.quantize_as_read(model, ckpt)   # a plain checkpoint: each weight read once, quantized, the original dropped
    plan.quantize_stack(model, "whisper")   # a freshly grafted encoder, after it is loaded
    record(model)                        # what `qva.save` writes as `quantization_config`

The stacks (`QUANTIZABLE`): "llm" (the decoder layers' linears), "vision" (the vision blocks'), "whisper" (the
encoder layers'), "head" (the vocabulary head: with tied embeddings a quantized copy of the embedding, which is
then read only a row per token). Embeddings, norms and biases keep the load dtype. int4 takes only weights whose
`in` divides the group and `out` the 64-row packing block; others stay as loaded, and a saved model reloads
by the same rule. The formats are `linear.QUANTIZED_LINEARS`'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from weights_loader import Checkpoint, CheckpointError

from .linear import INT4_GROUPS, INT4_ROW_BLOCK, QUANTIZED_LINEARS, Linear, clear_scratch

QUANTIZABLE = {"llm": "model.layers.", "vision": "visual.blocks.", "whisper": "audio_encoder.layers.",  # stacks' linears
               "head": "lm_head"}  # the vocabulary head (tied: a quantized copy; the embedding keeps the load dtype)


@dataclass(frozen=True)
class Plan:
    format: str  # "int8" | "int4" | "nf4" | "w8a8"
    modules: tuple[str, ...]  # stacks of QUANTIZABLE
    group_size: int
    stored: bool  # the folder holds the quantized buffers already (a `qva.save` of a quantized model)

    @classmethod
    def for_load(cls, cfg, path, quantize: str | None, modules: tuple[str, ...], group_size: int) -> "Plan | None":
        """The plan for loading `path`: what it records (`quantization_config`), or what was asked; None for neither."""
        stored = stored_quantization(cfg, path)
        if stored is not None and quantize is not None:
            raise ValueError(f"{path} is already quantized ({stored['format']}): load it without quantize=")
        if stored is not None:
            return cls(stored["format"], tuple(stored["modules"]), stored.get("group_size", group_size), True)
        check(quantize, modules, group_size)
        return None if quantize is None else cls(quantize, tuple(modules), group_size, False)

    @property
    def kind(self):
        return QUANTIZED_LINEARS[self.format]

    def targets(self, model: nn.Module, stacks: tuple[str, ...] | None = None) -> dict[str, Linear]:
        """The `Linear`s of the plan's stacks (or of `stacks`) that the format applies to, by qualified name."""
        prefixes = tuple(QUANTIZABLE[m] for m in (self.modules if stacks is None else stacks) if m in self.modules)
        found = {n: m for n, m in model.named_modules() if isinstance(m, Linear) and prefixes and n.startswith(prefixes)}
        if self.format == "int4":
            found = {n: m for n, m in found.items() if m.in_features % self.group_size == 0 and m.out_features % INT4_ROW_BLOCK == 0}
        return found

    def read_targets(self, model: nn.Module, fresh_graft: bool) -> dict[str, Linear]:
        """The targets in the checkpoint being read (a fresh graft's encoder comes from elsewhere: `quantize_stack`)."""
        stacks = tuple(m for m in self.modules if not (fresh_graft and m == "whisper"))
        return self.targets(model, stacks)

    def prepare(self, model: nn.Module, targets: dict[str, Linear]) -> None:
        """A stored plan: put empty quantized layers in place, to be filled from the checkpoint like any module."""
        if self.stored:
            for name, linear in targets.items():
                replace_module(model, name, self.kind.empty_like(linear, group_size=self.group_size))

    def deferred(self, targets: dict[str, Linear]) -> set[str]:
        """Tensors the ordinary load must leave to `quantize_as_read`."""
        return set() if self.stored else {f"{n}.weight" for n in targets}

    def quantize_as_read(self, model: nn.Module, ckpt: Checkpoint, targets: dict[str, Linear], dtype=None, device=None) -> None:
        """Each target's high-precision weight read once (into one buffer the size of the largest, reused: fresh
        ones fragment the heap), quantized, and dropped."""
        if self.stored or not targets:
            return
        if "lm_head" in targets and "lm_head.weight" not in ckpt:  # tied: the head is the embedding, loaded already
            replace_module(model, "lm_head", self.kind.from_linear(targets["lm_head"], group_size=self.group_size))
            targets = {n: m for n, m in targets.items() if n != "lm_head"}
            if not targets:
                return
        infos = {name: ckpt.info(f"{name}.weight") for name in targets}
        read_dtype = dtype or next(iter(infos.values())).dtype
        buffer = torch.empty(max(i.nbytes // i.dtype.itemsize for i in infos.values()), dtype=read_dtype)
        for name, linear in targets.items():
            info = infos[name]
            weight = ckpt.read(f"{name}.weight", out=buffer[: math.prod(info.shape)].view(info.shape))
            if info.dtype != buffer.dtype and dtype is None:  # a checkpoint of mixed dtypes: read as stored
                weight = ckpt.read(f"{name}.weight")
            weight = weight if device is None else weight.to(device)
            replace_module(model, name, self.kind.from_linear(linear, weight, group_size=self.group_size))
        del buffer
        clear_scratch()  # the quantizer's row buffers

    def quantize_stack(self, model: nn.Module, stack: str) -> None:
        """Quantize a loaded stack in place (a freshly grafted Whisper encoder)."""
        for name, linear in self.targets(model, (stack,)).items():
            replace_module(model, name, self.kind.from_linear(linear, group_size=self.group_size))


def check(quantize: str | None, modules: tuple[str, ...], group_size: int) -> None:
    if quantize is not None and quantize not in QUANTIZED_LINEARS:
        raise ValueError(f"quantize must be one of {sorted(QUANTIZED_LINEARS)}, got {quantize!r}")
    unknown = set(modules) - set(QUANTIZABLE)
    if unknown:
        raise ValueError(f"quantize_modules takes {sorted(QUANTIZABLE)}, got {sorted(unknown)}")
    if quantize == "int4" and group_size not in INT4_GROUPS:
        raise ValueError(f"group_size must be one of {INT4_GROUPS} for int4, got {group_size!r}")


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


def record(model: nn.Module) -> dict | None:
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


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
