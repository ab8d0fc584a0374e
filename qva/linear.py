"""How a stored weight is multiplied: the one home for it (dense, NF4, LoRA).

Everything that multiplies activations by a weight as it sits in memory goes through `matmul` (and the
small `LayerNorm` / `Conv1d` wrappers): the dtype policy, the decode kernels and LoRA live here, so the
model files (`qwen2.py`, `vision.py`, `whisper_encoder.py`) read like the papers.

**Dtype policy.** Weights stay stored as loaded (fp32, bf16, fp16). A stack (LLM, vision, Whisper) picks
its activation dtype once, with `large_matmul_dtype`: on a CPU without native half-precision matmul
(no AVX512-BF16 / AMX) products with bf16/fp16 weights run ~40–100× slower than fp32, so many-row
products (prefill, vision, Whisper) run in fp32 there (which CPU is which is measured once per machine,
`cpu_has_fast_half_matmul`); one-token decoding stays in the storage dtype
(bound by bandwidth, and half the bytes). `matmul(x, W)` then computes in **x's dtype**:
- same dtype: `F.linear`;
- a stored weight of another dtype, under autograd: `StoredWeightProduct`, an autograd function that
  saves only the stored tensor (and x, if W trains) and re-derives the compute-dtype weight in backward,
  so a training step over bf16 weights holds no fp32 copy of more than one weight at a time, and a
  frozen weight never gets a `.grad`;
- the same without autograd: the cast goes into a per-shape scratch buffer reused by every layer and
  forward (a fresh 50–100 MB allocation costs ~8× the copy itself in page faults); `clear_scratch()`
  frees it;
- compiling for CPU with ≤ 4 rows over half-precision weights: `gemv`, written so that inductor reads
  each weight once for all rows.
Override the policy with `QVA_COMPUTE_DTYPE=auto|storage|float32` or `set_policy(...)`.

**LoRA** (Hu et al., 2021; PEFT's `LoraLayer`, torchtune's `LoRALinear`): `add_lora(linear, r, alpha,
dropout)` gives a `Linear` two fp32 factors under PEFT's names, `lora_A` `[r, in]` (kaiming-uniform) and
`lora_B` `[out, r]` (zeros, so the model is unchanged at step 0); forward adds
`lora_B(lora_A(dropout(x))) · alpha / r`. The base keeps its names (`weight`, `bias`), so base
checkpoints load unchanged. `merge_lora` / `unmerge_lora` fold the product into the stored weight and out.

**NF4** (QLoRA, Dettmers et al., 2023): `NF4Linear` stores a frozen base weight as 4-bit NormalFloat codes in
blocks of 64 with double-quantized absmax (8-bit, blocks of 256), in plain uint8/fp32 buffers that DDP, FSDP2,
safetensors and `torch.compile` see as ordinary tensors; `NF4Product` dequantizes on the fly in the
activations' dtype and saves only the codes for backward. `quantize_nf4_(module)` swaps a module's `Linear`s.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# -- the dtype policy ---------------------------------------------------------------------------------------
POLICIES = ("auto", "storage", "float32")
HALF = (torch.bfloat16, torch.float16)  # the storage dtypes the policy is about
_policy: str | None = None


def set_policy(policy: str | None) -> None:
    """"auto" (fp32 for large products only where bf16/fp16 is slow), "storage" (never upcast), "float32"
    (always); None: back to `QVA_COMPUTE_DTYPE` or "auto"."""
    global _policy
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"compute dtype policy must be one of {POLICIES}, got {policy!r}")
    _policy = policy


def policy() -> str:
    if _policy is not None:
        return _policy
    env = os.environ.get("QVA_COMPUTE_DTYPE", "auto")
    if env not in POLICIES:
        raise ValueError(f"QVA_COMPUTE_DTYPE must be one of {POLICIES}, got {env!r}")
    return env


def _cpu_flags_say_fast_half_matmul() -> bool:
    """True if this CPU multiplies bf16/fp16 matrices natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags or "amx_fp16" in flags


_FAST_HALF_MATMUL: bool | None = None  # decided once per process (then compiled code sees a constant)


def cpu_has_fast_half_matmul() -> bool:
    """Whether a bf16 product of many rows beats casting to fp32 on this CPU: measured once per machine (a
    prefill-sized product each way, cached with the kernel choices, `fastest`), not read from the flags —
    builds and BIOS settings differ (oneDNN may not use AMX; `ONEDNN_MAX_CPU_ISA` may cap it). While tracing
    for `torch.compile` before it is known, the flags (AVX512-BF16 / AMX) answer instead."""
    global _FAST_HALF_MATMUL
    if _FAST_HALF_MATMUL is None:
        if torch.compiler.is_compiling():
            return _cpu_flags_say_fast_half_matmul()
        x, w = torch.randn(128, 1024, dtype=torch.bfloat16), torch.randn(1024, 1024, dtype=torch.bfloat16)
        with torch.no_grad():
            choice = fastest("half-matmul:bf16:128x1024x1024",  # the cache file is per thread count already
                             {"half": lambda: F.linear(x, w), "float32": lambda: F.linear(x.float(), w.float())})
        _FAST_HALF_MATMUL = choice == "half"
    return _FAST_HALF_MATMUL


def large_matmul_dtype(weight_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The activation dtype for compute-bound products (many rows) over weights stored in `weight_dtype`."""
    if weight_dtype not in HALF:
        return weight_dtype
    p = policy()
    if p == "storage":
        return weight_dtype
    if p == "float32" or device.type == "cpu" and not cpu_has_fast_half_matmul():
        return torch.float32
    return weight_dtype


# -- products over a stored weight ---------------------------------------------------------------------------
_scratch = threading.local()
SCRATCH_MAX_BYTES = 256 * 2**20  # larger casts (a vocabulary head) are not kept between calls


def clear_scratch() -> None:
    """Free the buffers that hold cast copies of weights between forwards (one per weight shape)."""
    _scratch.__dict__.clear()


def cast_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`w` in `dtype`. Without autograd the copy is written into a scratch buffer reused for every weight of
    that shape, so it is valid only until the next cast of the same shape: use it at once."""
    if w.dtype == dtype:
        return w
    nbytes = w.numel() * dtype.itemsize
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or nbytes > SCRATCH_MAX_BYTES:
        return w.to(dtype)
    return scratch(tuple(w.shape), dtype, w.device).copy_(w)


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device, use: str = "cast") -> torch.Tensor:
    """The kept buffer of `shape` and `dtype` for one `use` (cast weights, dequantized weights, quantizer rows),
    made on first request; `clear_scratch` frees them all."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (use, shape, dtype, device)
    if key not in buffers:
        buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffers[key]


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


# -- decode: matrix–vector products over half-precision weights, for torch.compile on CPU ----------------------
# One-token decoding reads every weight once per step, so its speed is the rate at which weights stream
# from memory. PyTorch's CPU kernels for `x @ W.T` over half-precision W fall short of that: with one row
# they keep one accumulator per output (~20 GB/s on a 2-core AVX2 machine whose reductions read 36 GB/s),
# and with 2–4 rows they take a GEMM path that converts the weights once per row (~4× slower per step).
# Written as below — 16 weights per vector, one product-and-sum per input row — inductor emits one loop
# per weight row that converts each 16 weights once, keeps two accumulators for each of up to 4 input
# rows, and finishes the 16-lane sums while they are in cache.
LANES = 16  # weights per AVX2 step: two 8-float vectors, two independent accumulators
MAX_ROWS = 4  # more input rows than this run out of vector registers; those go to F.linear
MIN_IN_FEATURES = 512  # the 16-lane partial sums (64 bytes a row per input row) must stay small next to a weight row


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` for `x` `[..., I]` with at most `MAX_ROWS` rows, accumulated in fp32, in x's dtype."""
    out_features, in_features = weight.shape
    w = rearrange(weight, "o (k l) -> o k l", l=LANES).float()  # [O, I/16, 16]: converted in registers once fused
    rows = rearrange(x, "... (k l) -> (...) k l", l=LANES).float().contiguous()  # [R, I/16, 16]
    # as_strided makes inductor write `rows` to memory; otherwise it inlines x's producer (an RMSNorm, a
    # SiLU gate) into the loop below and recomputes it for every weight row.
    rows = rows.as_strided(rows.shape, rows.stride())
    partial = torch.stack([(w * row).sum(1) for row in rows.unbind(0)])  # [R, O, 16]: one pass over w
    y = partial.sum(-1)  # [R, O]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def few_rows_product(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` of ≤ `MAX_ROWS` rows `[R, in]` over a weight of the same dtype. On a CPU with half-precision
    weights and no autograd, by oneDNN (PyTorch's default) or by PyTorch's own kernel, whichever was measured
    faster for this shape and row count here (`fastest`): on an AVX-512-BF16 EPYC oneDNN's bf16 matrix–vector
    product reads 22 GB/s and PyTorch's own 53 GB/s, while from 4 rows on oneDNN is the faster."""
    if torch.compiler.is_compiling():  # the compiled decode step: as measured before compiling (`measure_gemv`)
        if _decode_kernel.get((*weight.shape, weight.dtype, rows.shape[0])) == "aten":
            return linear_without_onednn(rows, weight, bias)
        return F.linear(rows, weight, bias)
    if weight.dtype not in HALF or rows.device.type != "cpu" or torch.is_grad_enabled() or not torch.backends.mkldnn.is_available():
        return F.linear(rows, weight, bias)
    key = f"few-rows:{weight.dtype}:{weight.shape[0]}x{weight.shape[1]}:r{rows.shape[0]}"
    choice = fastest(key, {"linear": lambda: F.linear(rows, weight, bias), "aten": lambda: _without_onednn(rows, weight, bias)})
    return _without_onednn(rows, weight, bias) if choice == "aten" else F.linear(rows, weight, bias)


def _without_onednn(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)  # PyTorch's own CPU kernels for this one product
    try:
        return F.linear(rows, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


@torch.library.custom_op("qva::linear_without_onednn", mutates_args=())
def linear_without_onednn(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`_without_onednn` as an operator, so that a compiled step can call it as one opaque kernel."""
    return _without_onednn(rows, weight, bias)


@linear_without_onednn.register_fake
def _(rows, weight, bias):
    return rows.new_empty(rows.shape[0], weight.shape[0])


def gemv_eligible(rows: int, weight: torch.Tensor) -> bool:
    """Products `gemv` can take: CPU, half-precision weights, wide rows (a multiple of 16), ≤ MAX_ROWS rows."""
    return (weight.device.type == "cpu" and weight.dtype in HALF and weight.shape[1] % LANES == 0
            and weight.shape[1] >= MIN_IN_FEATURES and rows <= MAX_ROWS)


_decode_kernel: dict[tuple, str] = {}  # (out, in, dtype, rows) → what the compiled decode step runs: gemv | linear | aten


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True while compiling where `gemv` can take the product and was not measured slower than `F.linear`
    on this machine (`measure_gemv`; on CPUs with native bf16 matmul, PyTorch's GEMM can win at 2–4 rows)."""
    rows = x.numel() // x.shape[-1]
    return (torch.compiler.is_compiling() and gemv_eligible(rows, weight)
            and _decode_kernel.get((*weight.shape, weight.dtype, rows), "gemv") == "gemv")


def measure_gemv(modules: list[nn.Module], rows: int) -> None:
    """Before a decode step with `rows` rows is compiled: for each weight shape in `modules` (the LLM and its
    head) that `gemv` could take, time the compiled `gemv` against `F.linear` (oneDNN's kernel) and PyTorch's
    own kernel (`linear_without_onednn`), once per machine (`fastest` keeps the choice), so that the compiled
    step runs what is faster here (`use_gemv`, `few_rows_product`). Compiling gemv for a shape costs seconds, once."""
    shapes = {(tuple(m.weight.shape), m.weight.dtype) for module in modules for m in module.modules()
              if isinstance(m, Linear) and gemv_eligible(rows, m.weight)}
    for (out_f, in_f), dtype in sorted(shapes, key=str):
        if (out_f, in_f, dtype, rows) in _decode_kernel:
            continue
        w = torch.randn(out_f, in_f).to(dtype)
        x = torch.randn(rows, in_f).to(dtype)
        compiled = []

        def run_gemv():
            if not compiled:
                compiled.append(torch.compile(gemv, fullgraph=True, dynamic=False))
            return compiled[0](x, w)

        key = f"decode:{out_f}x{in_f}:{rows}:{str(dtype)[6:]}:cpu"
        candidates = {"gemv": run_gemv, "linear": lambda: F.linear(x, w)}
        if torch.backends.mkldnn.is_available():
            candidates["aten"] = lambda: _without_onednn(x, w, None)
        # every shape is one more compiled entry of `gemv`: allow them all (dynamo's default stops at 8)
        with torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
            _decode_kernel[(out_f, in_f, dtype, rows)] = fastest(key, candidates)


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


# -- LoRA -----------------------------------------------------------------------------------------------------
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the LLM's linears


def add_lora(linear: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Give `linear` (a `Linear` or a quantized linear of this file) LoRA factors `lora_A` `[rank, in]` (kaiming-uniform, as PEFT) and `lora_B` `[out, rank]`
    (zeros), scaled by alpha / rank, with dropout on the factors' input. Returns `linear`."""
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
def merge_lora(linear: Linear) -> None:
    """Fold the LoRA update into the stored weight (forward then skips the factors); `unmerge_lora` undoes it.
    A quantized base cannot take the update: merge into a bf16/fp32 load of the same checkpoint instead."""
    if not isinstance(linear, Linear):
        raise TypeError(f"cannot merge LoRA into a {type(linear).__name__}: load the base unquantized to merge")
    if not linear.lora_merged:
        linear.weight.copy_((linear.weight.float() + lora_weight(linear)).to(linear.weight.dtype))
        linear.lora_merged = True


@torch.no_grad()
def unmerge_lora(linear: Linear) -> None:
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
        return F.linear(x, nf4_dequantize(packed, absmax_codes, absmax_scale, offset, shape, x.dtype, _dequantize_out(shape, x)))

    @staticmethod
    def backward(ctx, grad):
        w = nf4_dequantize(*ctx.saved_tensors, ctx.shape, grad.dtype, _dequantize_out(ctx.shape, grad))
        return grad @ w, None, None, None, None, None


def _dequantize_out(shape, like: torch.Tensor) -> torch.Tensor | None:
    """The kept buffer a dequantized weight of `shape` in `like`'s dtype is written into, used at once (None
    when compiling: inductor allocates its own)."""
    return None if torch.compiler.is_compiling() else scratch(tuple(shape), like.dtype, like.device, "dequantize")


def filled(q: nn.Module, buffers: dict[str, torch.Tensor], linear: nn.Module) -> nn.Module:
    """A quantized linear built empty (on meta) given its quantized `buffers` and `linear`'s bias, frozen."""
    for name, t in buffers.items():
        setattr(q, name, t)
    q.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
    return q


class NF4Linear(nn.Module):
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

    @classmethod
    def empty_like(cls, linear: nn.Linear, **_) -> "NF4Linear":
        return cls(linear.in_features, linear.out_features, linear.bias is not None, "meta", linear.weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor | None = None, **_) -> "NF4Linear":
        """Quantize `linear`'s weight, or `weight` (read for it: `linear` may be on the meta device); the
        high-precision weight is not kept. The bias is taken as it is."""
        w = (linear.weight if weight is None else weight).detach()
        return filled(cls.empty_like(linear), nf4_quantize(w), linear)

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


def swap_linears(module: nn.Module, make, where=lambda name: True) -> int:
    """Replace each `Linear` under `module` whose qualified name `where` accepts by `make(linear)`; returns how many."""
    todo = [(name, m) for name, m in module.named_modules() if isinstance(m, Linear) and where(name)]
    for name, linear in todo:
        parent_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, leaf, make(linear))
    return len(todo)




def quantize_nf4_(module: nn.Module, where=lambda name: True) -> nn.Module:
    """Swap `module`'s `Linear`s (those `where` accepts) for `NF4Linear`s, in place; returns `module`."""
    swap_linears(module, NF4Linear.from_linear, where)
    return module


# -- int8 / int4: weight-only quantized inference ---------------------------------------------------------------
# Decoding reads every weight once per token, so its speed is bytes per token: int8 halves bf16's, int4
# quarters it. The weights are quantized at load from the bf16/fp32 checkpoint; activations stay in their dtype.
#   int8: symmetric per output channel, w ≈ q · scale[o], q ∈ [−127, 127] (`weight_int8` `[out, in]` int8,
#         `weight_scale` `[out]` in the weight's dtype); the kernel is aten's `_weight_int8pack_mm`.
#   int4: asymmetric in groups of g (32/64/128) along `in`, w ≈ (q − 8) · scale + zero, q ∈ [0, 15]
#         (`weight_scales_zeros` `[in/g, out, 2]` bf16), stored two a byte in the order of PyTorch's CPU
#         int4 kernel (`_weight_int4pack_mm_for_cpu`), which therefore runs on the buffer as loaded: rows
#         in blocks of 64, each block `k`-major, rows r and r + 32 of a block sharing a byte (r's in the low
#         nibble). 4 + 32/g bits a weight: 4.5 at g = 64.
# Each product runs one of two kernels, whichever `fastest` measured to be faster for that weight shape,
# row count and dtype on this machine: the aten kernel, or dequantizing into a scratch buffer then
# `F.linear` (the same formulation inductor fuses under `torch.compile`).
INT4_ROW_BLOCK = 64
INT4_GROUPS = (32, 64, 128, 256)


QUANTIZE_ROWS = 128  # rows quantized at a time: the fp32 temporaries stay ~1–5 MB, not several copies of a weight


def int8_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """`w` `[out, in]` → `weight_int8` int8 `[out, in]`, `weight_scale` `[out]` (w's dtype): symmetric per row."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], QUANTIZE_ROWS):
        wf = quantize_scratch(w[r:r + QUANTIZE_ROWS])  # fp32 copy of the rows
        s = torch.maximum(wf.amax(dim=1), -wf.amin(dim=1)).clamp(min=1e-12) / 127.0  # [rows]: absmax / 127
        scale[r:r + QUANTIZE_ROWS] = s
        q[r:r + QUANTIZE_ROWS] = wf.div_(s[:, None]).round_().clamp_(-127, 127)
    return {"weight_int8": q, "weight_scale": scale.to(w.dtype)}


def quantize_scratch(rows: torch.Tensor) -> torch.Tensor:
    """`rows` (at most QUANTIZE_ROWS) in fp32, in a kept buffer: quantizing a model allocates no fresh temporaries
    per chunk (which fragment the heap so that a load's peak grows by hundreds of MB)."""
    return scratch((QUANTIZE_ROWS, rows.shape[1]), torch.float32, rows.device, "quantize")[: rows.shape[0]].copy_(rows)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 `[out, in]` → bytes `[out, in/2]` in the CPU int4 kernel's order (see above)."""
    q = rearrange(q.to(torch.uint8), "(nb h r) k -> nb h k r", h=2, r=INT4_ROW_BLOCK // 2)
    return rearrange(q[:, 0] | (q[:, 1] << 4), "nb k r -> nb (k r)").reshape(q.shape[0] * INT4_ROW_BLOCK, -1)


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `int4_pack`: bytes `[out, in/2]` → values uint8 `[out, in]`."""
    b = rearrange(packed, "(nb rows) kh -> nb (rows kh)", rows=INT4_ROW_BLOCK)
    b = rearrange(b, "nb (k r) -> nb k r", r=INT4_ROW_BLOCK // 2)  # [NB, in, 32]
    return rearrange(torch.stack([b & 15, b >> 4], dim=1), "nb h k r -> (nb h r) k")


def int4_quantize(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """`w` `[out, in]` → `weight_int4` uint8 `[out, in/2]`, `weight_scales_zeros` bf16 `[in/group, out, 2]`."""
    out_f, in_f = w.shape
    check_int4_shape(in_f, out_f, group)
    packed = torch.empty(out_f, in_f // 2, dtype=torch.uint8, device=w.device)
    sz = torch.empty(in_f // group, out_f, 2, dtype=torch.bfloat16, device=w.device)
    for r in range(0, out_f, QUANTIZE_ROWS):  # QUANTIZE_ROWS is a multiple of the 64-row packing block
        g = rearrange(quantize_scratch(w[r:r + QUANTIZE_ROWS]), "o (n g) -> o n g", g=group)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [rows, groups]
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        zero = lo + 8.0 * scale  # the value of q = 8
        # quantize against the bf16-rounded scale and zero, the ones the kernels will multiply by
        scale16, zero16 = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
        q = g.sub_(zero16.float()[..., None]).div_(scale16.float()[..., None]).add_(8.0).round_().clamp_(0, 15)
        sz[:, r:r + QUANTIZE_ROWS] = rearrange(torch.stack([scale16, zero16], dim=-1), "o n two -> n o two")
        packed[r:r + QUANTIZE_ROWS] = int4_pack(rearrange(q, "o n g -> o (n g)"))
    return {"weight_int4": packed, "weight_scales_zeros": sz}


@functools.cache
def int4_kernel_reads_stored_layout() -> bool:
    """Whether this machine's PyTorch CPU int4 kernel reads the stored order (`int4_pack`). Its order depends on
    the kernel PyTorch dispatches to (64-row blocks with AVX-512, 32-row blocks with AVX2 only); where it differs
    the kernel is not offered and int4 products dequantize (a file's layout never depends on the machine)."""
    probe = torch.arange(INT4_ROW_BLOCK * 64, dtype=torch.int32).reshape(INT4_ROW_BLOCK, 64) % 16
    try:
        return torch.equal(int4_pack(probe), torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1))
    except (RuntimeError, AttributeError):
        return False


def check_int4_shape(in_features: int, out_features: int, group: int) -> None:
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, got {group}")
    if in_features % group or out_features % INT4_ROW_BLOCK:
        raise ValueError(f"int4 needs in_features divisible by the group size {group} and out_features by "
                         f"{INT4_ROW_BLOCK}; got a weight [{out_features}, {in_features}]")


def int4_dequantize(packed: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`weight_int4`, `weight_scales_zeros` → the weight `[out, in]` in `dtype` (into `out` if given)."""
    q = rearrange(int4_unpack(packed), "o (n g) -> o n g", n=sz.shape[0]).to(dtype)  # [out, groups, g]
    scale, zero = (rearrange(sz[..., i], "n o -> o n 1").to(dtype) for i in (0, 1))
    w = rearrange((q - 8) * scale + zero, "o n g -> o (n g)")
    return w if out is None else out.copy_(w)


# -- kernels chosen by measurement --------------------------------------------------------------------------------
KERNEL_OVERRIDE = "QVA_KERNEL"  # a candidate's name forces it wherever it is offered: aten, dequant, gemv, linear
_choices: dict[str, str] | None = None
_choices_lock = threading.Lock()


def kernel_cache_file():
    """`~/.cache/qva/kernels/<cpu>-torch<version>-t<threads>.json` (or under `QVA_CACHE`): choices per machine."""
    import hashlib
    import platform
    from pathlib import Path

    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    caps = f"{torch.backends.cpu.get_cpu_capability()}|{os.environ.get('ONEDNN_MAX_CPU_ISA', '')}"  # kernels a cap leaves
    tag = hashlib.sha1(f"{model}|{torch.__version__}|{torch.get_num_threads()}|{caps}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("QVA_CACHE", Path.home() / ".cache" / "qva"))
    return root / "kernels" / f"{tag}.json"


def _load_choices() -> dict[str, str]:
    global _choices
    if _choices is None:
        import json

        try:
            _choices = json.loads(kernel_cache_file().read_text())
        except (OSError, ValueError):
            _choices = {}
    return _choices


def _store_choices() -> None:
    import json

    from weights_loader.writer import WriteError, atomic_file

    path = kernel_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_file(path, json.dumps(_choices, indent=1, sort_keys=True))  # a reader sees the old file or the new one
    except (OSError, WriteError):
        pass  # a read-only home or a full disk: choices are then measured once per process


def fastest(key: str, candidates: dict, repeats: int = 3) -> str:
    """The name of the fastest of `candidates` (name → a zero-argument call) for `key`: the override, a choice
    cached for this machine, or measured now (best of `repeats` after a warm-up) and cached."""
    forced = os.environ.get(KERNEL_OVERRIDE)
    if forced in candidates:
        return forced
    known = _choices.get(key) if _choices is not None else None  # the common case: decided before, no lock
    if known in candidates:
        return known
    with _choices_lock:
        choices = _load_choices()
        if choices.get(key) in candidates:
            return choices[key]
        import time

        times = {}
        for name, call in candidates.items():
            try:
                call()
            except (RuntimeError, NotImplementedError):  # a kernel this build or device lacks
                if name == list(candidates)[-1] and not times:
                    raise
                continue
            best = math.inf
            for _ in range(repeats):
                t = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - t)
            times[name] = best
        choices[key] = min(times, key=times.get)
        _store_choices()
        return choices[key]


def rows_bucket(rows: int) -> str:
    """Row counts that share a kernel choice: 1, 2–4, 5–16, 17–64, 65–256, more."""
    for top in (1, 4, 16, 64, 256):
        if rows <= top:
            return str(top)
    return "many"


class Int8Linear(nn.Module):
    """A frozen linear whose weight is int8 with a scale per output channel (bias kept); LoRA may be added."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=torch.bfloat16):
        """Empty buffers of the right shapes (`from_linear` fills them; `qva.load` fills them from a checkpoint)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def empty_like(cls, linear: nn.Linear, **_) -> "Int8Linear":
        return cls(linear.in_features, linear.out_features, linear.bias is not None, "meta", linear.weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor | None = None, **_) -> "Int8Linear":
        w = (linear.weight if weight is None else weight).detach()
        return filled(cls.empty_like(linear), int8_quantize(w), linear)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight_scale.to(x.dtype)

        def aten(x2):
            return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, scale)

        def dequant(x2):
            return F.linear(x2, cast_weight(self.weight_int8, x.dtype) * scale[:, None])

        return quantized_forward("int8", self, x, {"aten": aten, "dequant": dequant})

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int4Linear(nn.Module):
    """A frozen linear whose weight is int4 in groups of `group_size` with bf16 scales and zeros (bias kept)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=torch.bfloat16, group_size: int = 64):
        super().__init__()
        check_int4_shape(in_features, out_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_int4", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        groups = in_features // group_size
        self.register_buffer("weight_scales_zeros", torch.empty(groups, out_features, 2, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def empty_like(cls, linear: nn.Linear, group_size: int = 64, **_) -> "Int4Linear":
        return cls(linear.in_features, linear.out_features, linear.bias is not None, "meta", linear.weight.dtype, group_size)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor | None = None, group_size: int = 64, **_) -> "Int4Linear":
        w = (linear.weight if weight is None else weight).detach()
        return filled(cls.empty_like(linear, group_size), int4_quantize(w, group_size), linear)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return int4_dequantize(self.weight_int4, self.weight_scales_zeros, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        candidates = {}
        if x.device.type == "cpu" and int4_kernel_reads_stored_layout():
            sz = self.weight_scales_zeros.to(x.dtype)

            def aten(x2):
                return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight_int4, self.group_size, sz)

            candidates["aten"] = aten

        def dequant(x2):  # under autograd F.linear keeps the weight for backward: a fresh one, not the kept buffer
            out = None if torch.is_grad_enabled() else _dequantize_out((self.out_features, self.in_features), x)
            return F.linear(x2, int4_dequantize(self.weight_int4, self.weight_scales_zeros, x.dtype, out))

        candidates["dequant"] = dequant
        return quantized_forward("int4", self, x, candidates)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4, group_size={self.group_size}")


def quantized_forward(fmt: str, linear: nn.Module, x: torch.Tensor, candidates: dict) -> torch.Tensor:
    """`linear(x)` `[..., out]` for an int8/int4 linear: the product on the kernel (name → a call on x's rows
    `[N, in]`) that `fastest` picks for this weight shape, row count and dtype, then bias and LoRA. Under autograd
    (LoRA over a quantized base trains) or while compiling, the dequantizing form, which both can see through."""
    x2 = x.reshape(-1, linear.in_features)  # [N, in]
    if torch.is_grad_enabled() and x2.requires_grad or torch.compiler.is_compiling() or len(candidates) == 1:
        name = "dequant"
    else:
        key = f"{fmt}:{linear.out_features}x{linear.in_features}:{rows_bucket(x2.shape[0])}:{str(x2.dtype)[6:]}:{x2.device.type}"
        if fmt == "int4":
            key += f":g{linear.group_size}"
        name = fastest(key, {n: lambda call=call: call(x2) for n, call in candidates.items()})
    y = candidates[name](x2).reshape(*x.shape[:-1], linear.out_features)
    if linear.bias is not None:
        y = y + linear.bias.to(x.dtype)
    return with_lora(linear, x, y)


QUANTIZED_LINEARS = {"nf4": NF4Linear, "int8": Int8Linear, "int4": Int4Linear}  # the formats `pretrained.load(quantize=...)` offers
