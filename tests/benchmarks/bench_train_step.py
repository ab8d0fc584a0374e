"""One LoRA training step, side by side in one run: qva against transformers + PEFT. Not a test.

    python tests/benchmarks/bench_train_step.py [--size 2b|tiny] [--layers 4] [--seq 512] [--batch 1]
                                                [--dtype bf16|fp32] [--qlora] [--steps 4] [--repeats 2]

Both sides load the same checkpoint with the base weights stored in `--dtype`, put LoRA (r 16, alpha 32,
dropout 0) on the LLM's q/k/v/o/gate/up/down, freeze everything else, and run AdamW steps on the same
random batch (`--seq` tokens, the last quarter labelled, as an answer would be). `--qlora`: NF4 base weights
(qva's `NF4Linear`; bitsandbytes' CPU path on the transformers side, if installed). `--project-7b` prints only
the 7B-shaped QLoRA stored bytes and projected peak (printed first in every run). Each measurement runs
in a fresh process: step time (median of `--steps` after a warm-up step) and peak RSS over the loaded
model (high-water mark reset after loading: activations, gradients, optimizer state, casts). Runs
alternate qva / transformers `--repeats` times. Also printed: the 7B-shaped QLoRA stored bytes and the
projected peak on a 24 GB GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench_qwen2vl import REFERENCE, cached_2b  # noqa: E402
from common import cold_run  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

BATCH = """
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 150000, ({batch}, {seq}), generator=g)
labels = torch.full_like(ids, -100)
labels[:, -{seq} // 4:] = ids[:, -{seq} // 4:]
"""

QVA = """
import qva
from qva.linear import add_lora, lora_linears
model = qva.load(PATH, dtype=torch.{dtype})
{qlora}
for name, m in model.model.named_modules():
    if name.rsplit(".", 1)[-1] in {targets}:
        add_lora(m, 16, 32.0)
model.requires_grad_(False)
params = [p for lin in lora_linears(model).values() for p in (lin.lora_A.weight, lin.lora_B.weight)]
for p in params:
    p.requires_grad_(True)
model.train()
def step():
    out = model(ids, labels=labels)
    out.loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    return out.loss.item()
"""

HF = """
from transformers import {reference} as Ref
from peft import LoraConfig, get_peft_model
kw = {{}}
{qlora}
model = Ref.from_pretrained(PATH, dtype=torch.{dtype}, attn_implementation="sdpa", **kw)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules={targets}))
params = [p for p in model.parameters() if p.requires_grad]
model.train()
def step():
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    out.loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    return out.loss.item()
"""

MEASURE = """
opt = torch.optim.AdamW(params, lr=1e-4)
base = peak_rss.reset()
loss0 = step()
times = []
for _ in range({steps}):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
result.update(step_s=sorted(times)[len(times) // 2], peak_rss_over_loaded=peak_rss.peak() - base, loss0=loss0,
              trainable=sum(p.numel() for p in params))
"""


QWEN2VL_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  vocab_size=152064, tie_word_embeddings=False)  # Qwen2-VL-7B-Instruct's config.json, beside the 2B's


def project_7b_qlora(seq: int = 2048, rank: int = 16, gpu_gib: float = 24.0) -> dict:
    """The 7B-shaped graft's stored bytes under QLoRA (counted from the real modules, built on the meta
    device: NF4 LLM linears, bf16 everything else) and the projected peak of one stage-2 step on a GPU with
    activation checkpointing (batch 1 × `seq` tokens, bf16 activations)."""
    from bench_audio import TURBO

    from qva.linear import NF4Linear, add_lora, lora_linears, swap_linears
    from qva.model import QVAModel
    from qva.qwen2vl_config import Qwen2VLConfig
    from qva.whisper_encoder import WhisperEncoderConfig

    raw = json.loads((ROOT.parent / "shared" / "data" / "qwen2-vl-tokenizer" / "config_Qwen2-VL-2B-Instruct.json").read_text())
    raw.update(QWEN2VL_7B)
    raw["vision_config"]["hidden_size"] = QWEN2VL_7B["hidden_size"]
    turbo = WhisperEncoderConfig.from_dict({**TURBO, "encoder_layers": 32})
    with torch.device("meta"):
        model = QVAModel(Qwen2VLConfig.from_dict(raw).with_audio(turbo, pool=2))
        swap_linears(model.model, lambda lin: NF4Linear(lin.in_features, lin.out_features, lin.bias is not None, "meta"),
                     lambda name: name.startswith("layers."))  # what `quantize_nf4_` makes, without the data
        for name, m in model.model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                add_lora(m, rank, 2.0 * rank)
    lora = sum(p.numel() for lin in lora_linears(model).values() for p in (lin.lora_A.weight, lin.lora_B.weight))
    nf4 = [m for m in model.model.modules() if isinstance(m, NF4Linear)]
    nf4_params = sum(m.in_features * m.out_features for m in nf4)
    nf4_bytes = sum(b.numel() * b.element_size() for m in nf4 for b in m.buffers())
    other = {part: 2 * sum(t.numel() for n, t in getattr(model, part).named_parameters() if "lora_" not in n) +
             sum(b.numel() * b.element_size() for m in getattr(model, part).modules() if isinstance(m, NF4Linear) for b in m.buffers())
             for part in ("model", "lm_head", "visual", "audio_encoder")}
    other["model"] -= nf4_bytes  # counted in the NF4 row; the rest of `model` is embeddings, norms, biases in bf16
    projector = 4 * model.audio_projector.weight.numel()
    trainable = lora + model.audio_projector.weight.numel()
    d, layers, inter, vocab = raw["hidden_size"], raw["num_hidden_layers"], raw["intermediate_size"], raw["vocab_size"]
    # activation checkpointing: each layer keeps its bf16 input; one layer's recompute is live in backward
    # (q, k, v, attention out, residuals, norms ~ 8·d, the MLP's gate/up/act/product 4·inter, in bf16, plus
    # the fp32 input of each LoRA A: 7 of ~d); logits at labelled positions (a quarter) in fp32, twice.
    act = seq * (2 * d * layers + 2 * (8 * d + 4 * inter) + 4 * 7 * d) + 2 * 4 * (seq // 4) * vocab
    state = 4 * trainable * 4  # fp32 weights, gradients, Adam's two moments
    stored = nf4_bytes + sum(other.values()) + projector
    peak = stored + state + act
    return dict(llm_linear_params=nf4_params, llm_nf4_bytes=nf4_bytes, bits_per_param=8 * nf4_bytes / nf4_params, other_bf16_bytes=other,
                trainable=trainable, stored_bytes=stored, optimizer_state_bytes=state, activation_bytes=act, seq=seq,
                projected_peak_gib=peak / 2**30, fits=peak / 2**30 <= 0.9 * gpu_gib)


def measure(side: str, ckpt: Path, args) -> dict:
    fmt = dict(dtype="bfloat16" if args.dtype == "bf16" else "float32", targets=TARGETS, steps=args.steps, batch=args.batch, seq=args.seq,
               reference=REFERENCE[args.family])
    if side == "qva":
        qlora = "from qva.linear import quantize_nf4_\nquantize_nf4_(model.model)" if args.qlora else ""
        body = QVA.format(qlora=qlora, **fmt)
    else:
        qlora = ("from transformers import BitsAndBytesConfig\nkw['quantization_config'] = BitsAndBytesConfig(load_in_4bit=True, "
                 "bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.{dtype})").format(**fmt) if args.qlora else ""
        body = HF.format(qlora=qlora, **fmt)
    # the model loads before the high-water mark is reset, so the peak counts the step, not the load
    return cold_run("import time\n" + BATCH.format(**fmt) + body, MEASURE.format(**fmt), ckpt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("2b", "tiny"), default="2b")
    p.add_argument("--family", choices=tuple(REFERENCE), default="qwen2_vl",
                   help="2b: the base's smallest Hub shapes (Qwen2-VL 2B, Qwen2.5-VL 3B, Qwen3-VL 2B) against its transformers class")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("bench_results_train_step.json"))
    p.add_argument("--project-7b", action="store_true", help="print only the 7B-shaped QLoRA projection")
    args = p.parse_args()
    proj = project_7b_qlora()
    g = 2**30
    print(f"7B-shaped graft under QLoRA: LLM linears {proj['llm_linear_params'] / 1e9:.2f} B params in {proj['llm_nf4_bytes'] / g:.2f} GiB "
          f"({proj['bits_per_param']:.3f} bits each); bf16 rest {', '.join(f'{k} {v / g:.2f}' for k, v in proj['other_bf16_bytes'].items())} GiB; "
          f"stored {proj['stored_bytes'] / g:.2f} GiB. Stage 2, batch 1 × {proj['seq']}, activation checkpointing: optimizer state "
          f"{proj['optimizer_state_bytes'] / g:.2f} GiB, activations {proj['activation_bytes'] / g:.2f} GiB → projected peak "
          f"{proj['projected_peak_gib']:.1f} GiB ({'fits' if proj['fits'] else 'does not fit'} one 24 GB GPU)")
    if args.project_7b:
        return
    if args.size == "2b":
        ckpt = cached_2b(args.workdir, args.layers, 1, args.family)
    else:
        from qva.demo import cache_dir, write_tiny_qwen2vl

        ckpt = cache_dir() / "demo" / "qwen2-vl"
        if not (ckpt / "config.json").is_file():
            write_tiny_qwen2vl(ckpt)
    runs: dict[str, list[dict]] = {"qva": [], "transformers": []}
    for _ in range(args.repeats):
        for side in runs:
            try:
                runs[side].append(measure(side, ckpt, args))
            except RuntimeError as e:
                print(f"{side}: failed: {str(e)[-400:]}")
    rows = {}
    for side, rs in runs.items():
        if rs:
            rows[side] = {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_rss_over_loaded", "loss0", "trainable")}
    label = (f"{args.size}{'-' + str(args.layers) + 'L ' + args.family if args.size == '2b' else ''}, {'QLoRA' if args.qlora else 'LoRA'}, "
             f"{args.dtype}")
    print(f"\n{label}, batch {args.batch} × {args.seq} tokens (last quarter labelled), {args.repeats} fresh processes each")
    for side, r in rows.items():
        print(f"  {side:12s} step {r['step_s']:.3f} s, peak over loaded model {r['peak_rss_over_loaded'] / 2**20:.0f} MiB, "
              f"first loss {r['loss0']:.4f}, trainable {r['trainable']:,}")
    if len(rows) == 2:
        q, t = rows["qva"], rows["transformers"]
        print(f"  speed-up {t['step_s'] / q['step_s']:.2f}×, peak memory {q['peak_rss_over_loaded'] / t['peak_rss_over_loaded']:.2f}× transformers'")
    args.json.write_text(json.dumps({"config": vars(args) | {"workdir": str(args.workdir), "json": str(args.json)}, "runs": runs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
