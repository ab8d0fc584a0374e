"""The one-row int4 product on a CPU: aten's kernel against the two compiled routes inductor offers. Not a test.

    python tests/benchmarks/bench_int4_kernels.py [--rounds 7] [--calls 10] [--group 64]

One decoder layer of the 2B shape (q, k, v, o 1536 → 1536 / 256, gate and up 1536 → 8960, down 8960 → 1536; int4 in
groups of `--group`, the stored layout of `qva.linear.weight_only`), its seven products chained in one module so
that the weights stream from memory as in a decode step, not from cache. Four ways to run it, interleaved round by
round, median and min–max of `--rounds` rounds of `--calls` calls:

- `eager`: aten's `_weight_int4pack_mm_for_cpu` (what `Int4Linear` runs eagerly);
- `compiled`: the same graph compiled, the aten kernel called from it (what a compiled decode step runs);
- `autotuned`: compiled with `max_autotune` and the weights frozen as constants, where inductor may replace the
  aten kernel by its C++ weight-only int4 GEMM template (`CppWoqInt4GemmTemplate`, AVX-512);
- `nibbles`: the product written in torch (`nibble_product`) and compiled: inductor unpacks 32 bytes a step in
  registers, converts both nibbles to fp32 and accumulates, one vector loop per 64-row block and group.

Each route's output is checked against the dequantized weight's product first. The figures: GB/s of int4 weights
(with their scales) a call reads, and each route's speed against `compiled`. The header names the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import cpu_header  # noqa: E402

from qva.linear.weight_only import INT4_ROW_BLOCK, int4_dequantize, int4_kernel_weight, int4_quantize  # noqa: E402

SHAPES = dict(q=(1536, 1536), k=(256, 1536), v=(256, 1536), o=(1536, 1536), gate=(8960, 1536), up=(8960, 1536),
              down=(1536, 8960))  # name: (out, in)


def nibble_product(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """`x` `[R, in]` → `[R, out]` over int4 bytes `[out, in/2]` in the stored layout (64-row blocks, k-major, rows
    r and r + 32 of a block sharing a byte, r's in the low nibble) and `sz` `[in/group, out, 2]` (scale, zero):
    Σ_k x·((q − 8)·scale + zero) = Σ_groups scale·(Σ x·q − 8·Σ x) + zero·Σ x."""
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    blocks, groups, half = out_f // INT4_ROW_BLOCK, in_f // group, INT4_ROW_BLOCK // 2
    b = packed.view(blocks, groups, group, half)  # [NB, G, g, 32]: byte (k, r) of each block
    scale, zero = (rearrange(sz[..., i], "G (nb h r) -> h nb G r", h=2, r=half).float() for i in (0, 1))  # [2, NB, G, 32]
    ys = []
    for row in x.float().unbind(0):
        xg = row.view(1, groups, group, 1)  # [1, G, g, 1]
        xs = xg.sum(2)  # [1, G, 1]
        lo = ((b & 15).float() * xg).sum(2)  # [NB, G, 32]: rows nb·64 + r
        hi = ((b >> 4).float() * xg).sum(2)  # rows nb·64 + 32 + r
        y_lo = (scale[0] * (lo - 8 * xs) + zero[0] * xs).sum(1)  # [NB, 32]
        y_hi = (scale[1] * (hi - 8 * xs) + zero[1] * xs).sum(1)
        ys.append(rearrange(torch.stack([y_lo, y_hi], 1), "nb h r -> (nb h r)"))
    return torch.stack(ys).to(x.dtype)


def chain(product, x: torch.Tensor) -> torch.Tensor:
    """The seven products of one decoder layer, chained (attention's mixing and the norms left out); `product(name, x)`
    is one of them."""
    q, k, v = (product(n, x) for n in ("q", "k", "v"))
    h = x + product("o", q) + 1e-3 * (k.sum() + v.sum())
    return h + product("down", torch.nn.functional.silu(product("gate", h)) * product("up", h))


def quantized_weights(group: int) -> dict[str, dict[str, torch.Tensor]]:
    """Random bf16 weights of SHAPES, int4-quantized once: name → `int4_quantize`'s buffers."""
    return {name: int4_quantize(torch.randn(out_f, in_f, dtype=torch.bfloat16), group) for name, (out_f, in_f) in SHAPES.items()}


class Layer(torch.nn.Module):
    """`chain` over int4 weights (shared, not copied), by aten's kernel or by `nibble_product`."""

    def __init__(self, weights: dict[str, dict[str, torch.Tensor]], group: int, nibbles: bool = False):
        super().__init__()
        self.group, self.nibbles = group, nibbles
        for name, q in weights.items():
            self.register_buffer(f"{name}_w", q["weight_int4"])
            self.register_buffer(f"{name}_k", int4_kernel_weight(q["weight_int4"]))  # the aten kernel's order here
            self.register_buffer(f"{name}_sz", q["weight_scales_zeros"])

    def product(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w, sz = getattr(self, f"{name}_w"), getattr(self, f"{name}_sz")
        if self.nibbles:
            return nibble_product(x, w, sz, self.group)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, getattr(self, f"{name}_k"), self.group, sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return chain(self.product, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same chain over the dequantized weights in fp32."""
        def product(name, t):
            return t @ int4_dequantize(getattr(self, f"{name}_w"), getattr(self, f"{name}_sz"), torch.float32).T
        return chain(product, x.float())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--group", type=int, default=64)
    args = ap.parse_args()
    print(cpu_header(), flush=True)
    torch.manual_seed(0)
    weights = quantized_weights(args.group)
    layer = Layer(weights, args.group).eval()
    x = torch.randn(1, 1536, dtype=torch.bfloat16)
    gb = sum(b.numel() * b.element_size() for b in layer.buffers()) / 1e9
    with torch.no_grad():
        ref = layer.reference(x)
        routes = {"eager": layer, "compiled": torch.compile(layer, dynamic=False)}
        routes["compiled"](x)  # compiled now: the flags below apply to the next compile only
        with inductor_config.patch(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN"):
            routes["autotuned"] = torch.compile(Layer(weights, args.group).eval(), dynamic=False)
            routes["autotuned"](x)
        routes["nibbles"] = torch.compile(Layer(weights, args.group, nibbles=True).eval(), dynamic=False)
        for name, fn in routes.items():
            err = ((fn(x).float() - ref).abs().max() / ref.abs().max()).item()
            print(f"{name}: max error {err:.1e} of the fp32 product's max", flush=True)
            if err > 2e-2:
                raise SystemExit(f"{name} computes another product (relative error {err:.1e})")
        times = {name: [] for name in routes}
        for _ in range(2):
            for fn in routes.values():
                fn(x)
        for _ in range(args.rounds):
            for name, fn in routes.items():
                t = time.perf_counter()
                for _ in range(args.calls):
                    fn(x)
                times[name].append((time.perf_counter() - t) / args.calls)
    base = statistics.median(times["compiled"])
    print("\n| route | µs a layer | GB/s | vs compiled |\n|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e6:.0f} [{min(ts) * 1e6:.0f}–{max(ts) * 1e6:.0f}] | {gb / med:.1f} | {base / med:.2f}× |")


if __name__ == "__main__":
    main()
