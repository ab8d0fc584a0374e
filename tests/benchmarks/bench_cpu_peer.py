"""qva against llama.cpp on the CPU, at each bit width: decode at batch 1 and prompt processing. Not a test.

    bash tests/llama_cpp_env.sh DIR          # llama.cpp built from source (its own converter and llama-bench)
    python tests/benchmarks/bench_cpu_peer.py --llama-cpp DIR/llama.cpp [--layers 28] [--rounds 5] [--threads N]
                                              [--prompt 512] [--new-tokens 128] [--compile] [--workdir W]

The random 2B-shaped Qwen2-VL of the other benchmarks (`bench_qwen2vl.write_2b`: bf16, `--layers` LLM layers, 2
vision blocks) with the real Qwen2 tokenizer, converted by llama.cpp's own `convert_hf_to_gguf.py` to GGUF BF16 and
quantized by its `llama-quantize` to Q8_0, Q4_0 and Q4_K_M. Pairs at the same bits per weight: qva bf16 ↔ BF16,
int8 and w8a8 (int8 activation rows too, as Q8_0's dot products have) ↔ Q8_0, int4 (groups of `--group-size`) ↔
Q4_0, each qva format also with its vocabulary head quantized
("+head", as llama.cpp's files have theirs); Q4_K_M is a llama.cpp row of its own. Rows, interleaved round by round
(each GGUF type back to back with its qva variants, which side goes first alternating), `--rounds` rounds, median
[min–max]:

  decode   batch 1, tokens/s over `--new-tokens` new tokens after a `--prompt`-token prompt
           (qva: n / (t(n + 1 new) − t(1 new)); llama.cpp: `llama-bench -n N -d P`)
  pp       prompt processing, `--prompt` tokens/s (qva: the prompt to its first token, `generate(max_new_tokens=1)`;
           llama.cpp: `llama-bench -p P`)

and the bytes each format reads per decoded token (decoder layers, final norm and the head as each side holds
them; the embedding gather reads one row) over the memory bandwidth measured here (a 1 GiB fp32 reduction): each
format's share of its own roofline; and the bytes/s of qva's one-row products per variant (a gate_proj and the
head, each timed alone and so possibly cache-resident; and all of a token's products in decode order, every weight
cold). Both sides use `--threads` threads. The header names the CPU and its flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_generate import decode_bytes_per_token, memory_bandwidth  # noqa: E402
from bench_qwen2vl import cached_2b  # noqa: E402
from common import cpu_header  # noqa: E402

import qva  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[3] / "shared" / "data" / "qwen2-vl-tokenizer"
# qva variant: (quantize=, quantize_modules=, the GGUF type at its bits per weight); "+head": the vocabulary head too
VARIANTS = {"bf16": (None, ("llm",), "BF16"), "int8": ("int8", ("llm",), "Q8_0"), "int8+head": ("int8", ("llm", "head"), "Q8_0"),
            "int4": ("int4", ("llm",), "Q4_0"), "int4+head": ("int4", ("llm", "head"), "Q4_0"),
            "w8a8": ("w8a8", ("llm",), "Q8_0"), "w8a8+head": ("w8a8", ("llm", "head"), "Q8_0")}  # Q8_0 rounds activations too
GGUF_TYPES = ("BF16", "Q8_0", "Q4_0", "Q4_K_M")  # Q4_K_M: llama.cpp's usual 4-bit mix, a row of its own


def gguf_files(llama: Path, ckpt: Path, work: Path, kinds: tuple[str, ...] = GGUF_TYPES) -> dict[str, Path]:
    """The GGUF files of `kinds`: BF16 by llama.cpp's converter (the checkpoint plus the real tokenizer, linked into
    one folder; the source of the others, always made), then each quantized type by llama-quantize; files already
    made are reused."""
    src = work / f"{ckpt.name}-hf"
    if not src.is_dir():
        src.mkdir(parents=True)
        for f in ckpt.iterdir():
            (src / f.name).symlink_to(f.resolve())
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER / name, src / name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(llama / d) for d in ("gguf-py", "pydeps"))}
    files = {"BF16": work / f"{ckpt.name}-BF16.gguf"}
    if not files["BF16"].is_file():
        print(f"converting {ckpt.name} to GGUF BF16 (llama.cpp's convert_hf_to_gguf.py) ...", flush=True)
        tmp = files["BF16"].with_suffix(".tmp")
        subprocess.run([sys.executable, str(llama / "convert_hf_to_gguf.py"), str(src), "--outfile", str(tmp), "--outtype", "bf16"],
                       check=True, env=env, capture_output=True)
        tmp.rename(files["BF16"])
    for kind in (k for k in kinds if k != "BF16"):
        files[kind] = work / f"{ckpt.name}-{kind}.gguf"
        if not files[kind].is_file():
            print(f"llama-quantize → {kind} ...", flush=True)
            tmp = files[kind].with_suffix(".tmp")
            subprocess.run([str(llama / "build" / "bin" / "llama-quantize"), str(files["BF16"]), str(tmp), kind], check=True,
                           capture_output=True)
            tmp.rename(files[kind])
    return {k: f for k, f in files.items() if k in kinds}


def gguf_bytes_per_token(llama: Path, path: Path) -> tuple[int, dict[str, str]]:
    """Bytes a decode step reads from a GGUF file (every tensor but the embedding, which is gathered — unless it is
    also the head), and the type of the head and of a decoder weight."""
    if str(llama / "gguf-py") not in sys.path:
        sys.path.insert(0, str(llama / "gguf-py"))
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    total = sum(int(t.n_bytes) for n, t in tensors.items() if n not in ("token_embd.weight", "output.weight")) + int(head.n_bytes)
    types = {"head": head.tensor_type.name, "ffn_down": tensors["blk.0.ffn_down.weight"].tensor_type.name,
             "attn_q": tensors["blk.0.attn_q.weight"].tensor_type.name}
    return total, types


def llama_bench(llama: Path, gguf: Path, threads: int, prompt: int, new_tokens: int) -> dict[str, float]:
    """One llama-bench round: prompt processing of `prompt` tokens, then decode of `new_tokens` after `prompt` (tok/s)."""
    out = {}
    for key, flags in (("pp", ["-p", str(prompt), "-n", "0"]), ("decode", ["-p", "0", "-n", str(new_tokens), "-d", str(prompt)])):
        run = subprocess.run([str(llama / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json",
                              *flags], check=True, capture_output=True, text=True)
        out[key] = float(json.loads(run.stdout)[0]["avg_ts"])
    return out


def qva_round(model, prompt_ids: torch.Tensor, new_tokens: int, compile: bool) -> dict[str, float]:
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(input_ids=prompt_ids, max_new_tokens=1, eos_token_id=[], compile=compile)
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(input_ids=prompt_ids, max_new_tokens=new_tokens + 1, eos_token_id=[], compile=compile)
        whole = time.perf_counter() - t
    return {"pp": prompt_ids.shape[1] / first, "decode": new_tokens / (whole - first)}


def qva_accuracy(models: dict, prompt: torch.Tensor, new_tokens: int = 32) -> dict[str, dict[str, float]]:
    """Each quantized variant against bf16: the relative L2 error of the prompt's next-token logits, and the share of
    `new_tokens` greedy tokens equal to bf16's."""
    out = {}
    with torch.inference_mode():
        want = models["bf16"](prompt, logits_to_keep=1).logits.float()
        n = prompt.shape[1]
        tokens = models["bf16"].generate(input_ids=prompt, max_new_tokens=new_tokens, eos_token_id=[])[:, n:]
        for name, m in models.items():
            if name != "bf16":
                got = m(prompt, logits_to_keep=1).logits.float()
                same = (m.generate(input_ids=prompt, max_new_tokens=new_tokens, eos_token_id=[])[:, n:] == tokens).float().mean().item()
                out[name] = {"logits_rel_l2": ((got - want).norm() / want.norm()).item(), "greedy_agreement": same}
                print(f"accuracy {name}: next-token logits relative L2 {out[name]['logits_rel_l2']:.4f} against bf16, "
                      f"greedy tokens equal to bf16's {same:.0%} of {new_tokens}", flush=True)
    return out


def held_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in layer.state_dict().values())


def token_products_rate(m, repeats: int = 5) -> float:
    """The bytes/s of every one-row product a decoded token makes, in its order (each layer's q, k, v, o, gate,
    up, down, then the head), median of `repeats` passes: each weight is cold when it is read again, as in decode
    (a single weight timed over and over may sit in the last-level cache: gate_proj in int8 is 13.8 MB)."""
    linears = [p for layer in m.model.layers for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
               layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)] + [m.lm_head]
    rows = {p.in_features: torch.randn(1, 1, p.in_features, dtype=m.dtype) for p in linears}  # [1, 1, in]
    for p in linears:  # warm-up: kernel choices made, kept copies (fbgemm's packing, int4's kernel order) built
        p(rows[p.in_features])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for p in linears:
            p(rows[p.in_features])
        times.append(time.perf_counter() - t)
    return sum(held_bytes(p) for p in linears) / statistics.median(times)


def kernel_rates(models: dict, repeats: int = 30) -> dict[str, dict[str, float]]:
    """The bytes/s each variant's one-row product reads at decode: layer 0's gate_proj (8960 × 1536 at the 2B's
    shape) and the vocabulary head (151 936 × 1536), median of `repeats` calls after a warm-up (the weight read
    again each call), and a whole token's products with every weight cold (`token_products_rate`)."""
    out = {}
    with torch.inference_mode():
        for name, m in models.items():
            out[name] = {"token": token_products_rate(m)}
            for label, layer in (("gate_proj", m.model.layers[0].mlp.gate_proj), ("head", m.lm_head)):
                x = torch.randn(1, layer.in_features, dtype=m.dtype)
                held = held_bytes(layer)
                layer(x)
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    layer(x)
                    times.append(time.perf_counter() - t)
                out[name][label] = held / statistics.median(times)
            print(f"one-row product, {name}: gate_proj {out[name]['gate_proj'] / 1e9:.1f} GB/s, head {out[name]['head'] / 1e9:.1f} GB/s, "
                  f"a token's products cold {out[name]['token'] / 1e9:.1f} GB/s", flush=True)
    return out


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.2f} [{min(xs):.2f}–{max(xs):.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", type=Path, required=True, help="the llama.cpp tree tests/llama_cpp_env.sh built")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--group-size", type=int, default=64, help="qva int4's group (Q4_0: blocks of 32)")
    p.add_argument("--compile", action="store_true", help="time qva's compiled decode step (else eager)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"qva rows to run, of {', '.join(VARIANTS)} (bf16 is always "
                   "loaded: the accuracy reference); llama.cpp runs the types they pair with (Q4_K_M with int4)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qva-bench-cpu-peer"))
    p.add_argument("--json", type=Path, default=Path("bench_results_cpu_peer.json"))
    args = p.parse_args()
    chosen = args.variants.split(",")
    if set(chosen) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(set(chosen) - set(VARIANTS))}; expected some of {', '.join(VARIANTS)}")
    variants = {name: VARIANTS[name] for name in chosen}  # timed
    gguf_types = tuple(t for t in GGUF_TYPES if any(v[2] == t for v in variants.values()) or t == "Q4_K_M" and "int4" in chosen)
    llama = args.llama_cpp.resolve()
    if not (llama / "build" / "bin" / "llama-bench").is_file():
        raise SystemExit(f"{llama}: no build/bin/llama-bench — build it with `bash tests/llama_cpp_env.sh DIR` and pass DIR/llama.cpp")
    torch.set_num_threads(args.threads)
    header = cpu_header()
    print(header, flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = cached_2b(args.workdir, args.layers, 2)
    ggufs = gguf_files(llama, ckpt, args.workdir, gguf_types)
    bw = memory_bandwidth(torch.device("cpu"))
    models = {name: qva.load(ckpt, dtype=torch.bfloat16, quantize=q, quantize_modules=mods, group_size=args.group_size)
              for name, (q, mods, _) in VARIANTS.items() if name in variants or name == "bf16"}
    read = {name: decode_bytes_per_token(m) for name, m in models.items()}
    types = {}
    for kind, f in ggufs.items():
        read[kind], types[kind] = gguf_bytes_per_token(llama, f)
    prompt = torch.randint(0, 150_000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    for m in models.values():  # warm-up: kernel choices measured, compiled graphs built (a round's cache sizes)
        qva_round(m, prompt, args.new_tokens if args.compile else 8, args.compile)
    accuracy = qva_accuracy(models, prompt)
    runs: dict[str, dict[str, list[float]]] = {k: {"pp": [], "decode": []} for k in [*variants, *ggufs]}
    for r in range(args.rounds):
        for kind in gguf_types:  # each GGUF type beside the qva variants at its bits, which side first alternating
            order = [("llama", kind)] + [("qva", name) for name, v in variants.items() if v[2] == kind]
            for side, key in order if r % 2 == 0 else order[::-1]:
                got = qva_round(models[key], prompt, args.new_tokens, args.compile) if side == "qva" else \
                    llama_bench(llama, ggufs[key], args.threads, args.prompt, args.new_tokens)
                for k, v in got.items():
                    runs[key][k].append(v)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v['decode'][-1]:.1f}" for k, v in runs.items()) + " tok/s decode",
              flush=True)

    rates = kernel_rates(models)
    mode = "compiled" if args.compile else "eager"
    print(f"\n{header}\nmemory bandwidth {bw / 1e9:.1f} GB/s; {args.layers} layers; decode batch 1: {args.new_tokens} new tokens after "
          f"{args.prompt}; pp: {args.prompt} tokens; {args.rounds} interleaved rounds, median [min–max]; qva {mode}")
    print("| format | decode tok/s | vs llama.cpp | GB read / token | of its roofline | pp tok/s | vs llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    out = {"cpu": header, "bandwidth_Bps": bw, "layers": args.layers, "threads": args.threads, "mode": mode, "rows": {}, "gguf_types": types,
           "accuracy": accuracy, "one_row_bytes_per_s": rates}
    for kind in gguf_types:
        for key, peer in [(kind, None)] + [(name, kind) for name, v in variants.items() if v[2] == kind]:
            d, pp = runs[key]["decode"], runs[key]["pp"]
            roof = statistics.median(d) * read[key] / bw
            vs = tuple(f"{statistics.median(runs[key][k]) / statistics.median(runs[peer][k]):.2f}×" if peer else "" for k in ("decode", "pp"))
            label = f"qva {key}" if peer else f"llama.cpp {key} (head {types[key]['head']})"
            print(f"| {label} | {spread(d)} | {vs[0]} | {read[key] / 1e9:.3f} | {roof:.0%} | {spread(pp)} | {vs[1]} |")
            out["rows"][key] = {"decode_tok_s": d, "pp_tok_s": pp, "bytes_per_token": read[key], "roofline_share": roof}
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
