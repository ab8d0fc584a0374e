"""What each stage trains, checked, and how: the model built for the stage, its trainable set (against the
stage's rule by name), the table the run prints, AdamW's parameter groups and the learning-rate schedule.

    stage 1   `audio_projector` only; vision, Whisper and the LLM frozen
    stage 2   the projector and LoRA factors on the LLM's linears (`linear.add_lora`; over NF4 with `qlora`)
    stage lm  the LLM's weights (vision and Whisper frozen), `freeze` parts excepted
"""

from __future__ import annotations

import math

import torch

from ..linear import add_lora, lora_linears
from ..pretrained import load
from .config import DTYPES, TrainConfig, TrainError


def build_model(cfg: TrainConfig, device=None):
    """The model for the stage, with its trainable parameters in fp32 and everything else frozen."""
    dtype = DTYPES[cfg.dtype]
    model = load(cfg.model, whisper=cfg.whisper, audio_frames=cfg.audio_frames, audio_pool=cfg.audio_pool, seed=cfg.seed, dtype=dtype,
                 device=device, quantize="nf4" if cfg.qlora else None)
    if model.processor is None:
        raise TrainError(f"{cfg.model}: no tokenizer.json: training needs the model's tokenizer")
    if model.audio_encoder is not None:
        model.audio_encoder.to(DTYPES[cfg.whisper_dtype or cfg.dtype])
    if cfg.stage in ("1", "2"):
        if model.audio_projector is None:
            raise TrainError(f"stage {cfg.stage} trains the audio projector: give --whisper to graft one onto {cfg.model}")
        model.audio_projector.float()
    if cfg.stage == "2":
        for name, module in list(model.model.named_modules()):
            if name.rsplit(".", 1)[-1] in cfg.lora_targets:
                add_lora(module, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    if cfg.stage == "lm":
        model.model.float()
        model.lm_head.float()
        model.tie_weights()
    model.model.checkpoint_layers = cfg.activation_checkpointing
    freeze_for_stage(model, cfg)
    return model


def freeze_for_stage(model, cfg: TrainConfig) -> None:
    model.requires_grad_(False)
    if cfg.stage in ("1", "2"):
        model.audio_projector.requires_grad_(True)
    if cfg.stage == "2":
        for linear in lora_linears(model.model).values():
            linear.lora_A.requires_grad_(True)
            linear.lora_B.requires_grad_(True)
    if cfg.stage == "lm":
        model.model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        if "embeddings" in cfg.freeze:
            model.model.embed_tokens.requires_grad_(False)
        if "lm_head" in cfg.freeze:
            model.lm_head.requires_grad_(False)


def stage_rule(cfg: TrainConfig, tied: bool):
    """The stage's trainable set, by name (independent of how `freeze_for_stage` sets it)."""
    def trains(name: str) -> bool:
        lora = ".lora_A." in name or ".lora_B." in name
        if cfg.stage == "1":
            return name.startswith("audio_projector.")
        if cfg.stage == "2":
            return name.startswith("audio_projector.") or (lora and name.startswith("model.layers."))
        if name == "model.embed_tokens.weight":
            return "embeddings" not in cfg.freeze and not (tied and "lm_head" in cfg.freeze)
        if name == "lm_head.weight":
            return "lm_head" not in cfg.freeze
        return name.startswith("model.") and not lora
    return trains


def check_trainable(model, cfg: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by name; a `TrainError` if they are not exactly the stage's."""
    params = dict(model.named_parameters())  # tied weights appear once
    trains = stage_rule(cfg, model.config.tie_word_embeddings)
    actual = {n for n, p in params.items() if p.requires_grad}
    expected = {n for n in params if trains(n)}
    if actual != expected:
        extra, missing = sorted(actual - expected), sorted(expected - actual)
        raise TrainError(f"stage {cfg.stage}: the trainable set differs from the stage's: "
                         f"trainable but should not be {extra[:5]}, frozen but should train {missing[:5]}")
    if not actual:
        raise TrainError(f"stage {cfg.stage}: nothing to train")
    return {n: params[n] for n in sorted(actual)}


def part_of(name: str) -> str:
    if ".lora_" in name:
        return "LoRA"
    for prefix, part in (("visual.", "vision"), ("audio_encoder.", "whisper"), ("audio_projector.", "projector"),
                         ("model.embed_tokens.", "embeddings"), ("lm_head.", "lm_head"), ("model.", "LLM")):
        if name.startswith(prefix):
            return part
    return "other"


def trainable_table(model) -> str:
    """Per part: tensors and parameters that train, and parameters that stay frozen."""
    rows: dict[str, list] = {}
    for name, p in model.named_parameters():
        r = rows.setdefault(part_of(name), [0, 0, 0, ""])
        if p.requires_grad:
            r[0] += 1
            r[1] += p.numel()
            r[3] = r[3] or name
        else:
            r[2] += p.numel()
    lines = [f"{'part':<11} {'trainable tensors':>17} {'trainable params':>17} {'frozen params':>14}  e.g."]
    for part, (t, n, f, example) in rows.items():
        lines.append(f"{part:<11} {t:>17} {n:>17,} {f:>14,}  {example}")
    lines.append(f"{'total':<11} {sum(r[0] for r in rows.values()):>17} {sum(r[1] for r in rows.values()):>17,} "
                 f"{sum(r[2] for r in rows.values()):>14,}")
    return "\n".join(lines)


def make_optimizer(params: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and biases (1-D) do not; stage 2's projector may have its own rate."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in params.items():
        projector = cfg.stage == "2" and name.startswith("audio_projector.")
        groups.setdefault((p.ndim >= 2, projector), []).append(p)
    out = []
    for (decay, projector), ps in sorted(groups.items()):
        lr = (cfg.projector_lr or cfg.lr) if projector else cfg.lr
        out.append({"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": lr, "base_lr": lr})
    return torch.optim.AdamW(out, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
