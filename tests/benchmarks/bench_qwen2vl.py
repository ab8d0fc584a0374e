"""qva vs transformers (sdpa, fp32), side by side in one run, on a random 2B-shaped Qwen2-VL stored in bf16.

    python tests/benchmarks/bench_qwen2vl.py [--layers 4] [--vision-layers 32] [--json out.json]

Rows: cold start (fresh process: load the bf16 checkpoint as fp32 + first forward of a 64-token prompt)
with peak RSS over the post-import baseline; vision tower on one 448×448 image and on 4 at once; LLM
prefill of 512 tokens. The checkpoint is written in the Hub's layout (flat config, tied embeddings
without lm_head.weight, sharded). `--layers` / `--vision-layers` cut depth to keep CPU runs practical.
This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import cached_checkpoint, cold_run, print_table, rows_json, timed_pair  # noqa: E402

import qva  # noqa: E402
from qva.model import QVAModel  # noqa: E402
from qva.qwen2vl_config import Qwen2VLConfig, file_name  # noqa: E402
from weights_loader.writer import save_checkpoint  # noqa: E402

HUB_2B = {  # Qwen2-VL-2B-Instruct's config.json (flat Hub layout)
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_act": "silu",
    "hidden_size": 1536, "intermediate_size": 8960, "max_position_embeddings": 32768, "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 1536,
                      "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2},
}


HUB_3B_25 = {  # Qwen2.5-VL-3B-Instruct's config.json (flat Hub layout): where it differs from Qwen2-VL-2B's
    **HUB_2B, "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 2048,
    "intermediate_size": 11008, "max_position_embeddings": 128000, "num_attention_heads": 16, "num_hidden_layers": 36,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}
HUB_2B_3 = {  # Qwen3-VL-2B-Instruct's config.json (nested Hub layout)
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "tie_word_embeddings": True,
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "text_config": {"attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
                    "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
                    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "tie_word_embeddings": True, "vocab_size": 151936},
    "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1024,
                      "in_channels": 3, "intermediate_size": 4096, "model_type": "qwen3_vl", "num_heads": 16,
                      "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2,
                      "temporal_patch_size": 2},
}
HUB = {"qwen2_vl": HUB_2B, "qwen2_5_vl": HUB_3B_25, "qwen3_vl": HUB_2B_3}  # the smallest Hub model of each family
REFERENCE = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
             "qwen3_vl": "Qwen3VLForConditionalGeneration"}  # transformers' class, side by side


def reference_class(family: str):
    import transformers

    return getattr(transformers, REFERENCE[family])


def write_2b(folder: Path, layers: int, vision_layers: int, family: str = "qwen2_vl") -> Path:
    """Random bf16 weights with the family's smallest Hub shapes (Qwen2-VL 2B, Qwen2.5-VL 3B, Qwen3-VL 2B; std 0.02,
    unit norms), Hub layout and tensor names, 2 GB shards. Qwen3-VL keeps its DeepStack taps inside `vision_layers`."""
    config = json.loads(json.dumps(HUB[family]))
    text = config.get("text_config", config)
    text["num_hidden_layers"] = layers
    config["vision_config"]["depth"] = vision_layers
    if family == "qwen2_5_vl":
        config["vision_config"]["fullatt_block_indexes"] = [vision_layers - 1]
    if family == "qwen3_vl":
        config["vision_config"]["deepstack_visual_indexes"] = list(range(min(vision_layers, layers, 3)))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in QVAModel(Qwen2VLConfig.from_dict(config)).state_dict().items() if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        norm = name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight"))
        tensors[file_name(name, family)] = (torch.ones(shape) if norm else torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    return save_checkpoint(folder, tensors, config, max_shard_bytes=2 * 1024**3)


def cached_2b(workdir: Path | None, layers: int, vision_layers: int, family: str = "qwen2_vl") -> Path:
    """`write_2b`'s checkpoint in `workdir`, written on first use (shared by the benchmark scripts)."""
    name = {"qwen2_vl": "qwen2vl-2b", "qwen2_5_vl": "qwen2_5vl-3b", "qwen3_vl": "qwen3vl-2b"}[family]
    return cached_checkpoint(workdir, f"{name}-{layers}L-{vision_layers}V", lambda f: write_2b(f, layers, vision_layers, family))


COLD_IMPORTS = {
    "qva": "import qva",
    "transformers": "from transformers import Qwen2VLForConditionalGeneration",
}
COLD_BODY = {
    "qva": "model = qva.load(PATH, dtype=torch.float32)",
    "transformers": "model = Qwen2VLForConditionalGeneration.from_pretrained(PATH, dtype=torch.float32, attn_implementation='sdpa').eval()",
}
FIRST_FORWARD = """
result["load_peak_rss_over_base"] = peak_rss.peak() - base
ids = torch.randint(0, 150000, (1, 64), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model(input_ids=ids)
result["weights_bytes"] = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values())
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="LLM layers (2B: 28)")
    p.add_argument("--vision-layers", type=int, default=32, help="vision blocks (2B: 32)")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("bench_results_qwen2vl.json"))
    args = p.parse_args()

    from transformers import Qwen2VLForConditionalGeneration

    ckpt = cached_2b(args.workdir, args.layers, args.vision_layers)
    rows = []

    cold = {w: cold_run(COLD_IMPORTS[w], COLD_BODY[w] + FIRST_FORWARD, ckpt) for w in ("transformers", "qva")}
    rows.append(("cold start: bf16 → fp32 load + 64-token forward", cold["transformers"]["seconds"], cold["qva"]["seconds"]))

    ours = qva.load(ckpt, dtype=torch.float32)
    ref = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    errs = {}
    with torch.inference_mode():
        for n_images in (1, 4):
            grid = torch.tensor([[1, 32, 32]] * n_images)  # 448×448 → 32×32 patches of 14 px
            px = torch.randn(1024 * n_images, 1176, generator=g)
            errs[f"vision_{n_images}"] = (ours.visual(px, grid) - ref.model.visual(px, grid_thw=grid).pooler_output).abs().max().item()
            t_t, t_q = timed_pair(lambda px=px, grid=grid: ref.model.visual(px, grid_thw=grid), lambda px=px, grid=grid: ours.visual(px, grid), args.repeats)
            rows.append((f"vision tower, {n_images} × 448² image{'s' * (n_images > 1)}", t_t, t_q))
        ids = torch.randint(0, 150000, (1, args.prefill), generator=g)
        errs["prefill_logits"] = (ours(ids).logits - ref(input_ids=ids).logits).abs().max().item()
        t_t, t_q = timed_pair(lambda: ref(input_ids=ids), lambda: ours(ids), args.repeats)
        rows.append((f"LLM prefill, {args.prefill} tokens", t_t, t_q))

    print_table(rows)
    print(f"prefill tokens/s: transformers {args.prefill / rows[-1][1]:.1f}, qva {args.prefill / rows[-1][2]:.1f}")
    print("max abs diff on these inputs: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    need = cold["qva"]["weights_bytes"]
    for w in ("transformers", "qva"):
        c = cold[w]
        print(f"peak RSS over baseline, {w:12s}: load {c['load_peak_rss_over_base'] / 2**20:6.0f} MiB "
              f"({c['load_peak_rss_over_base'] / need:.2f}× the {need / 2**20:.0f} MiB of fp32 weights), "
              f"with first forward {c['peak_rss_over_base'] / 2**20:6.0f} MiB")
    result = {
        "threads": torch.get_num_threads(), "torch": torch.__version__, "layers": args.layers,
        "vision_layers": args.vision_layers, "rows": rows_json(rows), "cold": cold, "fp32_weights_bytes": need,
        "qva_load_peak_over_target": cold["qva"]["load_peak_rss_over_base"] / need, "max_abs_diff": errs,
    }
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
