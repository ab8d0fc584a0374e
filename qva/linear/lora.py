"""LoRA (Hu et al., 2021; PEFT's `LoraLayer`, torchtune's `LoRALinear`): where it is applied.

`add_lora(linear, r, alpha, dropout)` gives a linear (dense or quantized) two fp32 factors under PEFT's names,
`lora_A` `[r, in]` (kaiming-uniform) and `lora_B` `[out, r]` (zeros, so the model is unchanged at step 0);
its forward adds `lora_B(lora_A(dropout(x))) · alpha / r` (`with_lora`). The base keeps its names (`weight`,
`bias`), so base checkpoints load unchanged. `merge_lora` / `unmerge_lora` fold the product into a dense
stored weight and out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# -- LoRA -----------------------------------------------------------------------------------------------------
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the LLM's linears


def add_lora(linear: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Give `linear` (a dense or quantized linear) LoRA factors `lora_A` `[rank, in]` (kaiming-uniform, as PEFT) and
    `lora_B` `[out, rank]` (zeros), scaled by alpha / rank, with dropout on the factors' input. Returns `linear`."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be ≥ 1, got {rank}")
    device = next(t for t in (*linear.parameters(), *linear.buffers())).device
    linear.lora_A = nn.Linear(linear.in_features, rank, bias=False, dtype=dtype, device=device)
    linear.lora_B = nn.Linear(rank, linear.out_features, bias=False, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(linear.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(linear.lora_B.weight)
    linear.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    linear.lora_scaling = alpha / rank
    linear.lora_merged = False
    return linear


def lora_delta(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`lora_B(lora_A(dropout(x))) · scaling` `[..., out]`, computed in the factors' dtype, returned in x's."""
    a = linear.lora_A.weight
    h = F.linear(linear.lora_dropout(x.to(a.dtype)), a)  # [..., r]
    return (F.linear(h, linear.lora_B.weight) * linear.lora_scaling).to(x.dtype)


def lora_weight(linear: nn.Module) -> torch.Tensor:
    """The dense update `B @ A · scaling` `[out, in]`, fp32."""
    return (linear.lora_B.weight.float() @ linear.lora_A.weight.float()) * linear.lora_scaling


@torch.no_grad()
def merge_lora(linear: nn.Linear) -> None:
    """Fold the LoRA update into the stored weight (forward then skips the factors); `unmerge_lora` undoes it.
    A quantized base cannot take the update: merge into a bf16/fp32 load of the same checkpoint instead."""
    if not isinstance(linear, nn.Linear):  # qva's dense Linear; quantized layers hold no weight to fold into
        raise TypeError(f"cannot merge LoRA into a {type(linear).__name__}: load the base unquantized to merge")
    if not linear.lora_merged:
        linear.weight.copy_((linear.weight.float() + lora_weight(linear)).to(linear.weight.dtype))
        linear.lora_merged = True


@torch.no_grad()
def unmerge_lora(linear: nn.Linear) -> None:
    if linear.lora_merged:
        linear.weight.copy_((linear.weight.float() - lora_weight(linear)).to(linear.weight.dtype))
        linear.lora_merged = False


def lora_linears(module: nn.Module) -> dict[str, nn.Module]:
    """The linears of `module` that carry LoRA factors, by qualified name."""
    return {n: m for n, m in module.named_modules() if "lora_A" in m._modules and "lora_B" in m._modules}


def with_lora(linear: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y` (the base product) plus the LoRA update, if the module has one (and it is not merged)."""
    if "lora_A" not in linear._modules or linear.lora_merged:
        return y
    return y + lora_delta(linear, x)
