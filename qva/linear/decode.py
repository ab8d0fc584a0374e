"""Decode-sized products: ≤ 4 rows over half-precision weights on a CPU.

- `few_rows_product` (eager): oneDNN's kernel (PyTorch's default) or PyTorch's own (`linear_without_onednn`,
  a custom op so a compiled step can call it), whichever `fastest` measured faster for that shape and row count.
- `gemv` (compiled): written so that inductor reads each weight once for all rows; `measure_gemv` decides,
  before a decode step is compiled, which of gemv / F.linear / PyTorch's own kernel runs each weight shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .dtype_policy import HALF
from .measure import fastest

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
              if isinstance(m, nn.Linear) and gemv_eligible(rows, m.weight)}
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
