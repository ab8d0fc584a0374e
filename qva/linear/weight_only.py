"""Weight-only int8 / int4 linears for inference, each product on the kernel measured fastest here.

Decoding reads every weight once per token, so its speed is bytes per token: int8 halves bf16's, int4 quarters
it. The weights are quantized at load from the bf16/fp32 checkpoint; activations stay in their dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .buffers import cast_weight, dequantize_out, kernel_copy, scratch
from .frozen import FrozenQuantizedLinear
from .lora import with_lora
from .measure import fastest, known_choice, rows_bucket

# -- int8 / int4: weight-only quantized inference ---------------------------------------------------------------
# Decoding reads every weight once per token, so its speed is bytes per token: int8 halves bf16's, int4
# quarters it. The weights are quantized at load from the bf16/fp32 checkpoint; activations stay in their dtype.
#   int8: symmetric per output channel, w ≈ q · scale[o], q ∈ [−127, 127] (`weight_int8` `[out, in]` int8,
#         `weight_scale` `[out]` in the weight's dtype); the kernel is aten's `_weight_int8pack_mm`.
#   int4: asymmetric in groups of g (32/64/128) along `in`, w ≈ (q − 8) · scale + zero, q ∈ [0, 15]
#         (`weight_scales_zeros` `[in/g, out, 2]` bf16), stored two a byte in the order of PyTorch's CPU
#         int4 kernel (`_weight_int4pack_mm_for_cpu`) where it dispatches to AVX-512, which therefore runs on
#         the buffer as loaded: rows in blocks of 64, each block `k`-major, rows r and r + 32 of a block sharing
#         a byte (r's in the low nibble). 4 + 32/g bits a weight: 4.5 at g = 64. A file's order never depends
#         on the machine: where the kernel reads another (AVX2 only: 32-row blocks, r with r + 16) it reads a
#         copy in its own order, made by PyTorch's converter on first use (`int4_kernel_weight`), so the
#         weights are then held twice (1 + 32/g bits a weight in memory; still 4 + 32/g read per product).
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
    the kernel reads a copy in its own order (`int4_kernel_weight`)."""
    probe = int4_probe()
    return int4_kernel_available() and torch.equal(int4_pack(probe), torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1))


@functools.cache
def int4_kernel_available() -> bool:
    """Whether this PyTorch build has the CPU int4 kernel and its weight converter (probed on a tiny weight)."""
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4_probe(), 1)
        sz = torch.ones(64 // 32, INT4_ROW_BLOCK, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, 64, dtype=torch.bfloat16), packed, 32, sz)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def int4_probe() -> torch.Tensor:
    """The values 0..15 of one row block, `[INT4_ROW_BLOCK, 64]` int32: the tiny weight the probes above convert."""
    return torch.arange(INT4_ROW_BLOCK * 64, dtype=torch.int32).reshape(INT4_ROW_BLOCK, 64) % 16


def int4_kernel_weight(weight_int4: torch.Tensor) -> torch.Tensor:
    """`weight_int4` `[out, in/2]` in the order PyTorch's CPU int4 kernel reads on this machine: the buffer itself
    where that is the stored order, else its copy in the kernel's order (PyTorch's own converter, `QUANTIZE_ROWS`
    rows at a time: the converter's order is whole blocks of rows, and it takes the values as int32), kept while
    the buffer lives and made again if it is written."""
    if int4_kernel_reads_stored_layout():
        return weight_int4

    def convert():
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode alike
            out = torch.empty_like(weight_int4)
        for r in range(0, weight_int4.shape[0], QUANTIZE_ROWS):  # a multiple of both orders' row blocks
            values = int4_unpack(weight_int4[r:r + QUANTIZE_ROWS]).to(torch.int32)  # [rows, in]
            out[r:r + QUANTIZE_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1).view(torch.uint8)
        return out

    return kernel_copy(weight_int4, (weight_int4,), "int4 kernel order", convert)


def check_int4_shape(in_features: int, out_features: int, group: int) -> None:
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, got {group}")
    if in_features % group or out_features % INT4_ROW_BLOCK:
        raise ValueError(f"int4 needs in_features divisible by the group size {group} and out_features by "
                         f"{INT4_ROW_BLOCK}; got a weight [{out_features}, {in_features}]")


DEQUANTIZE_CHUNK_BYTES = 4 * 2**20  # eager dequantizing works on this many bytes of fp32 rows at a time (in cache)


def int4_dequantize(packed: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`weight_int4`, `weight_scales_zeros` → the weight `[out, in]` in `dtype`, each value (q − 8) · scale + zero in
    fp32, then rounded to `dtype`. Into `out` (eager, no autograd: prompts, the `dequant` kernel) it runs in blocks
    of rows small enough to stay in cache, through small kept buffers, each step a plain vectorized op (README:
    "int4 prompts"); without, the same sums as one functional expression (a graph's, which inductor fuses)."""
    in_f, n = packed.shape[1] * 2, sz.shape[0]
    scale, zero = (rearrange(sz[..., i], "n o -> o n 1").float() for i in (0, 1))  # [out, groups, 1]
    if out is None:
        q = rearrange(int4_unpack(packed), "o (n g) -> o n g", n=n).to(dtype) - 8  # exact: integers in [−8, 7]
        # [out, groups, g] in `dtype` (no fp32 copy of the weight): a bf16 addcmul computes in fp32, rounds once
        return rearrange(torch.addcmul(zero.to(dtype), q, scale.to(dtype)), "o n g -> o (n g)")
    # bytes `[out, in/2]` → `[NB, in, 32]`: block nb's byte (k, r) holds row r's nibble k (low) and row r + 32's (high)
    t = rearrange(packed, "(nb rows) kh -> nb (rows kh)", rows=INT4_ROW_BLOCK)
    t = rearrange(t, "nb (k r) -> nb k r", r=INT4_ROW_BLOCK // 2)
    blocks = max(1, DEQUANTIZE_CHUNK_BYTES // (4 * in_f * INT4_ROW_BLOCK))  # 64-row blocks a chunk
    rows = blocks * INT4_ROW_BLOCK
    flipped = scratch((blocks, INT4_ROW_BLOCK // 2, in_f), torch.uint8, packed.device, "nibbles")  # [nb, 32, in]
    q = scratch((rows, in_f), torch.int8, packed.device, "nibbles")
    f32 = out if out.dtype == torch.float32 else scratch((rows, in_f), torch.float32, packed.device, "nibbles")
    for b0 in range(0, t.shape[0], blocks):
        nb = min(blocks, t.shape[0] - b0)
        r0, r1 = b0 * INT4_ROW_BLOCK, (b0 + nb) * INT4_ROW_BLOCK
        # each nibble's bit 3 flipped: read as a signed (two's-complement) nibble, it is q − 8
        tb = torch.bitwise_xor(rearrange(t[b0:b0 + nb], "nb k r -> nb r k"), 0x88, out=flipped[:nb]).view(torch.int8)
        halves = rearrange(q[: r1 - r0], "(nb h r) k -> nb h r k", h=2, r=INT4_ROW_BLOCK // 2)  # views of q's rows
        torch.bitwise_left_shift(tb, 4, out=halves[:, 0]).bitwise_right_shift_(4)  # low nibbles, sign-extended
        torch.bitwise_right_shift(tb, 4, out=halves[:, 1])  # high nibbles: an arithmetic shift extends the sign
        w = f32[r0:r1] if f32 is out else f32[: r1 - r0]  # fp32 rows r0..r1: out's own, or the chunk buffer
        wg = rearrange(w.copy_(q[: r1 - r0]), "o (n g) -> o n g", n=n)  # a view of w
        wg.mul_(scale[r0:r1]).add_(zero[r0:r1])
        if f32 is not out:
            out[r0:r1].copy_(w)
    return out


class Int8Linear(FrozenQuantizedLinear):
    """A frozen linear whose weight is int8 with a scale per output channel (bias kept); LoRA may be added."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=torch.bfloat16):
        """Empty buffers of the right shapes (`from_linear` fills them; `qva.load` fills them from a checkpoint)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    quantize = staticmethod(int8_quantize)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight_scale.to(x.dtype)

        def aten(x2):
            return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, scale)

        def dequant(x2):
            return F.linear(x2, cast_weight(self.weight_int8, x.dtype) * scale[:, None])

        return quantized_forward("int8", self, x, {"aten": aten, "dequant": dequant}, compiled=("aten",))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int4Linear(FrozenQuantizedLinear):
    """A frozen linear whose weight is int4 in groups of `group_size` with bf16 scales and zeros (bias kept)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=torch.bfloat16, group_size: int = 64):
        super().__init__()
        check_int4_shape(in_features, out_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_int4", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        groups = in_features // group_size
        self.register_buffer("weight_scales_zeros", torch.empty(groups, out_features, 2, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.kernel_available = int4_kernel_available()  # probed once a process: a compiled step reads a bool

    OPTIONS = ("group_size",)

    @staticmethod
    def quantize(weight: torch.Tensor, group_size: int = 64) -> dict[str, torch.Tensor]:
        return int4_quantize(weight, group_size)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return int4_dequantize(self.weight_int4, self.weight_scales_zeros, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        candidates = {}
        if x.device.type == "cpu" and self.kernel_available:
            sz = self.weight_scales_zeros.to(x.dtype)

            product = int4_rows if torch.compiler.is_compiling() else int4_rows_eager

            def aten(x2):
                return product(x2.contiguous(), self.weight_int4, self.group_size, sz)

            candidates["aten"] = aten

        def dequant(x2):  # under autograd F.linear keeps the weight for backward: a fresh one, not the kept buffer
            out = None if torch.is_grad_enabled() else dequantize_out((self.out_features, self.in_features), x)
            return F.linear(x2, int4_dequantize(self.weight_int4, self.weight_scales_zeros, x.dtype, out))

        candidates["dequant"] = dequant
        return quantized_forward("int4", self, x, candidates, compiled=("aten",))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4, group_size={self.group_size}")


def int4_rows_eager(x2: torch.Tensor, weight_int4: torch.Tensor, group_size: int, scales_zeros: torch.Tensor) -> torch.Tensor:
    """`x2` `[N, in]` → `[N, out]`: PyTorch's CPU int4 kernel over the weight in its order (`int4_kernel_weight`)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, int4_kernel_weight(weight_int4), group_size, scales_zeros)


@torch.library.custom_op("qva::int4_rows", mutates_args=())
def int4_rows(x2: torch.Tensor, weight_int4: torch.Tensor, group_size: int, scales_zeros: torch.Tensor) -> torch.Tensor:
    """`int4_rows_eager` as an opaque operator for a compiled step: inductor 2.13 fails to lower the aten kernel
    itself when a fused norm feeds it."""
    return int4_rows_eager(x2, weight_int4, group_size, scales_zeros)


@int4_rows.register_fake
def _(x2, weight_int4, group_size, scales_zeros):
    return x2.new_empty(x2.shape[0], weight_int4.shape[0])


def quantized_forward(fmt: str, linear: nn.Module, x: torch.Tensor, candidates: dict, compiled: tuple[str, ...] = ()) -> torch.Tensor:
    """`linear(x)` `[..., out]` for an int8/int4 linear: the product on the kernel (name → a call on x's rows
    `[N, in]`) that `fastest` picks for this weight shape, row count and dtype, then bias and LoRA. Under autograd
    (LoRA over a quantized base trains), the dequantizing form, which it can see through; while compiling, the
    choice measured before tracing (`measure_quantized`) where it is one of `compiled` (kernels a graph can hold),
    else the dequantizing form."""
    x2 = x.reshape(-1, linear.in_features)  # [N, in]
    key = f"{fmt}:{linear.out_features}x{linear.in_features}:{rows_bucket(x2.shape[0])}:{str(x2.dtype)[6:]}:{x2.device.type}"
    if fmt == "int4":
        key += f":g{linear.group_size}"
    if torch.is_grad_enabled() and x2.requires_grad or len(candidates) == 1:
        name = "dequant"
    elif torch.compiler.is_compiling():
        name = choice if (choice := known_choice(key)) in compiled else "dequant"
    else:
        name = fastest(key, {n: lambda call=call: call(x2) for n, call in candidates.items()})
    y = candidates[name](x2).reshape(*x.shape[:-1], linear.out_features)
    if linear.bias is not None:
        y = y + linear.bias.to(x.dtype)
    return with_lora(linear, x, y)


def measure_quantized(modules: list[nn.Module], rows: int, dtype: torch.dtype) -> None:
    """Before a decode step with `rows` rows is compiled: one int8 / w8a8 / int4 linear of each shape (and group) in
    `modules` run once on random rows, so that `fastest` has chosen its kernel, which the compiled step then reads
    (`quantized_forward`)."""
    shapes = {}
    for module in modules:
        for m in module.modules():
            if isinstance(m, Int8Linear | Int4Linear):  # W8A8Linear too
                shapes.setdefault((type(m).__name__, m.out_features, m.in_features, getattr(m, "group_size", 0)), m)
    with torch.no_grad():
        for _, m in sorted(shapes.items(), key=lambda kv: kv[0]):
            m(torch.randn(rows, m.in_features, dtype=dtype, device=next(m.buffers()).device))
