"""The spoken-digits recipe (`tests/benchmarks/bench_train.py`), its CI slice: a 2-layer LLM learns the text
form of the task, then stage 1 trains the projector over the real Whisper tiny.en on real speech. Exact match
of the whole 2–6-digit string by chance is under 1%; the slice must clear that by a wide margin."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
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
    assert results["lm"]["lm_dev"] >= 10.0  # the text form alone, 2 layers and 220 steps
    assert results["stage1"]["dev"] >= 5.0 and results["stage1"]["unseen"] >= 5.0  # speech through the projector only
    with Checkpoint(tmp_path / "stage1") as ckpt:  # a qva.save folder: the graft, Whisper included
        assert "audio_projector.weight" in ckpt.names() and any(n.startswith("audio_encoder.") for n in ckpt.names())


@need_shared(DIGITS)
@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="espeak-ng and sox (Debian) not installed")
def test_digits_recipe_sets_keep_apart(tmp_path):
    """The synthesized sets: 16 kHz mono FLAC, reproducible (a second call reuses them), the hard set's voices new to
    the corpus, and no dev, unseen-voice or hard string in any training manifest (text or speech)."""
    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    import bench_train

    m = bench_train.prepare(DIGITS, tmp_path, 40, 50, extra=3, hard=4)
    rows = {k: [json.loads(line) for line in m[k].read_text().splitlines()]
            for k in ("train", "dev", "unseen", "unseen_distinct", "hard", "lm_train")}
    assert rows["unseen_distinct"] and all(r in rows["unseen"] and not r["voice"].startswith("en-gb+") for r in rows["unseen_distinct"])
    assert [r["split"] for r in rows["train"]].count("extra") == 3 and len(rows["hard"]) == 4
    corpus = [json.loads(line) for f in ("train.jsonl", "dev.jsonl") for line in (DIGITS / f).read_text().splitlines()]
    assert not {r["voice"] for r in rows["hard"]} & {x["voice"] for x in corpus}
    held = {r["text"] for k in ("dev", "unseen", "hard") for r in rows[k]}
    trained = {r["text"] for r in rows["train"]} | {r["messages"][1]["content"] for r in rows["lm_train"]}
    assert held and not held & trained
    for r in rows["hard"] + [r for r in rows["train"] if r["split"] == "extra"]:
        info = sf.info(r["audio"])
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC") and info.duration > 0.5, (r, info)
    stamp = Path(rows["hard"][0]["audio"]).stat().st_mtime_ns
    bench_train.prepare(DIGITS, tmp_path, 40, 50, extra=3, hard=4)
    assert Path(rows["hard"][0]["audio"]).stat().st_mtime_ns == stamp  # the same rows: the clips are reused


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng (Debian) not installed")
def test_digits_recipe_voices_are_what_they_name():
    """`espeak_voice` makes a British voice's variant heard (espeak-ng 1.51 speaks "en-gb+VARIANT" as the base
    voice): two variants give different speech, and every other voice passes unchanged."""
    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    import digit_speech

    def speech(voice):
        return subprocess.run(["espeak-ng", "-v", digit_speech.espeak_voice(voice), "--stdout", "three zero seven"],
                              capture_output=True, check=True).stdout

    assert len({speech("en-gb+f3"), speech("en-gb+m3"), speech("en-us+f3")}) == 3
    assert digit_speech.espeak_voice("en-gb-x-rp+f4") == "en-gb-x-rp+f4" and digit_speech.espeak_voice("en-gb") == "en-gb"


def test_digits_recipe_wide_voices_stay_apart():
    """The wide training voices: every seen voice, plus the seen accents with new variants only — no held-out
    voice, no corpus variant under another accent, and nothing of the hard set's."""
    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    import bench_train
    import digit_speech

    corpus = {json.loads(line)["voice"] for f in ("train.jsonl", "dev.jsonl") for line in (DIGITS / f).read_text().splitlines()} \
        if (DIGITS / "train.jsonl").exists() else {f"{a}+{v}" for a in ("en-us", "en-gb") for v in ("m1", "m3", "f2", "david")}
    held = bench_train.held_out_voices(corpus)
    seen = sorted(corpus - held)
    wide = digit_speech.wide_voices(seen)
    added = set(wide) - set(seen)
    assert set(seen) <= set(wide) and len(added) == len({v.partition("+")[0] for v in seen}) * len(digit_speech.WIDE_VARIANTS)
    variants = {v.partition("+")[2] for v in corpus} | set(digit_speech.HARD_VARIANTS)
    assert not added & held and not {v.partition("+")[2] for v in added} & variants
    assert not {v.partition("+")[0] for v in wide} & set(digit_speech.HARD_ACCENTS)


def test_digits_recipe_string_and_condition_draws():
    """`draw_strings(repeat=…)` repeats a digit at that rate and avoids what it is told to; the broad training
    conditions never include one of the hard set's."""
    import random

    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    import bench_train
    import digit_speech

    avoid = {"12", "345"}
    for repeat in (0.1, 0.3):
        strings = bench_train.draw_strings(2000, random.Random(0), set(avoid), repeat=repeat)
        pairs = [(a, b) for s in strings for a, b in zip(s, s[1:])]
        assert abs(sum(a == b for a, b in pairs) / len(pairs) - repeat) < 0.03
        assert len(set(strings)) == 2000 and not avoid & set(strings) and all(2 <= len(s) <= 6 for s in strings)
    rows = digit_speech.extra_rows(["123"] * 400, ["en-us+m3"], 0, broad=True, speed=0.1)
    assert {r["condition"] for r in rows} == set(digit_speech.TRAIN_CONDITIONS)
    assert not {r["condition"] for r in rows} & set(digit_speech.HARD_CONDITIONS)
    assert {r["condition"] for r in digit_speech.extra_rows(["123"] * 50, ["en-us+m3"], 0, speed=0.1)} == {"clean", "white-noise"}
    assert {r["speed"] for r in digit_speech.extra_rows(["123"] * 50, ["en-us+m3"], 0, speed=0.1)} == {0.9, 1.0, 1.1}
    assert {r["speed"] for r in digit_speech.extra_rows(["123"] * 50, ["en-us+m3"], 0, speed=0.25)} == {0.75, 1.0, 1.25}


def test_digits_recipe_one_setting_changed(capsys):
    """`--set NAME=VALUE` changes one recipe setting, typed like the default; an unknown name or a bad value is a
    usage error naming it."""
    import argparse

    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    import bench_train

    parser = argparse.ArgumentParser()
    prm = dict(bench_train.FULL)
    assert bench_train.recipe_overrides(["stretch=8", "s2_lr=5e-4", "broad=true"], prm, parser) == \
        {"stretch": 8, "s2_lr": 5e-4, "broad": True}
    for bad, match in (("stretchy=8", "NAME one of"), ("stretch", "NAME one of"), ("stretch=a", "stretch takes a int, got 'a'"),
                       ("broad=ture", "broad takes a bool, got 'ture'")):
        with pytest.raises(SystemExit):
            bench_train.recipe_overrides([bad], prm, parser)
        assert match in capsys.readouterr().err
