"""Training data (`qva/train/data.py`, `augment.py`, `evaluate.py`): labels only on answers, manifests,
bad samples skipped and named, batches, the Whisper-row cache, augmentation, scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qva
from qva.processor import Processor
from qva.train.augment import AugmentConfig, add_noise, spec_augment, speed_perturb
from qva.train.data import DataError, collate, describe_skipped, encode, encode_all, fill_audio_rows, read_manifest
from qva.train.evaluate import normalize, score, word_errors


@pytest.fixture(scope="module")
def graft(train_dirs):
    _, qwen, _, whisper, _ = train_dirs
    return qva.load(qwen, whisper=whisper, audio_pool=2)


def test_labels_cover_assistant_content_and_im_end_only(demo_dirs):
    """Byte-level demo tokenizer: one token per character, so every label can be checked by eye."""
    proc = Processor.from_pretrained(demo_dirs[0])
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": np.zeros((56, 56, 3), np.uint8)}, {"type": "text", "text": "How many?"}]},
                {"role": "assistant", "content": "Two."},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]}]
    enc = proc.encode_conversation(messages)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    assert proc.decode(ids.tolist(), skip_special_tokens=False) == proc.apply_chat_template(messages).replace(
        "<|image_pad|>", "<|image_pad|>" * 4)
    runs, current = [], []
    for t, lab in zip(ids.tolist(), labels.tolist()):
        if lab != -100:
            assert lab == t
            current.append(t)
        elif current:
            runs.append(proc.decode(current, skip_special_tokens=False))
            current = []
    assert runs == ["Two.<|im_end|>", "Yes<|im_end|>"]  # system, users, image placeholders, template: −100
    assert int((ids == 151655).sum()) == 4 and enc["pixel_values"].shape == (16, 1176)


def test_processor_takes_audio_keyword(graft):
    proc = graft.processor
    wave = torch.randn(8000) * 0.1
    text = "<|audio_start|><|audio_pad|><|audio_end|>hi"
    a, b = proc(text=text, audio=[(wave, 16000)]), proc(text=text, audios=[(wave, 16000)])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["input_features"], b["input_features"])
    with pytest.raises(ValueError, match="not both"):
        proc(text=text, audio=[wave], audios=[wave])


def test_manifest_forms_paths_and_bad_lines(tmp_path, train_dirs):
    clips = train_dirs[4].parent / "clips"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.wav").write_bytes((clips / "0.wav").read_bytes())
    lines = [
        json.dumps({"audio": "sub/a.wav", "text": "12", "voice": "x"}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "sub/a.wav"}, {"type": "text", "text": "?"}]},
                                 {"role": "assistant", "content": "12"}]}),
        "{not json",
        json.dumps({"text": "no audio"}),
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        "",
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    examples, bad = read_manifest(tmp_path / "m.jsonl", prompt="Say it.")
    assert [e.where.rsplit(":", 1)[1] for e in examples] == ["1", "2"]
    assert examples[0].audio_sources == [str(tmp_path / "sub" / "a.wav")] == examples[1].audio_sources
    assert examples[0].messages[0]["content"][1]["text"] == "Say it." and examples[0].answer == "12" and examples[0].meta["voice"] == "x"
    assert [w.rsplit(":", 1)[1] for w, _ in bad] == ["3", "4", "5"]
    assert "needs 'messages', or 'audio' and 'text'" in bad[1][1] and "last message must be the assistant" in bad[2][1]
    examples, bad = read_manifest(tmp_path / "m.jsonl", prompt=None)
    assert len(examples) == 1 and "needs a prompt (--prompt)" in bad[0][1]


def test_bad_samples_are_skipped_counted_and_named_or_strict(tmp_path, graft, train_dirs):
    clips = train_dirs[4].parent / "clips"
    (tmp_path / "corrupt.wav").write_text("not audio")
    rows = [{"audio": str(clips / "1.wav"), "text": "5"}, {"audio": str(tmp_path / "missing.wav"), "text": "5"},
            {"audio": str(tmp_path / "corrupt.wav"), "text": "5"}, {"audio": str(clips / "2.wav"), "text": "9" * 500},
            {"messages": [{"role": "user", "content": "<|audio_pad|> stray placeholder"}, {"role": "assistant", "content": "x"}]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    examples, bad = read_manifest(tmp_path / "m.jsonl", "Say it.")
    samples, bad = encode_all(examples, graft.processor, max_seq_len=300, bad=bad)
    assert len(samples) == 1 and len(bad) == 4
    reasons = dict((w.rsplit(":", 1)[1], why) for w, why in bad)
    assert "no such audio file" in reasons["2"] and "cannot read as audio" in reasons["3"]
    assert "over max_seq_len 300" in reasons["4"] and "1 audio placeholder(s)" in reasons["5"]
    text = describe_skipped(bad)
    assert text.startswith("skipped 4 sample(s)") and "m.jsonl:2: " in text and "… and 1 more" in text
    with pytest.raises(DataError, match=r"m.jsonl:2: .*no such audio file"):
        encode_all(examples, graft.processor, 300, strict=True)


def test_collate_left_pads_and_keeps_media_in_order(graft, train_dirs):
    examples, _ = read_manifest(train_dirs[4], "Say it.")
    samples = [encode(e, graft.processor, 4096) for e in examples[:3]]
    batch = collate(samples, graft.processor.pad_token_id)
    lengths = [s.input_ids.shape[0] for s in samples]
    assert batch["input_ids"].shape == (3, max(lengths))
    for i, s in enumerate(samples):
        pad = max(lengths) - lengths[i]
        assert batch["attention_mask"][i].tolist() == [0] * pad + [1] * lengths[i]
        assert (batch["labels"][i, :pad] == -100).all() and torch.equal(batch["labels"][i, pad:], s.labels)
    assert torch.equal(batch["input_features"], torch.cat([s.media["input_features"] for s in samples]))
    prompts = collate(samples, graft.processor.pad_token_id, prompt_only=True)
    assert "labels" not in prompts and prompts["input_ids"].shape[1] == max(s.prompt_len for s in samples)
    assert graft.processor.decode(prompts["input_ids"][0][-12:].tolist(), skip_special_tokens=False).endswith("assistant\n")


def test_whisper_rows_cached_on_disk_and_equal_to_the_live_path(graft, train_dirs, tmp_path):
    examples, _ = read_manifest(train_dirs[4], "Say it.")
    live = [encode(e, graft.processor, 4096) for e in examples[:3]]
    first = [encode(e, graft.processor, 4096) for e in examples[:3]]
    assert fill_audio_rows(graft, first, tmp_path) == 3
    again = [encode(e, graft.processor, 4096) for e in examples[:3]]
    assert fill_audio_rows(graft, again, tmp_path) == 0  # all read from the cache
    assert all(torch.equal(a.audio_rows, b.audio_rows) and "input_features" not in a.media for a, b in zip(first, again))
    with torch.no_grad():
        batch_live, batch_cached = collate(live, 151643), collate(again, 151643)
        want = graft(**{k: v for k, v in batch_live.items() if k != "labels"}).logits
        got = graft(**{k: v for k, v in batch_cached.items() if k != "labels"}).logits
    assert "audio_rows" in batch_cached and "input_features" not in batch_cached
    assert (got - want).abs().max() <= 1e-5


def test_augmentation():
    g = torch.Generator().manual_seed(0)
    t = torch.arange(16000) / 16000
    wave = torch.sin(2 * torch.pi * 440 * t)
    fast, slow = speed_perturb(wave, 1.1), speed_perturb(wave, 0.9)
    assert abs(fast.shape[0] - 16000 / 1.1) <= 1 and abs(slow.shape[0] - 16000 / 0.9) <= 1
    spectrum = torch.fft.rfft(fast[2000:12000]).abs()
    assert abs(int(spectrum.argmax()) * 16000 / 10000 - 484) <= 2  # 440 Hz played 1.1× fast: 484 Hz
    noisy = add_noise(wave, 20.0, g)
    snr = 10 * torch.log10(wave.square().mean() / (noisy - wave).square().mean())
    assert abs(float(snr) - 20.0) < 0.5
    feats = torch.randn(2, 80, 3000)
    cfg = AugmentConfig(time_masks=2, time_mask_width=30, freq_masks=1, freq_mask_width=10)
    masked = spec_augment(feats, torch.tensor([500, 3000]), cfg, g)
    assert torch.equal(masked[0, :, 500:], feats[0, :, 500:])  # never beyond the valid frames
    changed = (masked != feats).any(1)  # [W, T]
    assert 0 < int(changed[0].sum()) <= 500 and not torch.equal(masked, feats)
    assert not AugmentConfig().on and cfg.on and not cfg.on_waveform


def test_scoring():
    assert normalize("  3 0 7  1. ") == "3 0 7 1" and normalize("3071!") == "3071"
    assert word_errors("the cat sat", "the cat sat on") == (1, 4) and word_errors("a x c", "a b c") == (1, 3)
    s = score(["3071.", "12", "9 9"], ["3071", "13", "9 9 9"])
    assert s["n"] == 3 and s["exact_match"] == pytest.approx(100 / 3) and s["wer"] == pytest.approx(100 * 2 / 5)
