"""NF4 (QLoRA, Dettmers et al., 2023): frozen base weights in 4-bit NormalFloat for training LoRA on top.

`NF4Linear` stores a weight as 4-bit NormalFloat codes in blocks of 64 with double-quantized absmax (8-bit,
blocks of 256), in plain uint8/fp32 buffers that DDP, FSDP2, safetensors and `torch.compile` see as ordinary
tensors; `NF4Product` dequantizes on the fly in the activations' dtype and saves only the codes for backward.
`quantize_nf4_(module)` swaps a module's `Linear`s. The layout equals bitsandbytes' (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .buffers import dequantize_out
from .dense import swap_linears
from .frozen import FrozenQuantizedLinear
from .lora import with_lora

# -- NF4: QLoRA's 4-bit NormalFloat base weights ------------------------------------------------------------
# The 16 levels are the QLoRA paper's (appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
# A weight is cut into blocks of 64, each scaled by its absmax; a value is stored as its nearest level (ties go
# to the lower one), two to a byte, the first in the high nibble. The fp32 absmax of every block is stored in
# 8 bits ("double quantization"): minus their mean, in blocks of 256, on the signed dynamic map of Dettmers
# (2015). In all 4 + 8/64 + 32/(64·256) ≈ 4.13 bits a weight; the layout equals bitsandbytes' (tested).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


NF4_BLOCK = 64


ABSMAX_BLOCK = 256


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map `[256]`, sorted: for exponents e = 0..6, the midpoints of 2^e + 1 points
    evenly spaced on [0.1, 1], times 10^(e − 6), with both signs; then 0 and 1."""
    values = []
    for e in range(7):
        points = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = ((points[:-1] + points[1:]) / 2.0 * 10 ** (e - 6)).tolist()
        values += mids + [-m for m in mids]
    return torch.tensor(sorted(values + [0.0, 1.0]), dtype=torch.float32)


_LEVELS: dict = {}


def _levels(kind: str, device) -> torch.Tensor:
    key = (kind, device)
    if key not in _LEVELS:
        _LEVELS[key] = (torch.tensor(NF4_LEVELS) if kind == "nf4" else dynamic_map()).to(device)
    return _LEVELS[key]


def quantize_blockwise(x: torch.Tensor, levels: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat `x` → (index of the nearest level of x / its block's absmax, uint8 `[n]`; absmax fp32 `[ceil(n/block)]`).
    A last partial block has its own absmax."""
    flat = x.reshape(-1).float()
    whole = flat.numel() // block * block
    full = rearrange(flat[:whole], "(b k) -> b k", k=block)
    absmax = full.abs().amax(dim=1)  # [full blocks]
    scaled = torch.clamp(full * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if whole < flat.numel():  # the last, partial block (divided rather than multiplied, as bitsandbytes does)
        rest = flat[whole:]
        last = rest.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, torch.clamp(rest / last, -1, 1)])
    bounds = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled, bounds).to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `quantize_blockwise`, fp32 `[n]`."""
    values = levels[codes.long()]
    n = values.numel()
    scale = absmax.repeat_interleave(block)[:n]
    return values * scale


def nf4_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A weight → NF4 buffers: packed codes uint8 `[numel/2]`, absmax codes uint8 `[blocks]`, their block
    scales fp32 `[ceil(blocks/256)]` and offset fp32 `[1]`."""
    if w.numel() % 2:
        raise ValueError(f"NF4 packs two values a byte: a weight of {w.numel()} values cannot be packed")
    codes, absmax = quantize_blockwise(w, _levels("nf4", w.device), NF4_BLOCK)
    offset = absmax.mean()
    absmax_codes, absmax_scale = quantize_blockwise(absmax - offset, _levels("dynamic", w.device), ABSMAX_BLOCK)
    return {"weight_nf4": (codes[0::2] << 4) | codes[1::2], "weight_absmax": absmax_codes,
            "weight_absmax_scale": absmax_scale, "weight_absmax_offset": offset.reshape(1)}


NF4_CHUNK = 2**19  # values dequantized per step on a CPU: its temporaries (2 MiB each) stay in cache


def nf4_dequantize(packed, absmax_codes, absmax_scale, offset, shape, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """NF4 buffers → the weight `shape` in `dtype` (computed in fp32, as bitsandbytes does), into `out` if given."""
    absmax = dequantize_blockwise(absmax_codes, absmax_scale, _levels("dynamic", packed.device), ABSMAX_BLOCK) + offset
    n = 2 * packed.numel()
    if n % NF4_BLOCK:  # a last, partial block
        codes = rearrange(torch.stack([packed >> 4, packed & 15], dim=1), "n two -> (n two)")
        w = dequantize_blockwise(codes, absmax, _levels("nf4", packed.device), NF4_BLOCK).reshape(shape)
        return w.to(dtype) if out is None else out.copy_(w)
    out = torch.empty(shape, dtype=dtype, device=packed.device) if out is None else out
    blocks = rearrange(out, "... -> (...)").view(-1, NF4_BLOCK)  # [blocks, 64], a view of out
    table = _nf4_pairs(packed.device)
    # in cache-sized pieces on a CPU (a 50 MB fp32 temporary costs more in page faults than the work itself);
    # each byte fetches its two fp32 levels as one 64-bit word (`torch.take`: one indexed load per byte, 5.7×
    # faster than an embedding lookup of 2-wide rows); each block of 64 takes its absmax
    step = NF4_CHUNK // NF4_BLOCK if packed.device.type == "cpu" and not torch.compiler.is_compiling() else blocks.shape[0]
    for b in range(0, blocks.shape[0], step):
        codes = packed[b * NF4_BLOCK // 2 : (b + step) * NF4_BLOCK // 2]  # [step * 32] bytes
        levels = torch.take(table, codes.long()).view(torch.float32).view(-1, NF4_BLOCK)  # [step, 64]: high nibble's, low's, …
        blocks[b : b + step] = levels * absmax[b : b + step, None]  # fp32 product, rounded once to dtype
    return out


def _nf4_pairs(device) -> torch.Tensor:
    """`[256]` int64: for every byte, the fp32 NF4 levels of its high and low nibble, in that order in memory."""
    key = ("nf4-pairs", device)
    if key not in _LEVELS:
        levels, byte = _levels("nf4", device), torch.arange(256, device=device)
        pairs = torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1)  # [256, 2] fp32
        _LEVELS[key] = pairs.contiguous().view(torch.int64).view(256)
    return _LEVELS[key]


class NF4Product(torch.autograd.Function):
    """`x @ W.T` for an NF4-stored W `[out, in]` (frozen): dequantized in x's dtype on the fly, forward and
    backward; only the 4-bit codes and the absmax buffers are saved."""

    @staticmethod
    def forward(ctx, x, packed, absmax_codes, absmax_scale, offset, shape):
        ctx.save_for_backward(packed, absmax_codes, absmax_scale, offset)
        ctx.shape = shape
        return F.linear(x, nf4_dequantize(packed, absmax_codes, absmax_scale, offset, shape, x.dtype, dequantize_out(shape, x)))

    @staticmethod
    def backward(ctx, grad):
        w = nf4_dequantize(*ctx.saved_tensors, ctx.shape, grad.dtype, dequantize_out(ctx.shape, grad))
        return grad @ w, None, None, None, None, None


class NF4Linear(FrozenQuantizedLinear):
    """A frozen linear whose weight is stored in NF4 (bias kept as it was); LoRA may be added on top."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, bias_dtype=torch.float32):
        """Empty buffers of the right shapes (`from_linear` fills them)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        n = in_features * out_features
        blocks = -(-n // NF4_BLOCK)
        self.register_buffer("weight_nf4", torch.empty(n // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("weight_absmax_scale", torch.empty(-(-blocks // ABSMAX_BLOCK), device=device))
        self.register_buffer("weight_absmax_offset", torch.empty(1, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False) if bias else None

    quantize = staticmethod(nf4_quantize)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return nf4_dequantize(self.weight_nf4, self.weight_absmax, self.weight_absmax_scale, self.weight_absmax_offset,
                              (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = NF4Product.apply(x, self.weight_nf4, self.weight_absmax, self.weight_absmax_scale, self.weight_absmax_offset,
                             (self.out_features, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return with_lora(self, x, y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"


def quantize_nf4_(module: nn.Module, where=lambda name: True) -> nn.Module:
    """Swap `module`'s `Linear`s (those `where` accepts) for `NF4Linear`s, in place; returns `module`."""
    swap_linears(module, NF4Linear.from_linear, where)
    return module
