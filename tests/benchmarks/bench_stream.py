"""Memory of reading a large training set: `--stream` against reading it whole, on a synthetic parquet set. Not a test.

    python tests/benchmarks/bench_stream.py [--rows 200000] [--workdir DIR]

Writes (once) `--rows` rows of parquet in Hugging Face datasets' layout (shards of 20 000 rows, row groups of
1 000): each row a 0.1 s WAV clip as `{"bytes", "path"}` and its text. Then, each in a fresh process, the resident
memory (RSS) after every tenth of the set:
  stream   `qva.train.stream.Stream` reading the set through a 10 000-example shuffle buffer (what `--stream` trains
           from), every 1 000th sample encoded (tokens + log-mel) as training would
  whole    `qva.train.formats.read_data`: every row parsed into memory first (what a run without `--stream` does
           before encoding them all)
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, ROOT)
mode, data, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])

def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

from qva.demo import demo_tokenizer
from qva.processor import Processor
from qva.image_processing import VisionPreprocessConfig
from qva.qwen2vl_config import Qwen2VLConfig
from qva.train.config import TrainConfig
base = rss_mib()
t0 = time.perf_counter()
marks = []
if mode == "stream":
    from qva.demo import tiny_qwen2vl_config
    from qva.whisper_encoder import WhisperEncoderConfig
    cfg = Qwen2VLConfig.from_dict(tiny_qwen2vl_config()).with_audio(WhisperEncoderConfig())
    processor = Processor(demo_tokenizer(), VisionPreprocessConfig(), config=cfg)
    tc = TrainConfig(stage="1", model="m", train_data=data, out="o", steps=1, stream=True, shuffle_buffer=10_000,
                     prompt="Transcribe the audio.")
    from qva.train.stream import Stream
    stream = Stream(tc, processor, log=lambda text: None)
    for i in range(rows):
        if i % 1000 == 999:
            sample = stream.take(i)
            assert sample is not None and sample.media["input_features"].shape[0] == 1
        if (i + 1) % (rows // 10) == 0:
            marks.append([i + 1, round(rss_mib() - base, 1)])
else:
    from qva.train.formats import iter_data
    examples = []
    for n, item in enumerate(iter_data(data, "Transcribe the audio."), 1):
        examples.append(item)
        if n % (rows // 10) == 0:
            marks.append([n, round(rss_mib() - base, 1)])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"mode": mode, "seconds": time.perf_counter() - t0, "rss_over_base_mib": marks, "peak_rss_mib": peak,
                  "base_rss_mib": base}))
"""


def write_set(folder: Path, rows: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    if (folder / "done.json").is_file() and json.loads((folder / "done.json").read_text())["rows"] == rows:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shard = 20_000
    for s in range(0, rows, shard):
        batch = []
        for i in range(s, min(rows, s + shard)):
            buf = io.BytesIO()
            sf.write(buf, (rng.standard_normal(1600) * 0.1).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
            batch.append({"audio": {"bytes": buf.getvalue(), "path": None}, "text": " ".join(str(d) for d in rng.integers(0, 10, 4))})
        pq.write_table(pa.Table.from_pylist(batch), folder / f"train-{s // shard:05d}.parquet", row_group_size=1000)
    (folder / "done.json").write_text(json.dumps({"rows": rows}))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qva-bench-stream"))
    p.add_argument("--json", type=Path, default=Path("bench_results_stream.json"))
    args = p.parse_args()
    data = write_set(args.workdir / f"parquet-{args.rows}", args.rows)
    size = sum(f.stat().st_size for f in data.glob("*.parquet"))
    print(f"{args.rows:,} rows, {size / 2**20:.0f} MiB of parquet in {data}")
    results = []
    for mode in ("stream", "whole"):
        out = subprocess.run([sys.executable, "-c", CHILD.replace("ROOT", repr(str(ROOT))), mode, str(data), str(args.rows)],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:])
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{mode:6s}: {r['seconds']:.0f} s; RSS over the post-import baseline after each tenth of the rows (MiB): "
              + ", ".join(f"{m[1]:.0f}" for m in r["rss_over_base_mib"]) + f"; peak RSS {r['peak_rss_mib']:.0f} MiB")
    args.json.write_text(json.dumps({"rows": args.rows, "parquet_bytes": size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
