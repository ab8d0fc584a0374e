"""W8A8 decode: int8 weights × a one-row activation rounded to 8 bits as it arrives, in integers (opt-in).

Decoding on a CPU reads every weight once a token. The weight-only int8 kernel (`weight_only.Int8Linear`) turns
each weight into floating point before multiplying, which on few cores costs more than reading it; with both
sides 8-bit the dot products stay integer (fbgemm's dynamic linear: VNNI's u8 × s8 → s32), as llama.cpp's Q8_0
does. A one-row product (decode at batch 1):

    x [1, in] → lo, hi = min(x, 0), max(x, 0);  s = (hi − lo) / L;  z = round(−lo / s)   L = 255 levels
                xq = clamp(round(x / s) + z, 0, L) u8 [1, in]                             (127 where the kernel's
    y [1, out] = s · weight_scale[out] · Σ (xq − z) · weight_int8                          int16 pairs saturate)

Products of several rows (prompts, batched decode) keep the activations in their dtype: they are `Int8Linear`'s,
on its kernels — one scale for many rows would let one row's outliers (a first token's) flatten the others, and
a prompt is bound by arithmetic, where bf16 is fast. The weights are `Int8Linear`'s buffers, so a saved file
differs only in its recorded format; what the format adds is the one-row activations' rounding, so it is opt-in
(`quantize="w8a8"`), never a kernel that `int8` picks. Two kernels compute the one-row product, chosen by `fastest`:
`fbgemm` over its own packed copy of the weight (made on first use; `weight_int8` stays for saving and the other
kernel, so the weights are then held twice), and `dequant`, the same rounding then `F.linear` over the integers
in x's dtype (gradients pass straight through the rounding; non-CPU devices take it). `fbgemm` is the custom op
`qva::w8a8_row` (its shape rule registered), so a compiled decode step runs it too, opaque in its graph, where
it was measured faster before tracing (`weight_only.measure_quantized`).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .buffers import cast_weight, kernel_copy
from .weight_only import Int8Linear, quantized_forward


@functools.cache
def fbgemm_available() -> bool:
    return torch.backends.quantized.engine in ("fbgemm", "x86") and hasattr(torch.ops.quantized, "linear_dynamic")


@functools.cache
def activation_levels() -> int:
    """255, or 127 where fbgemm's kernel sums u8 × s8 pairs in saturating int16 (no VNNI): probed on the worst
    case (every activation at the top level, every weight 127), not read from the CPU flags."""
    if not fbgemm_available():
        return 255
    packed = fbgemm_pack(torch.full((8, 64), 127, dtype=torch.int8), torch.ones(8))
    got = torch.ops.quantized.linear_dynamic(torch.ones(1, 64), packed, False)
    return 255 if torch.allclose(got, torch.full_like(got, 127.0 * 64), rtol=1e-4) else 127


def fbgemm_pack(q: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed copy of int8 `q` `[out, in]` with a scale per output row (its quantized-tensor API is
    deprecated in PyTorch 2.13 but is the one door to the kernel; the warning is silenced here)."""
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(q.shape[0], dtype=torch.int64), 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def packed_weight(weight_int8: torch.Tensor, weight_scale: torch.Tensor):
    """fbgemm's packed copy of `weight_int8` `[out, in]`, kept while the tensor lives; made again if either buffer
    was replaced or written since."""
    return kernel_copy(weight_int8, (weight_int8, weight_scale), "fbgemm", lambda: fbgemm_pack(weight_int8, weight_scale.float()))


def fbgemm_row_eager(x2: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor, levels: int) -> torch.Tensor:
    """`x2` `[1, in]` → `[1, out]` in x2's dtype: fbgemm's dynamic linear (the rounding of the module docstring)."""
    packed = packed_weight(weight_int8, weight_scale)
    return torch.ops.quantized.linear_dynamic(x2.float(), packed, levels == 127).to(x2.dtype)


@torch.library.custom_op("qva::w8a8_row", mutates_args=())
def fbgemm_row(x2: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor, levels: int) -> torch.Tensor:
    """`fbgemm_row_eager` as an operator, for a compiled step (eager calls skip the dispatcher's ~10 µs a call)."""
    return fbgemm_row_eager(x2, weight_int8, weight_scale, levels)


@fbgemm_row.register_fake
def _(x2, weight_int8, weight_scale, levels):
    return x2.new_empty(x2.shape[0], weight_int8.shape[0])


def round_row(x2: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x2` `[1, in]` → (`xq − z` fp32 `[1, in]`, integers in [−levels, levels]; `s` fp32 `[1, 1]`), the rounding
    fbgemm's dynamic kernel applies (see the module docstring); gradients pass straight through it."""
    t = x2.float()
    lo, hi = t.detach().amin(dim=1, keepdim=True).clamp(max=0), t.detach().amax(dim=1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / levels).clamp(min=1e-12)  # [1, 1]
    z = (-lo / s).round().clamp(0, levels)
    t = t / s
    return t + ((t.detach().round() + z).clamp(0, levels) - z - t.detach()), s


class W8A8Linear(Int8Linear):
    """`Int8Linear`'s weights; a one-row product rounds its activations to 8 bits (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.levels = activation_levels()  # probed once a process, at build: a compiled step then reads a number
        self.has_fbgemm = fbgemm_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1]:  # several rows: int8 weight-only
            return super().forward(x)
        levels = self.levels
        candidates = {}
        if x.device.type == "cpu" and self.has_fbgemm:
            row = fbgemm_row if torch.compiler.is_compiling() else fbgemm_row_eager
            candidates["fbgemm"] = lambda x2: row(x2, self.weight_int8, self.weight_scale, levels)

        def dequant(x2):  # the same rounding; integers up to 256 are exact in bf16, products summed in fp32
            xq, s = round_row(x2, levels)
            y = F.linear(xq.to(x2.dtype), cast_weight(self.weight_int8, x2.dtype))  # [1, out]
            return (y.float() * s * self.weight_scale.float()).to(x2.dtype)

        candidates["dequant"] = dequant
        return quantized_forward("w8a8", self, x, candidates, compiled=("fbgemm",))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, w8a8"
