"""The spoken-digits recipe (`tests/benchmarks/bench_train.py`), its CI slice: a 2-layer LLM learns the text
form of the task, then stage 1 trains the projector over the real Whisper tiny.en on real speech. Exact match
of the whole 2–6-digit string by chance is under 1%; the slice must clear that by a wide margin."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, SHARED, WHISPER_TINY_EN, need_shared

from weights_loader import Checkpoint

DIGITS = SHARED / "spoken-digits"


@need_shared(DIGITS)
@need_shared(WHISPER_TINY_EN)
def test_digits_recipe_slice_hears(tmp_path):
    script = ROOT / "tests" / "benchmarks" / "bench_train.py"
    run = subprocess.run([sys.executable, str(script), "--recipe", "digits", "--slice", "--stages", "lm,stage1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200)  # minutes on an AVX2-only CPU (bf16 emulated)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    print(json.dumps({k: results[k] for k in ("lm", "stage1")}))
    assert results["lm"]["lm_dev"] >= 10.0  # the text form alone, 2 layers and 150 steps
    assert results["stage1"]["dev"] >= 5.0 and results["stage1"]["unseen"] >= 5.0  # speech through the projector only
    with Checkpoint(tmp_path / "stage1") as ckpt:  # a qva.save folder: the graft, Whisper included
        assert "audio_projector.weight" in ckpt.names() and any(n.startswith("audio_encoder.") for n in ckpt.names())
