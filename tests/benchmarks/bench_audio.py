"""qva vs transformers, side by side in one run: Whisper features, encoder forward, cold load.

    python tests/benchmarks/bench_audio.py [--layers 32] [--bf16-layers 2] [--json out.json]

Builds a random large-v3-turbo-shaped Whisper checkpoint (fp16, Hub layout, decoder included so that
loading has to skip it) and times both implementations on the same input in the same process.
Cold load runs each implementation in a fresh process: wall time to a ready fp32 encoder and peak RSS
over the post-import baseline. This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import ROOT, cached_checkpoint, cold_run, print_table, rows_json, timed_pair  # noqa: E402

from qva.audio import load_audio, log_mel  # noqa: E402
from qva.pretrained import load_whisper_encoder  # noqa: E402
from weights_loader.writer import save_checkpoint  # noqa: E402

TURBO = dict(num_mel_bins=128, d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, max_source_positions=1500,
             decoder_layers=4, decoder_attention_heads=20, decoder_ffn_dim=5120, vocab_size=51866)


def write_turbo(folder: Path, layers: int) -> Path:
    """Random turbo-shaped WhisperForConditionalGeneration checkpoint in fp16, shapes from transformers."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(encoder_layers=layers, **TURBO)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WhisperForConditionalGeneration(cfg).state_dict().items() if k != "proj_out.weight"}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.02
        if k.endswith("layer_norm.weight"):
            t += 1
        tensors[k] = t.half()
    config = {**cfg.to_dict(), "torch_dtype": "float16", "architectures": ["WhisperForConditionalGeneration"]}
    return save_checkpoint(folder, tensors, config, max_shard_bytes=2 * 1024**3)


def cached_turbo(workdir: Path | None, layers: int) -> Path:
    """`write_turbo`'s checkpoint in `workdir`, written on first use (shared by the benchmark scripts)."""
    return cached_checkpoint(workdir, f"turbo-{layers}L", lambda f: write_turbo(f, layers))


COLD = {  # (imports, load): peak RSS is measured from after the imports
    "qva": ("from qva.pretrained import load_whisper_encoder",
            "enc = load_whisper_encoder(PATH, dtype=torch.float32)"),
    "transformers": ("from transformers import WhisperForConditionalGeneration",
                     "enc = WhisperForConditionalGeneration.from_pretrained(PATH, dtype=torch.float32).model.encoder"),
}
ENCODER_BYTES = "result['encoder_bytes'] = sum(p.numel() * p.element_size() for p in enc.state_dict().values())"


def cold_load(which: str, path: Path) -> dict:
    imports, load = COLD[which]
    return cold_run(imports, load + "\n" + ENCODER_BYTES, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="encoder layers of the turbo-shaped checkpoint (turbo: 32)")
    p.add_argument("--bf16-layers", type=int, default=2, help="layers kept for the bf16 rows (this CPU has no native bf16 matmul)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("bench_results_audio.json"))
    args = p.parse_args()

    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    ckpt = cached_turbo(args.workdir, args.layers)
    torch.manual_seed(0)
    rows = []

    # features: one 30 s window of speech-like audio (jfk.flac looped when ../shared is there)
    jfk = ROOT.parent / "shared" / "data" / "whisper-assets" / "jfk.flac"
    wave = load_audio(jfk).repeat(3)[: 30 * 16000] if jfk.exists() else 0.1 * torch.randn(30 * 16000)
    fe = WhisperFeatureExtractor(feature_size=128)
    t_t, t_q = timed_pair(lambda: fe(wave.numpy(), sampling_rate=16000, return_tensors="pt"), lambda: log_mel(wave, 128), args.repeats * 5)
    rows.append(("log-mel, 30 s, 128 bins", t_t, t_q))
    features, _ = log_mel(wave, 128)

    # encoder forward, fp32
    q = load_whisper_encoder(ckpt, dtype=torch.float32)
    ref = WhisperForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).model.encoder.eval()
    with torch.inference_mode():
        err = (q(features) - ref(features).last_hidden_state).abs().max().item()
        t_t, t_q = timed_pair(lambda: ref(features), lambda: q(features), args.repeats)
    rows.append((f"encoder fp32, {args.layers} layers, 1 window", t_t, t_q))

    # encoder forward, bf16 weights and activations (both implementations as shipped), first k layers
    k = args.bf16_layers
    q.layers = q.layers[:k]
    ref.layers = ref.layers[:k]
    q, ref = q.to(torch.bfloat16), ref.to(torch.bfloat16)
    with torch.inference_mode():
        t_t, t_q = timed_pair(lambda: ref(features.bfloat16()), lambda: q(features), 1)
    rows.append((f"encoder bf16, {k} layers, 1 window", t_t, t_q))
    q = ref = None  # free the models before the cold-load runs

    cold = {w: cold_load(w, ckpt) for w in ("transformers", "qva")}
    rows.append(("cold load fp16 ckpt → fp32 encoder (s)", cold["transformers"]["seconds"], cold["qva"]["seconds"]))
    need = cold["qva"]["encoder_bytes"]

    print_table(rows)
    print(f"fp32 encoder parity on this input: max abs diff {err:.2e}")
    for w in ("transformers", "qva"):
        c = cold[w]
        print(f"cold load peak RSS, {w:12s}: {c['peak_rss_over_base'] / 2**20:8.0f} MiB over baseline "
              f"({c['peak_rss_over_base'] / need:.2f}× the {need / 2**20:.0f} MiB fp32 encoder)")
    result = {
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "layers": args.layers, "bf16_layers": k, "fp32_max_abs_diff": err, "rows": rows_json(rows),
        "cold_load": cold, "encoder_fp32_bytes": need,
        "qva_peak_over_target": cold["qva"]["peak_rss_over_base"] / need,
    }
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
