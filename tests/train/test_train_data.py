"""Training data (`qva/train/data.py`, `augment.py`, `evaluate.py`): labels only on answers, manifests,
bad samples skipped and named, batches, the Whisper-row cache, augmentation, scoring."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch

from qva.processor import Processor
from qva.train.augment import AugmentConfig, add_noise, row_masked, spec_augment, speed_perturb
from qva.train.data import (
    DataError,
    check_max_seq_len,
    clip_key,
    collate,
    describe_skipped,
    encode,
    encode_all,
    encoder_fingerprint,
    fill_audio_rows,
    read_manifest,
)
from qva.train.evaluate import normalize, score, word_errors


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


def _ask(content, answer="x"):
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


# (line, what the skip must say): every field a line uses, both forms; nothing is coerced to a string
BAD_FIELDS = [
    ({"audio": "a.wav", "text": None}, "field 'text': expected a string, got null"),
    ({"audio": "a.wav", "text": ["1", "2"]}, "field 'text': expected a string, got a list of 2"),
    ({"audio": "a.wav", "text": 81003}, "field 'text': expected a string, got a number (81003)"),
    ({"audio": "a.wav", "text": True}, "field 'text': expected a string, got a boolean (true)"),
    ({"audio": ["a.wav"], "text": "1"}, "field 'audio': expected a file path (a non-empty string), got a list of 1"),
    ({"audio": "", "text": "1"}, "field 'audio': expected a file path (a non-empty string), got the string ''"),
    ({"audio": "a\u0000.wav", "text": "1"}, "field 'audio': expected a file path, got a string holding a NUL character"),
    ({"messages": "hi"}, "field messages: expected a non-empty list of {'role', 'content'} objects, got the string 'hi'"),
    ({"messages": [[], {"role": "assistant", "content": "x"}]}, "field messages[0]: expected an object with 'role' and 'content', got a list of 0"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "field messages[0].content: missing (the message has keys ['role'])"),
    ({"messages": [{"role": None, "content": "q"}, {"role": "assistant", "content": "x"}]},
     "field messages[0].role: expected one of 'system', 'user', 'assistant', got null"),
    ({"messages": [{"role": "asistant", "content": "q"}, {"role": "assistant", "content": "x"}]},
     "field messages[0].role: expected one of 'system', 'user', 'assistant', got the string 'asistant'"),
    (_ask(5), "field messages[0].content: expected a string or a list of items, got a number (5)"),
    (_ask(["hi"]), "field messages[0].content[0]: expected an object like {'type': 'text', 'text': ...}, got the string 'hi'"),
    (_ask([{"type": "text", "text": None}]), "field messages[0].content[0].text: expected a string, got null"),
    (_ask([{"type": "text", "text": {"a": 1}}]), "field messages[0].content[0].text: expected a string, got an object with keys ['a']"),
    (_ask([{"type": "audio", "audio": None}]), "field messages[0].content[0].audio: expected a file path (a non-empty string), got null"),
    (_ask([{"type": "image", "image": 3}]), "field messages[0].content[0].image: expected a file path (a non-empty string), got a number (3)"),
    (_ask([{"type": "video", "video": ["f0.png", 7]}]),
     "field messages[0].content[0].video[1]: expected a file path (a non-empty string), got a number (7)"),
    (_ask([{"type": "sound", "audio": "a.wav"}]),
     "field messages[0].content[0].type: expected one of 'text', 'image', 'image_url', 'video', 'audio', got the string 'sound'"),
    (_ask([{"type": "text", "text": "hi", "image": "a.png"}]),
     "field messages[0].content[0]: expected exactly one of 'text', 'image', 'video', 'audio', got ['text', 'image']"),
    (_ask([{"type": "text", "image": "a.png"}]), "field messages[0].content[0].type: 'text' but the item holds 'image'"),
    (_ask([{"type": "text"}]), "field messages[0].content[0]: expected exactly one of 'text', 'image', 'video', 'audio', got none (keys ['type'])"),
    (_ask("q", None), "field messages[1].content: expected a string or a list of items, got null"),
    (_ask("q", [{"type": "text", "text": 7}]), "field messages[1].content[0].text: expected a string, got a number (7)"),
    ('{"audio": "a.wav", "text": "\\ud800x"}', "field 'text': expected valid Unicode text, got a lone surrogate ('\\ud800') at character 0"),
    ('{"audio": "a.wav", "text": "1", "text": "2"}', "key 'text' is given twice in one object (expected each key once)"),
    ("[1]", "expected a JSON object, got a list of 1"),
    (b'{"audio": "a.wav", "text": "\xff1"}', "not valid UTF-8: byte 29 of the line is b'\\xff' (invalid start byte)"),
]


def test_manifest_fields_are_checked_never_coerced(tmp_path, graft):
    """Issue 18: `"text": null` trained on "None", a list on its repr, invalid UTF-8 on U+FFFD. Each bad field is
    now a skipped line naming file:line, the field, expected vs got; `strict` makes the first one an error."""
    good = [{"audio": "a.wav", "text": "081003"}, _ask([{"type": "video", "video": ["f/0.png", "/abs/1.png"]}, {"type": "text", "text": "?"}])]
    raw = [line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode() for line, _ in BAD_FIELDS]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join(raw + [json.dumps(g).encode() for g in good]))
    examples, bad = read_manifest(manifest, prompt="Say it.")
    assert bad == [(f"{manifest}:{n}", why) for n, (_, why) in enumerate(BAD_FIELDS, start=1)]
    assert [e.where for e in examples] == [f"{manifest}:{len(BAD_FIELDS) + 1}", f"{manifest}:{len(BAD_FIELDS) + 2}"]
    assert examples[0].answer == "081003" and examples[0].audio_sources == [str(tmp_path / "a.wav")]
    assert examples[1].messages[0]["content"][0]["video"] == [str(tmp_path / "f" / "0.png"), "/abs/1.png"]
    with pytest.raises(DataError) as e:
        encode_all(examples, graft.processor, 4096, strict=True, bad=bad)
    assert str(e.value) == f"{manifest}:1: field 'text': expected a string, got null"


def test_short_line_with_null_audio_is_skipped_at_read_time(tmp_path, graft, train_dirs):
    """Issue 18: `"audio": null` passed the reader and ended in a TypeError traceback when encoded."""
    clips = train_dirs[4].parent / "clips"
    rows = [{"audio": str(clips / "0.wav"), "text": "5"}, {"audio": None, "text": "5"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    examples, bad = read_manifest(tmp_path / "m.jsonl", "Say it.")
    samples, bad = encode_all(examples, graft.processor, 4096, bad=bad)
    assert [s.example.where for s in samples] == [f"{tmp_path / 'm.jsonl'}:1"]
    assert bad == [(f"{tmp_path / 'm.jsonl'}:2", "field 'audio': expected a file path (a non-empty string), got null")]
    with pytest.raises(DataError, match=r"m\.jsonl:2: field 'audio': expected a file path"):
        encode_all(examples, graft.processor, 4096, strict=True, bad=bad)


def test_manifest_bom_crlf_and_unicode_line_separators(tmp_path):
    """A leading UTF-8 BOM is accepted (it made line 1 unreadable); lines end at "\n" only, so a U+2028 inside a
    string stays text; a UTF-16 file is refused by name."""
    lines = [json.dumps({"audio": "a.wav", "text": "1"}), json.dumps({"audio": "b.wav", "text": "x\u2028y\u0085z"}, ensure_ascii=False)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\xef\xbb\xbf" + lines[0].encode() + b"\r\n" + lines[1].encode("utf-8") + b"\r\n")
    examples, bad = read_manifest(manifest, "Say it.")
    assert bad == [] and [e.where for e in examples] == [f"{manifest}:1", f"{manifest}:2"]
    assert [e.answer for e in examples] == ["1", "x\u2028y\u0085z"]
    (tmp_path / "u16.jsonl").write_bytes(lines[0].encode("utf-16"))
    with pytest.raises(DataError, match=r"u16\.jsonl: starts with a UTF-16 byte-order mark; a manifest must be UTF-8"):
        read_manifest(tmp_path / "u16.jsonl", "Say it.")


def test_long_samples_are_skipped_with_length_and_limit_never_truncated(graft, train_dirs):
    examples, _ = read_manifest(train_dirs[4], "Say it.")
    n = [encode(e, graft.processor, 4096).input_ids.shape[0] for e in examples[:2]]
    assert n[1] > n[0]
    samples, bad = encode_all(examples[:2], graft.processor, max_seq_len=n[0])
    assert [s.example.where for s in samples] == [examples[0].where] and samples[0].input_ids.shape[0] == n[0]
    assert bad == [(examples[1].where, f"{n[1]} tokens, over max_seq_len {n[0]}")]


def test_max_seq_len_over_the_model_context(graft, train_dirs):
    """Issue 18: `--max-seq-len` above the context let a long sample through, to fail mid-epoch in the model."""
    context = graft.config.text.max_position_embeddings
    check_max_seq_len(context, context)
    with pytest.raises(DataError) as e:
        check_max_seq_len(context + 1, context)
    assert str(e.value) == (f"max_seq_len {context + 1} is over the model's context of {context} tokens (max_position_embeddings): "
                            f"use --max-seq-len {context} or less")
    with pytest.raises(DataError, match=r"max_seq_len: expected a positive integer, got a number \(0\)"):
        check_max_seq_len(0, context)
    examples, _ = read_manifest(train_dirs[4], "Say it.")
    n = [encode(e, graft.processor, 4096).input_ids.shape[0] for e in examples[:2]]
    samples, bad = encode_all(examples[:2], graft.processor, 4096, context=n[0])  # as if the model's context were n[0]
    assert [s.example.where for s in samples] == [examples[0].where]
    assert bad == [(examples[1].where, f"{n[1]} tokens, over the model's context of {n[0]} (max_position_embeddings)")]


@pytest.mark.parametrize("damage, says", [("garbage", "cannot be read (SafetensorError: "), ("truncated", "cannot be read (SafetensorError: "),
                                          ("nan", "1 entry unusable (1 non-finite value(s))"), ("shape", "1 entry unusable (shape ["),
                                          ("dtype", "1 entry unusable (dtype torch.float16, expected torch.float32)")])
def test_corrupt_whisper_row_cache_is_reported_and_recomputed(graft, train_dirs, tmp_path, damage, says):
    """Issue 18: a corrupt cache file broke every later run until deleted by hand."""
    from safetensors.torch import load_file, save_file

    examples, _ = read_manifest(train_dirs[4], "Say it.")
    fresh = [encode(e, graft.processor, 4096) for e in examples[:2]]
    assert fill_audio_rows(graft, fresh, tmp_path, log=pytest.fail) == 2
    file = tmp_path / f"whisper-rows-{encoder_fingerprint(graft)}.safetensors"
    if damage in ("garbage", "truncated"):
        file.write_bytes(b"not a safetensors file" if damage == "garbage" else file.read_bytes()[:-64])
    else:
        cache = load_file(file)
        k = clip_key(fresh[0])
        cache[k] = {"nan": lambda t: t.flatten().index_fill(0, torch.tensor([0]), float("nan")).view_as(t), "shape": lambda t: t[:-1].clone(),
                    "dtype": lambda t: t.half()}[damage](cache[k])
        save_file(cache, file)
    logs = []
    again = [encode(e, graft.processor, 4096) for e in examples[:2]]
    assert fill_audio_rows(graft, again, tmp_path, log=logs.append) == (2 if damage in ("garbage", "truncated") else 1)
    assert len(logs) == 1 and logs[0].startswith(f"whisper-row cache {file}: ") and says in logs[0]
    for a, b in zip(fresh, again):
        assert b.audio_rows.dtype == torch.float32 and (a.audio_rows - b.audio_rows).abs().max() <= 1e-5
    third = [encode(e, graft.processor, 4096) for e in examples[:2]]
    assert fill_audio_rows(graft, third, tmp_path, log=pytest.fail) == 0  # rewritten: read back whole, silently
    assert sorted(p.name for p in tmp_path.iterdir()) == [file.name]


@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])
def test_cache_write_failure_warns_once_and_goes_on(graft, train_dirs, tmp_path, monkeypatch, capsys, error):
    """A full disk while writing the cache must not stop training: one warning, the rows are used uncached, the
    old cache and the user's files are untouched, and only qva's own temp file is removed."""
    from safetensors import SafetensorError

    examples, _ = read_manifest(train_dirs[4], "Say it.")
    (tmp_path / "notes.txt").write_text("the user's")
    assert fill_audio_rows(graft, [encode(examples[0], graft.processor, 4096)], tmp_path, log=pytest.fail) == 1
    file = tmp_path / f"whisper-rows-{encoder_fingerprint(graft)}.safetensors"
    before = file.read_bytes()

    def full_disk(tensors, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device") if error == "OSError" else SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("qva.train.data.save_file", full_disk)
    logs = []
    samples = [encode(e, graft.processor, 4096) for e in examples[:3]]
    assert fill_audio_rows(graft, samples, tmp_path, log=logs.append) == 2
    assert all(s.audio_rows is not None and "input_features" not in s.media for s in samples)
    assert len(logs) == 1 and logs[0].startswith(f"whisper-row cache {file}: not written ({error}: ") and "No space left on device" in logs[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", file.name]) and file.read_bytes() == before
    assert (tmp_path / "notes.txt").read_text() == "the user's"
    capsys.readouterr()
    fill_audio_rows(graft, [encode(e, graft.processor, 4096) for e in examples[:3]], tmp_path)  # default log: one line on stderr
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"whisper-row cache {file}: not written")


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


def test_row_masks_set_short_spans_of_the_cached_rows_to_their_mean():
    rows = torch.randn(30, 8)
    before = rows.clone()
    cfg = AugmentConfig(row_masks=3, row_mask_width=2)
    assert cfg.on and not cfg.reencodes  # the cache stays in use
    spans = 0
    for seed in range(50):
        masked = row_masked(rows, cfg, torch.Generator().manual_seed(seed))
        hit = (masked != rows).any(1)  # [n]
        assert int(hit.sum()) <= 6 and torch.allclose(masked[hit], rows.mean(0).expand(int(hit.sum()), 8))
        spans += int(hit.sum())
    assert spans > 50  # widths 0..2 drawn: about 3 rows a draw
    again = row_masked(rows, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(again, row_masked(rows, cfg, torch.Generator().manual_seed(7))) and torch.equal(rows, before)  # not in place
    assert row_masked(rows[:1], AugmentConfig(row_masks=2, row_mask_width=5), torch.Generator()).shape == (1, 8)
    with pytest.raises(ValueError, match="row-mask-width"):
        AugmentConfig(row_masks=1, row_mask_width=0)


def test_scoring():
    assert normalize("  3 0 7  1. ") == "3 0 7 1" and normalize("3071!") == "3071"
    assert word_errors("the cat sat", "the cat sat on") == (1, 4) and word_errors("a x c", "a b c") == (1, 3)
    s = score(["3071.", "12", "9 9"], ["3071", "13", "9 9 9"])
    assert s["n"] == 3 and s["exact_match"] == pytest.approx(100 / 3) and s["wer"] == pytest.approx(100 * 2 / 5)
