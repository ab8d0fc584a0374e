"""The product over a stored weight, and the layers that use it (`Linear`, `LayerNorm`, `Conv1d`).

`matmul(x, W)` computes in **x's dtype** whatever W's storage dtype:
- same dtype: `F.linear` (decode-sized products on the kernel measured fastest, `decode.few_rows_product`);
- a stored weight of another dtype, under autograd: `StoredWeightProduct`, an autograd function that saves
  only the stored tensor (and x, if W trains) and re-derives the compute-dtype weight in backward, so a
  training step over bf16 weights holds no fp32 copy of more than one weight at a time, and a frozen weight
  never gets a `.grad`;
- the same without autograd: the cast goes into a scratch buffer (`buffers.cast_weight`);
- compiling for CPU with ≤ 4 rows over half-precision weights: `decode.gemv`.
The layers keep `nn.Linear`'s parameter names, so checkpoints load unchanged, and add LoRA if it was added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .buffers import cast_weight
from .decode import MAX_ROWS, few_rows_product, gemv, use_gemv
from .lora import with_lora


class StoredWeightProduct(torch.autograd.Function):
    """`x @ W.T + b` in x's dtype for a weight stored in another dtype, saving the stored tensor only.

    Forward casts W (and b) to x's dtype for the product and drops the copy; backward casts W again for
    the input gradient. x is saved only when W needs a gradient (x `[..., in]`, W `[out, in]`, b `[out]`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.to(grad.dtype)  # [..., out] @ [out, in]
        if ctx.needs_input_grad[1]:
            grad_w = (rearrange(grad, "... o -> o (...)") @ rearrange(x, "... i -> (...) i")).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = rearrange(grad, "... o -> (...) o").sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` `[..., out]`, computed in x's dtype whatever the weight's storage dtype."""
    if use_gemv(x, weight):
        return gemv(x, weight, bias)
    trains = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and weight.dtype != x.dtype and trains:
        return StoredWeightProduct.apply(x, weight, bias)
    # as one [rows, in] matrix: F.linear over a 3-D x without a bias is `matmul`, which for some inputs (a
    # strided slice, inference-mode weights that require grad) broadcasts W to a batched product and copies
    # it first: 60× slower for a vocabulary head (0.96 s instead of 15 ms for one row of the 2B model)
    rows = rearrange(x, "... i -> (...) i")  # [R, in]
    if weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        y = few_rows_product(rows, weight, bias) if rows.shape[0] <= MAX_ROWS else F.linear(rows, weight, bias)
    else:
        y = F.linear(rows, cast_weight(weight, x.dtype), None if bias is None else bias.to(x.dtype))
    return y.view(*x.shape[:-1], weight.shape[0])  # [..., out]


# -- layers over stored weights -------------------------------------------------------------------------------
class Linear(nn.Linear):
    """`nn.Linear` (same parameters and checkpoint names) whose product is `matmul`'s, plus LoRA if added."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return with_lora(self, x, matmul(x, self.weight, self.bias))


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` in the input's dtype, whatever its parameters' storage dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = (None if p is None else p.to(x.dtype) for p in (self.weight, self.bias))
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class Conv1d(nn.Conv1d):
    """`nn.Conv1d` in the input's dtype, whatever its parameters' storage dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), b)


def swap_linears(module: nn.Module, make, where=lambda name: True) -> int:
    """Replace each `Linear` under `module` whose qualified name `where` accepts by `make(linear)`; returns how many."""
    todo = [(name, m) for name, m in module.named_modules() if isinstance(m, Linear) and where(name)]
    for name, linear in todo:
        parent_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, leaf, make(linear))
    return len(todo)
