"""Audio over 30 s reaches the model whole on every path, or is refused by name; never cut silently.

95 s (four windows, the last partial) and 20 min (forty full windows) of speech-like sound through: `qva.log_mel`
(its windows), the processor (its placeholders), `generate` (what the encoder and the projector see), the chat
endpoint's `input_audio` (its prompt), training samples (whole, or skipped naming the example and its length).
The transcription endpoint's own long-audio tests are in serve/test_transcribe.py; `split_at_pauses`' rules are
checked here. The demo model's context (4096 tokens) holds 81 s of audio at 50 tokens a second, so generation and
chat run on a copy with a 16 384-token context and `audio_pool=8` (`serve_helpers.long_context_graft`)."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
import torch
from conftest import AUDIO_PAD, ServeProcess, speechlike
from serve_helpers import bursts, long_context_graft, metric, wav_bytes

import qva
from qva.audio import N_SAMPLES, SAMPLE_RATE, audio_token_count, clip_tokens, log_mel, split_at_pauses

openai = pytest.importorskip("openai")
LENGTHS = {"95 s": 95, "20 min": 20 * 60}


@pytest.fixture(scope="module")
def waves() -> dict[str, torch.Tensor]:
    return {name: speechlike(seconds, i) for i, (name, seconds) in enumerate(LENGTHS.items())}


@pytest.fixture(scope="module")
def graft(demo_dirs):
    """The demo graft (50 audio tokens a second, 4096-token context)."""
    return qva.load(demo_dirs[0], whisper=demo_dirs[1], dtype=torch.float32)


@pytest.fixture(scope="module")
def wide_dir(demo_dirs, tmp_path_factory):
    return long_context_graft(tmp_path_factory.mktemp("wide"), demo_dirs)


@pytest.fixture(scope="module")
def wide(wide_dir):
    return qva.load(wide_dir, dtype=torch.float32)


def ask(wave) -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "text", "text": "What is said?"}]}]


def expected_valid(n: int) -> list[int]:
    """Valid mel frames of each 30 s window of an n-sample clip."""
    full, rest = divmod(n, N_SAMPLES)
    return [3000] * full + ([math.ceil(rest / 160)] if rest else [])


def test_log_mel_makes_every_window(waves):
    for name, w in waves.items():
        feats, valid = log_mel(w, 80)
        n = w.shape[0]
        assert feats.shape == (math.ceil(n / N_SAMPLES), 80, 3000), name
        assert valid.tolist() == expected_valid(n), name
        assert torch.isfinite(feats).all() and feats[-1, :, : valid[-1]].std() > 0, name  # the last window holds the clip's end


def test_the_processor_places_a_token_for_every_window(graft, waves):
    for name, w in waves.items():
        inputs = graft.processor.apply_chat_template(ask(w), add_generation_prompt=True, tokenize=True)
        n = w.shape[0]
        pads = int((inputs["input_ids"] == AUDIO_PAD).sum())
        assert pads == clip_tokens(n) == sum(audio_token_count(v) for v in expected_valid(n)), name
        assert inputs["input_features"].shape[0] == len(expected_valid(n)) and inputs["audio_valid_frames"].tolist() == expected_valid(n)
    assert (len(expected_valid(95 * SAMPLE_RATE)), clip_tokens(95 * SAMPLE_RATE)) == (4, 4750)
    assert (len(expected_valid(1200 * SAMPLE_RATE)), clip_tokens(1200 * SAMPLE_RATE)) == (40, 60000)


def test_generate_encodes_every_window_and_uses_the_last(wide, waves):
    seen = {}  # the encoder runs WINDOWS_AT_ONCE windows per call: its windows are summed over the calls of one clip
    hooks = [
        wide.audio_encoder.register_forward_hook(lambda m, i, o: seen.__setitem__("windows", seen.get("windows", 0) + i[0].shape[0])),
        wide.audio_projector.register_forward_hook(lambda m, i, o: seen.__setitem__("rows", i[0].shape[0])),
    ]
    try:
        for name, w in waves.items():
            seen.clear()
            inputs = wide.processor.apply_chat_template(ask(w), add_generation_prompt=True, tokenize=True)
            out = wide.generate(**inputs, max_new_tokens=1)
            assert out.shape[1] == inputs["input_ids"].shape[1] + 1
            assert seen == {"windows": len(expected_valid(w.shape[0])), "rows": clip_tokens(w.shape[0], "valid", 8)}, name
    finally:
        for h in hooks:
            h.remove()
    w = waves["95 s"]  # the final second changes the answer's logits: the last window is read, not only counted
    quiet = w.clone()
    quiet[-SAMPLE_RATE:] = 0
    with torch.inference_mode():
        a, b = (wide(**wide.processor.apply_chat_template(ask(x), add_generation_prompt=True, tokenize=True)).logits[0, -1] for x in (w, quiet))
    assert (a - b).abs().max() > 1e-3


def test_chat_input_audio_is_prompted_whole(wide_dir, wide, waves):
    srv = ServeProcess("--model", str(wide_dir), "--dtype", "fp32", "--served-model-name", "wide", "--max-model-len", "8192")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="x", max_retries=0, timeout=300)
        for name, w in waves.items():
            raw = wav_bytes(w.numpy())
            audio = metric(srv, 'qva_media_parts_total{kind="audio"}')
            r = client.chat.completions.create(
                model="wide",
                max_tokens=2,
                temperature=0,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": "wav"}},
                            {"type": "text", "text": "What is said?"},
                        ],
                    }
                ],
            )
            offline = wide.processor.apply_chat_template(ask(qva.load_audio(raw)), add_generation_prompt=True, tokenize=True)
            assert r.usage.prompt_tokens == offline["input_ids"].shape[1], name
            assert int((offline["input_ids"] == AUDIO_PAD).sum()) == clip_tokens(w.shape[0], "valid", 8), name
            assert metric(srv, 'qva_media_parts_total{kind="audio"}') == audio + 1
    finally:
        srv.stop()


def test_a_training_sample_is_whole_or_skipped_by_name(graft, waves, tmp_path):
    from qva.train.data import DataError, Example, encode, encode_all

    examples = []
    for i, (name, w) in enumerate(waves.items()):
        path = tmp_path / f"{i}.wav"
        path.write_bytes(wav_bytes(w.numpy()))
        messages = ask(str(path)) + [{"role": "assistant", "content": "seven five five"}]
        examples.append(Example(messages, f"train.jsonl:{i + 1}"))
    sample = encode(examples[0], graft.processor, max_seq_len=8192)
    n = waves["95 s"].shape[0]
    assert int((sample.input_ids == AUDIO_PAD).sum()) == clip_tokens(n) == 4750
    assert sample.media["input_features"].shape[0] == 4 and sample.media["audio_valid_frames"].tolist() == expected_valid(n)
    assert sample.n_labels > 0 and sample.input_ids.shape[0] > 4750
    length = sample.input_ids.shape[0]
    with pytest.raises(DataError, match=rf"^train.jsonl:1: {length} tokens, over max_seq_len 4096$"):
        encode(examples[0], graft.processor, max_seq_len=4096)
    with pytest.raises(DataError, match=rf"^train.jsonl:1: {length} tokens, over the model's context of 4096"):
        encode(examples[0], graft.processor, max_seq_len=8192, context=4096)
    samples, bad = encode_all(examples, graft.processor, max_seq_len=8192)
    assert [s.example.where for s in samples] == ["train.jsonl:1"]
    assert len(bad) == 1 and bad[0][0] == "train.jsonl:2" and bad[0][1].endswith("tokens, over max_seq_len 8192")
    assert int(bad[0][1].split()[0]) > clip_tokens(waves["20 min"].shape[0])  # its whole length is named, not a cut one


# -- split_at_pauses ------------------------------------------------------------------------------------------------------
def test_split_at_pauses_rules():
    rate = SAMPLE_RATE
    assert split_at_pauses(torch.zeros(10 * rate)) == [] and split_at_pauses(torch.zeros(0)) == []
    steady = speechlike(100, 0)  # no pauses: pieces tile the clip, each ≤ 30 s, cut in the second half of a window
    pieces = split_at_pauses(steady)
    assert pieces[0][0] == 0 and pieces[-1][1] == steady.shape[0] and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert all(15 * rate < b - a <= 30 * rate for a, b in pieces[:-1])
    spans = [(1.0, 10.0), (10.5, 20.0), (24.0, 30.0), (30.2, 55.0)]  # a 0.2 s gap is inside speech, 0.5 s a pause
    wave = torch.from_numpy(bursts(spans, 60.0))
    pieces = [(a / rate, b / rate) for a, b in split_at_pauses(wave)]
    assert pieces[0] == (0.8, 20.2)  # two runs 0.5 s apart: one piece (under 2 s apart, within 30 s)
    assert pieces[1][0] == 23.8 and pieces[-1][1] == 55.2 and all(b - a <= 30 for a, b in pieces)
    assert all(not (24.0 < b < 30.0) for a, b in pieces)  # the 24–30 s run is never cut
    speech = np.zeros(wave.shape[0], bool)
    for a, b in spans:
        speech[int(a * rate) : int(b * rate)] = True
    covered = np.zeros_like(speech)
    for a, b in split_at_pauses(wave):
        assert not covered[a:b].any()  # no overlap
        covered[a:b] = True
    assert covered[speech].all()  # every speech sample is in a piece
    long_word = torch.from_numpy(bursts([(0.0, 70.0)], 70.0))
    long_word[22 * rate : 22 * rate + 800] *= 0.01  # a 50 ms dip inside a 70 s run, where the first cut may go: it goes there
    cuts = [b for a, b in split_at_pauses(long_word)][:-1]
    assert abs(cuts[0] / rate - 22.025) < 0.03, cuts


def test_a_long_clip_is_encoded_a_few_windows_at_a_time(graft, waves):
    """The encoder takes WINDOWS_AT_ONCE windows a call (its activations do not grow with the clip); the rows equal
    one window at a time, and a clip of at most that many windows is one call, as before."""
    from qva.model import WINDOWS_AT_ONCE

    feats, valid = log_mel(waves["20 min"], graft.config.audio.num_mel_bins)
    feats, valid = feats[:9], valid[:9]
    calls = []
    real = graft.audio_encoder.forward
    graft.audio_encoder.forward = lambda x: calls.append(x.shape[0]) or real(x)
    try:
        with torch.no_grad():
            rows = graft.audio_encoder_rows(feats, valid)
            one_by_one = torch.cat([graft.audio_encoder_rows(feats[w : w + 1], valid[w : w + 1]) for w in range(9)])
    finally:
        del graft.audio_encoder.forward
    assert calls[:3] == [WINDOWS_AT_ONCE, WINDOWS_AT_ONCE, 1] and calls[3:] == [1] * 9
    assert rows.shape == one_by_one.shape and (rows - one_by_one).abs().max() <= 1e-5 * one_by_one.abs().max()
