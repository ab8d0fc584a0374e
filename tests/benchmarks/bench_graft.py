"""The audio graft: load memory and the fused merge's speed. Not a test: it asserts nothing.

    python tests/benchmarks/bench_graft.py [--layers 4] [--vision-layers 32] [--whisper-layers 32]

- Peak RSS of `qva.load(qwen, whisper=...)` in a fresh process (random 2B-shaped Qwen2-VL in bf16 and
  a turbo-shaped Whisper in fp16, loaded as bf16) against the bytes the model needs.
- `merge_embeddings` (one fused gather) vs one `masked_scatter` per modality, for a batch of 4k tokens
  with image, video and audio placeholders, forward and forward + backward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_audio import cached_turbo  # noqa: E402
from bench_qwen2vl import cached_2b  # noqa: E402
from common import cold_run, print_table, rows_json, timed_pair  # noqa: E402

from qva.merge import merge_embeddings  # noqa: E402


def merge_case(batch: int = 4, seq: int = 1024, d: int = 1536, seed: int = 0):
    """4 × 1024 tokens: ~30% image, 20% video, 25% audio placeholders in runs, the rest text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150_000, (batch, seq), generator=g)
    for row in range(batch):
        ids[row, 10:317] = 151655
        ids[row, 330:535] = 151656
        ids[row, 600:856] = 151659
    tok = torch.randn(batch, seq, d, generator=g, requires_grad=True)
    feats = [(tid, torch.randn(int((ids == tid).sum()), d, generator=g, requires_grad=True)) for tid in (151655, 151656, 151659)]
    return ids, tok, feats


def masked_scatter_merge(ids, tok, feats):
    out = tok
    for tid, rows in feats:
        out = out.masked_scatter((ids == tid)[..., None], rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-layers", type=int, default=32)
    p.add_argument("--whisper-layers", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("bench_results_graft.json"))
    args = p.parse_args()

    qwen = cached_2b(args.workdir, args.layers, args.vision_layers)
    whisper = cached_turbo(args.workdir, args.whisper_layers)
    load = cold_run("import qva", f"""
model = qva.load(PATH, whisper={str(whisper)!r}, dtype=torch.bfloat16)
result["model_bytes"] = sum(t.numel() * t.element_size() for t in {{t.data_ptr(): t for t in model.state_dict().values()}}.values())  # tied weights once
""", qwen)

    rows = []
    ids, tok, feats = merge_case()
    with torch.no_grad():
        assert torch.equal(merge_embeddings(ids, tok, feats), masked_scatter_merge(ids, tok, feats))
        rows.append(("merge forward, 4×1024 tokens, 3 modalities", *timed_pair(
            lambda: masked_scatter_merge(ids, tok, feats), lambda: merge_embeddings(ids, tok, feats), 20)))
    weights = torch.randn(tok.shape)
    rows.append(("merge forward + backward", *timed_pair(
        lambda: (masked_scatter_merge(ids, tok, feats) * weights).sum().backward(),
        lambda: (merge_embeddings(ids, tok, feats) * weights).sum().backward(), 20)))
    print_table(rows, unit="s")
    need = load["model_bytes"]
    print(f"graft load (bf16): {load['seconds']:.1f} s, peak RSS {load['peak_rss_over_base'] / 2**20:.0f} MiB over baseline "
          f"= {load['peak_rss_over_base'] / need:.3f}× the {need / 2**20:.0f} MiB the model needs")
    args.json.write_text(json.dumps({"rows": rows_json(rows), "graft_load": load, "peak_over_needed": load["peak_rss_over_base"] / need}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
