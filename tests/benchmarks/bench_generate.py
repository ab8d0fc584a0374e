"""Generation, side by side in one run: qva vs transformers (sdpa), weights stored in bf16.

    python tests/benchmarks/bench_generate.py [--size 2b|tiny] [--layers 4] [--vision-layers 2] [--whisper-layers 2]
                                              [--dtype bf16|fp32] [--device cpu|cuda] [--compile]

Sizes: `2b`, a random checkpoint with the 2B shapes (`--layers`/`--vision-layers` cut depth to keep CPU runs
practical) and a turbo-shaped Whisper; `tiny`, the `qva-generate --demo` checkpoints (hidden 64, the real
151936-token vocabulary). Rows: cold load (fresh process, weights kept in the storage dtype, each then read once so that lazily
mapped pages count too) with peak RSS; every timed row runs `--repeats` interleaved times (median [min–max]);
Whisper encoder on one 30 s window; vision tower on a 448² image; prefill of 512 tokens to next-token
logits (both sides keep only the last position's logits, as generation does), against transformers at
the storage dtype and against transformers with fp32 weights; greedy decode at batch 1 and 4 (128 new
tokens; decode time = time(128 new) − time(1 new), on both sides), qva eager and, with `--compile`,
compiled; end to end, a 448² image + 10 s of audio → 32 tokens with preprocessing (the transformers side
is the graft assembled from its parts). Also the decode roofline: LLM bytes read per token ÷ the
measured memory bandwidth. qva runs with its default compute-dtype policy (fp32 products over bf16
weights where the CPU has no native bf16 matmul); transformers runs as shipped. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_audio import cached_turbo  # noqa: E402
from bench_qwen2vl import REFERENCE, cached_2b, reference_class  # noqa: E402
from common import cached_checkpoint, cold_run, print_table, rows_json, timed_pair  # noqa: E402

import qva  # noqa: E402
from qva.model import QVAModel  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def memory_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Bytes/s read by a reduction over a large fp32 tensor (median of 5)."""
    x = torch.ones(int(gib * 2**30 / 4), device=device)
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x.sum().item()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / sorted(times[1:])[2]


def decode_bytes_per_token(model: QVAModel) -> int:
    """Bytes one decode step reads: every LLM layer, the final norm and the head, as held (bf16 weights or
    quantized buffers; a tied head once)."""
    llm = model.model
    held = [*llm.layers.state_dict().values(), *llm.norm.state_dict().values(), *model.lm_head.state_dict().values()]
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in held}.values())


def checkpoints(args) -> tuple[Path, Path]:
    """(Qwen2-VL, Whisper) checkpoint folders for `args.size`, written once into `args.workdir`."""
    from qva.demo import write_tiny_qwen2vl, write_tiny_whisper

    if args.size == "tiny":
        return (cached_checkpoint(args.workdir, "tiny-qwen2vl", write_tiny_qwen2vl),
                cached_checkpoint(args.workdir, "tiny-whisper", write_tiny_whisper))
    return cached_2b(args.workdir, args.layers, args.vision_layers, args.family), cached_turbo(args.workdir, args.whisper_layers)


def whisper_row(whisper: Path, dtype: torch.dtype, device: torch.device, repeats: int) -> tuple[float, float]:
    """One 30 s window through each encoder, weights loaded in `dtype`."""
    from transformers import WhisperForConditionalGeneration

    from qva.pretrained import load_whisper_encoder

    ours = load_whisper_encoder(whisper, dtype=dtype, device=device)
    ref = WhisperForConditionalGeneration.from_pretrained(whisper, dtype=dtype).model.encoder.to(device).eval()
    feats = torch.randn(1, ours.config.num_mel_bins, 3000, generator=torch.Generator().manual_seed(0)).to(device)
    return timed_pair(lambda: ref(feats.to(dtype)), lambda: ours(feats), repeats)


def end_to_end(args, ckpt: Path, whisper: Path, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """A 448² image + 10 s of audio + text → 32 greedy tokens, preprocessing included, on both sides.

    transformers side: its image processor, feature extractor and WhisperEncoder, the same projector
    weights, audio rows placed at `<|audio_pad|>` by a hook on the embedding at prefill, then its generate().
    """
    import numpy as np
    from PIL import Image
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    import qva
    from qva.audio import audio_token_count, log_mel
    from qva.image_processing import VisionPreprocessConfig, process_image

    ours = qva.load(ckpt, whisper=whisper, dtype=dtype, device=device)
    ref = reference_class(args.family).from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = None, 151643
    ref_whisper = WhisperForConditionalGeneration.from_pretrained(whisper, dtype=dtype).model.encoder.to(device).eval()
    proj = torch.nn.Linear(ours.audio_projector.in_features, ours.audio_projector.out_features, bias=False).to(dtype)
    proj.weight.data.copy_(ours.audio_projector.weight)
    n_mels = ours.audio_encoder.config.num_mel_bins

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    wave = torch.from_numpy(np.random.default_rng(1).standard_normal(160_000).astype(np.float32) * 0.1)
    n_audio = audio_token_count(1000)  # 10 s → 500 tokens
    c = ours.config
    patch = c.vision.patch_size
    ids = torch.tensor([[151644, 872, 198, 151652] + [151655] * ((448 // patch) ** 2 // 4) + [151653, c.audio_start_token_id]
                        + [c.audio_token_id] * n_audio + [c.audio_end_token_id, 3838, 374, 419, 30, 151645, 198, 151644, 77091, 198]],
                       device=device)
    if args.family == "qwen3_vl":  # 16-pixel patches, mean/std 0.5 (Qwen3-VL's preprocessor_config.json)
        norm = dict(patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
        vision_cfg = VisionPreprocessConfig(max_pixels=448 * 448, **norm)
        img_proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 448 * 448}, **norm)
    else:
        vision_cfg, img_proc = VisionPreprocessConfig(max_pixels=448 * 448), Qwen2VLImageProcessorPil(max_pixels=448 * 448)
    fe = WhisperFeatureExtractor(feature_size=n_mels)

    def run_qva():
        px, grid = process_image(image, vision_cfg)
        feats, valid = log_mel(wave, n_mels)
        return ours.generate(input_ids=ids, pixel_values=px.to(device), image_grid_thw=torch.tensor([grid]),
                             input_features=feats.to(device), audio_valid_frames=valid, max_new_tokens=32, eos_token_id=[])

    def run_ref():
        pix = img_proc(images=[image], return_tensors="pt")
        feats = fe(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features.to(device, dtype)
        rows = proj(ref_whisper(feats).last_hidden_state[0, :n_audio])
        slots = (ids == c.audio_token_id)[..., None]

        def place_audio(module, inputs, out):
            return out.masked_scatter(slots, rows.to(out.dtype)) if out.shape[1] == ids.shape[1] else out

        hook = ref.get_input_embeddings().register_forward_hook(place_audio)
        try:
            return ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix.pixel_values.to(device),
                                image_grid_thw=pix.image_grid_thw, mm_token_type_ids=(ids == 151655).int(),
                                max_new_tokens=32, do_sample=False)
        finally:
            hook.remove()

    return timed_pair(run_ref, run_qva, args.repeats)


def decode_rows(args, ref, ours, device, g) -> tuple[list, dict]:
    """Seconds per greedy step at batch 1 and 4: transformers, qva eager and (with --compile) compiled."""
    rows, decode = [], {}
    variants = [("eager", False)] + ([("compiled", True)] if args.compile else [])
    for batch in (1, 4):
        prompt = torch.randint(0, 150_000, (batch, 64), generator=g).to(device)

        def ref_gen(n, prompt=prompt):
            return ref.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)

        for name, compile in variants:
            def our_gen(n, prompt=prompt, compile=compile):
                return ours.generate(input_ids=prompt, max_new_tokens=n, eos_token_id=[], compile=compile)

            if compile:
                our_gen(args.new_tokens)  # compile once, outside the timing
            t1 = timed_pair(lambda: ref_gen(1), lambda: our_gen(1), args.repeats)
            tn = timed_pair(lambda: ref_gen(args.new_tokens), lambda: our_gen(args.new_tokens), args.repeats)
            steps = args.new_tokens - 1
            per_tok = ((tn[0] - t1[0]) / steps, (tn[1] - t1[1]) / steps)
            decode[f"{batch}-{name}"] = {"batch": batch, "qva": name, "transformers_tok_s": batch / per_tok[0], "qva_tok_s": batch / per_tok[1]}
            rows.append((f"decode, batch {batch}, qva {name} (s per step)", *per_tok))
    return rows, decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("2b", "tiny"), default="2b")
    p.add_argument("--family", choices=tuple(REFERENCE), default="qwen2_vl",
                   help="2b: the base's smallest Hub shapes (Qwen2-VL 2B, Qwen2.5-VL 3B, Qwen3-VL 2B) against its transformers class")
    p.add_argument("--layers", type=int, default=4, help="2b: LLM layers")
    p.add_argument("--vision-layers", type=int, default=2, help="2b: vision blocks")
    p.add_argument("--whisper-layers", type=int, default=2, help="2b: encoder layers of the turbo-shaped Whisper")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype both implementations load the weights in")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="qva: also time the compiled decode step")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="interleaved measurements per row: median [min–max]")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("bench_results_generate.json"))
    args = p.parse_args()

    if args.size == "tiny" and args.family != "qwen2_vl":
        p.error("--family applies to --size 2b (the tiny demo checkpoint is a Qwen2-VL)")
    ref_class = reference_class(args.family)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    ckpt, whisper = checkpoints(args)
    rows = []
    # each weight is read once after loading, so that pages a loader left mapped but untouched count as well
    touch = "\nfor t in m.state_dict().values(): t.sum()"
    cold = {
        "transformers": cold_run(f"from transformers import {REFERENCE[args.family]} as Ref",
                                 f"m = Ref.from_pretrained(PATH, dtype=torch.{dtype}, attn_implementation='sdpa')" + touch, ckpt),
        "qva": cold_run("import qva", f"m = qva.load(PATH, dtype=torch.{dtype})" + touch, ckpt),
    }
    rows.append((f"cold load ({args.dtype})", cold["transformers"]["seconds"], cold["qva"]["seconds"]))

    def load_ref(dt):
        ref = ref_class.from_pretrained(ckpt, dtype=dt, attn_implementation="sdpa").to(device).eval()
        ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = None, 151643
        return ref

    ours = qva.load(ckpt, dtype=dtype, device=device)
    ref = load_ref(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        rows.append(("Whisper encoder, one 30 s window", *whisper_row(whisper, dtype, device, args.repeats)))
        side = 448 // ours.config.vision.patch_size
        grid = torch.tensor([[1, side, side]])
        px = torch.randn(side * side, ours.config.vision.patch_dim, generator=g).to(device)
        rows.append(("vision tower, 448² image", *timed_pair(lambda: ref.model.visual(px, grid_thw=grid), lambda: ours.visual(px, grid), args.repeats)))
        ids = torch.randint(0, 150_000, (1, 512), generator=g).to(device)
        prefill = ("prefill, 512 tokens → next-token logits",
                   *timed_pair(lambda: ref(input_ids=ids, logits_to_keep=1), lambda: ours(ids, logits_to_keep=1), args.repeats))
        rows.append(prefill)
        if dtype != torch.float32:
            ref32 = load_ref(torch.float32)
            rows.append(("prefill, vs transformers with fp32 weights",
                         *timed_pair(lambda: ref32(input_ids=ids, logits_to_keep=1), lambda: ours(ids, logits_to_keep=1), args.repeats)))
            del ref32
        more, decode = decode_rows(args, ref, ours, device, g)
        rows += more
        rows.append(("end to end: 448² image + 10 s audio → 32 tokens", *end_to_end(args, ckpt, whisper, dtype, device)))

    bw = memory_bandwidth(device)
    per_token = decode_bytes_per_token(ours)
    roofline = bw / per_token
    print_table(rows)
    print(f"roofline: {per_token / 1e9:.3f} GB read per token at {bw / 1e9:.1f} GB/s = {roofline:.2f} tok/s")
    for d in decode.values():
        print(f"decode batch {d['batch']}, qva {d['qva']:8s}: transformers {d['transformers_tok_s']:.2f} tok/s, qva {d['qva_tok_s']:.2f} tok/s"
              + (f"; of the roofline: transformers {d['transformers_tok_s'] / roofline:.0%}, qva {d['qva_tok_s'] / roofline:.0%}" if d["batch"] == 1 else ""))
    print(f"prefill: transformers {512 / prefill[1]:.1f} tok/s, qva {512 / prefill[2]:.1f} tok/s")
    for w in ("transformers", "qva"):
        print(f"cold load peak RSS, {w:12s}: {cold[w]['peak_rss_over_base'] / 2**20:.0f} MiB")
    args.json.write_text(json.dumps({"size": args.size, "family": args.family, "dtype": args.dtype, "device": args.device, "layers": args.layers, "rows": rows_json(rows),
                                     "decode": decode, "bandwidth_Bps": bw, "bytes_per_token": per_token, "roofline_tok_s": roofline,
                                     "cold": cold}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
