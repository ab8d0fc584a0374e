"""Weight-only int8 / int4 decoding, side by side in one run: qva bf16 / int8 / int4 against transformers bf16.

    python tests/benchmarks/bench_quantize.py [--layers 28] [--repeats 5] [--new-tokens 64] [--compile]

On the random 2B-shaped checkpoint (`--layers` LLM layers, 2 vision blocks), weights stored in bf16:
- quantize-on-load, each format in a fresh process: seconds and peak RSS over the imports, against the
  bytes the loaded model holds (quantized LLM linears + the rest in bf16) and one bf16 decoder layer;
- resident bytes of the LLM's linear weights, int8 and int4 against bf16;
- greedy decode at batch 1 (and 4): seconds per step = (time(n new) − time(1 new)) / (n − 1), the variants
  interleaved round by round, `--repeats` rounds: median and min–max, and the speed-up over transformers;
- accuracy: each quantized linear's relative output error on the activations a 256-token prompt gives the
  bf16 model (median and max over the layers), and the greedy tokens (64) that agree with qva bf16's.
The header names the CPU and its bf16/AMX/AVX flags. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_qwen2vl import cached_2b  # noqa: E402
from common import cold_run, cpu_header  # noqa: E402

import qva  # noqa: E402
from qva.linear import QUANTIZED_LINEARS, Linear  # noqa: E402

FORMATS = (None, "int8", "int4")
def linear_bytes(model) -> int:
    """Bytes of the LLM decoder layers' linear weights as held (quantized buffers, or the bf16 weight)."""
    total = 0
    for name, m in model.model.layers.named_modules():
        if isinstance(m, (Linear, *QUANTIZED_LINEARS.values())):
            total += sum(t.numel() * t.element_size() for n, t in m.state_dict().items() if "bias" not in n and "lora_" not in n)
    return total


def layer_errors(ref, model, ids) -> list[float]:
    """Relative L2 output error of each quantized linear of `model` on the inputs the bf16 `ref` gives it."""
    inputs = {}

    def keep(name):
        def hook(module, args, out):
            inputs[name] = (args[0].clone(), out.clone())  # copies (SwiGLU works in place); returns None: output unchanged
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in ref.model.layers.named_modules() if isinstance(m, Linear)]
    with torch.inference_mode():
        ref(ids, logits_to_keep=1)
    for h in hooks:
        h.remove()
    errs = []
    with torch.inference_mode():
        for n, m in model.model.layers.named_modules():
            if type(m) in QUANTIZED_LINEARS.values() and n in inputs:
                x, want = inputs[n]
                got = m(x).float()
                errs.append(((got - want.float()).norm() / want.float().norm()).item())
    return errs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", default="1", help="comma-separated batch sizes for the decode rows")
    p.add_argument("--compile", action="store_true", help="also time qva's compiled decode step")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--load-only", action="store_true", help="only the quantize-on-load rows")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("bench_results_quantize.json"))
    args = p.parse_args()
    header = cpu_header()
    print(header, flush=True)
    ckpt = cached_2b(args.workdir, args.layers, 2)
    out: dict = {"cpu": header, "layers": args.layers, "group_size": args.group_size}

    # quantize-on-load, each in a fresh process
    out["load"] = {}
    for fmt in FORMATS:
        body = (f"m = qva.load(PATH, dtype=torch.bfloat16, quantize={fmt!r}, group_size={args.group_size})\n"
                "result['held'] = sum({t.data_ptr(): t.numel() * t.element_size() for t in m.state_dict().values()}.values())\n"
                "result['layer'] = sum(t.numel() * t.element_size() for t in m.model.layers[0].state_dict().values())")
        r = cold_run("import qva", body, ckpt)
        out["load"][fmt or "bf16"] = r
        layer = out["load"]["bf16"]["layer"]  # one decoder layer in bf16
        print(f"load {fmt or 'bf16':5s}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_over_base'] / 2**30:.2f} GiB = held "
              f"{r['held'] / 2**30:.2f} GiB + {(r['peak_rss_over_base'] - r['held']) / 2**20:.0f} MiB (one bf16 layer: "
              f"{layer / 2**20:.0f} MiB)", flush=True)

    if args.load_only:
        return

    from transformers import Qwen2VLForConditionalGeneration

    ref = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = None, 151643
    ours = {fmt or "bf16": qva.load(ckpt, dtype=torch.bfloat16, quantize=fmt, group_size=args.group_size) for fmt in FORMATS}
    sizes = {k: linear_bytes(m) for k, m in ours.items()}
    out["resident_llm_linears"] = {k: {"bytes": v, "of_bf16": v / sizes["bf16"]} for k, v in sizes.items()}
    print("resident LLM linear weights: " + ", ".join(f"{k} {v / 2**30:.2f} GiB ({v / sizes['bf16']:.3f}×)" for k, v in sizes.items()))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150_000, (1, 256), generator=g)
    out["accuracy"] = {}
    with torch.inference_mode():
        want = ours["bf16"].generate(input_ids=ids[:, :32], max_new_tokens=64, eos_token_id=[])[:, 32:]
        for fmt in ("int8", "int4"):
            errs = layer_errors(ours["bf16"], ours[fmt], ids)
            got = ours[fmt].generate(input_ids=ids[:, :32], max_new_tokens=64, eos_token_id=[])[:, 32:]
            agree = (got == want).float().mean().item()
            first = int((got != want).int().argmax()) if agree < 1 else 64
            out["accuracy"][fmt] = {"layer_err_median": statistics.median(errs), "layer_err_max": max(errs), "greedy_agreement": agree,
                                    "first_disagreement": first}
            print(f"{fmt}: per-layer relative output error median {statistics.median(errs):.4f}, max {max(errs):.4f} "
                  f"({len(errs)} linears); greedy tokens equal to bf16's: {agree:.0%} of 64, first difference at {first}", flush=True)

    variants = {"transformers bf16": None, **{f"qva {k}": m for k, m in ours.items()}}
    if args.compile:
        variants.update({f"qva {k} compiled": m for k, m in ours.items()})
    out["decode"] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        prompt = torch.randint(0, 150_000, (batch, 64), generator=g)

        def gen(name, n, prompt=prompt):
            if name == "transformers bf16":
                return ref.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)
            return variants[name].generate(input_ids=prompt, max_new_tokens=n, eos_token_id=[], compile=name.endswith("compiled"))

        with torch.inference_mode():
            for name in variants:  # warm-up: kernel choices measured, compiled graphs built
                gen(name, args.new_tokens)
            per_step = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name in variants:
                    t = time.perf_counter()
                    gen(name, 1)
                    t1 = time.perf_counter() - t
                    t = time.perf_counter()
                    gen(name, args.new_tokens)
                    per_step[name].append((time.perf_counter() - t - t1) / (args.new_tokens - 1))
        base = statistics.median(per_step["transformers bf16"])
        print(f"\ndecode, batch {batch}, {args.new_tokens} new tokens, {args.repeats} interleaved rounds (s per step: median [min–max])")
        print(f"| {'variant':28s} | {'s per step':>26s} | {'tok/s':>7s} | {'vs transformers bf16':>20s} |")
        print(f"|{'-' * 30}|{'-' * 28}|{'-' * 9}|{'-' * 22}|")
        for name, ts in per_step.items():
            med = statistics.median(ts)
            print(f"| {name:28s} | {med:.4f} [{min(ts):.4f}–{max(ts):.4f}] | {batch / med:7.2f} | {base / med:19.2f}× |")
            out["decode"][f"{batch}:{name}"] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "tok_s": batch / med, "speedup": base / med}
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
