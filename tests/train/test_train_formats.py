"""Training data in the formats users hold (`qva/train/formats.py`): ms-swift, LLaMA-Factory sharegpt / alpaca,
parquet shards and a save_to_disk folder each yield exactly the samples of the equivalent qva JSONL; tag/media
mismatches and bad rows are named; English-normalised WER / CER (`normalize.py`); length bucketing."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, need_shared, train_config

from qva.train.data import DataError, encode_all, epoch_order, padding_fraction, read_manifest
from qva.train.evaluate import score
from qva.train.formats import detect_format, read_data
from qva.train.normalize import english

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

PROMPT = "Say it."


@pytest.fixture
def media(tmp_path, train_dirs):
    """tmp_path with clips/0..2.wav (from the train_dirs clips) and pic.png."""
    from PIL import Image

    (tmp_path / "clips").mkdir()
    for i in range(3):
        shutil.copy(train_dirs[4].parent / "clips" / f"{i}.wav", tmp_path / "clips" / f"{i}.wav")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(tmp_path / "pic.png")
    return tmp_path


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _user(*items):
    return {"role": "user", "content": [{"type": k, k: v} for k, v in items]}


# the same four conversations: qva's message form (the reference), and each other format by hand
QVA = [
    {"messages": [_user(("audio", "clips/0.wav"), ("text", "What is said?")), {"role": "assistant", "content": "42"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, _user(("text", "Listen: "), ("audio", "clips/1.wav")),
                  {"role": "assistant", "content": "7"}, {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "7 again"}]},
    {"messages": [_user(("image", "pic.png"), ("text", "Look, then listen:\n"), ("audio", "clips/2.wav")),
                  {"role": "assistant", "content": "315"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
]
SWIFT = [
    {"messages": [{"role": "user", "content": "<audio>What is said?"}, {"role": "assistant", "content": "42"}], "audios": ["clips/0.wav"]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Listen: <audio>"},
                  {"role": "assistant", "content": "7"}, {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "7 again"}],
     "audios": ["clips/1.wav"]},
    {"messages": [{"role": "user", "content": "<image>Look, then listen:\n<audio>"}, {"role": "assistant", "content": "315"}],
     "audios": ["clips/2.wav"], "images": ["pic.png"]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "<audio>What is said?"}, {"from": "gpt", "value": "42"}], "audios": ["clips/0.wav"]},
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "Listen: <audio>"}, {"from": "gpt", "value": "7"},
                                               {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "7 again"}],
     "audios": ["clips/1.wav"]},
    {"conversations": [{"from": "human", "value": "<image>Look, then listen:\n<audio>"}, {"from": "gpt", "value": "315"}],
     "audios": ["clips/2.wav"], "images": ["pic.png"]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
]
ALPACA = [
    {"instruction": "<audio>What is said?", "input": "", "output": "42", "audios": ["clips/0.wav"]},
    {"system": "Be brief.", "history": [["Listen: <audio>", "7"]], "instruction": "Again?", "output": "7 again", "audios": ["clips/1.wav"]},
    {"instruction": "<image>Look, then listen:", "input": "<audio>", "output": "315", "audios": ["clips/2.wav"], "images": ["pic.png"]},
    {"instruction": "Hi", "output": "Hello"},
]


def assert_same_samples(got, want):
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) and a.prompt_len == b.prompt_len
        assert sorted(a.media) == sorted(b.media)
        for k in a.media:
            assert torch.equal(a.media[k], b.media[k]), k
        assert a.example.answer == b.example.answer


@pytest.mark.parametrize("fmt, rows, as_json", [("swift", SWIFT, False), ("swift", SWIFT, True), ("sharegpt", SHAREGPT, True),
                                                ("sharegpt", SHAREGPT, False), ("alpaca", ALPACA, True), ("alpaca", ALPACA, False)])
def test_json_formats_yield_the_samples_of_the_equivalent_qva_jsonl(media, graft, fmt, rows, as_json):
    want, bad = encode_all(*read_manifest(_write_jsonl(media / "qva.jsonl", QVA), PROMPT)[:1], graft.processor, 4096)
    assert bad == []
    file = media / f"data.{'json' if as_json else 'jsonl'}"
    if as_json:
        file.write_text(json.dumps(rows, indent=2))
    else:
        _write_jsonl(file, rows)
    assert detect_format(file) == fmt
    for forced in ("auto", fmt):
        examples, bad = read_data(file, PROMPT, forced)
        assert bad == []
        got, bad = encode_all(examples, graft.processor, 4096)
        assert bad == []
        assert_same_samples(got, want)
        assert [e.messages for e in examples] == [e.messages for e in read_manifest(media / "qva.jsonl", PROMPT)[0]]
    qva = media / "qva.json"  # the qva form as one JSON list
    qva.write_text(json.dumps(QVA, indent=1))
    assert detect_format(qva) == "qva"
    assert_same_samples(encode_all(read_data(qva, PROMPT)[0], graft.processor, 4096)[0], want)
    if as_json:  # rows of a JSON list are named by the line their object starts on
        lines = file.read_text().splitlines()
        assert all(lines[int(e.where.rsplit(":", 1)[1]) - 1].strip() == "{" for e in examples)


def test_tag_media_mismatch_and_bad_rows_are_named_with_the_line(media, graft):
    rows = [SWIFT[0],
            {"messages": [{"role": "user", "content": "<audio><audio>?"}, {"role": "assistant", "content": "x"}], "audios": ["clips/0.wav"]},
            {"messages": [{"role": "user", "content": "no tag"}, {"role": "assistant", "content": "x"}], "audios": ["clips/0.wav"]},
            {"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}], "images": [3]},
            {"messages": [{"role": "user", "content": "<audio>?"}, {"role": "assistant", "content": "x"}], "audios": ["clips/none.wav"]}]
    file = _write_jsonl(media / "s.jsonl", rows)
    examples, bad = read_data(file, PROMPT)
    assert bad == [(f"{file}:2", "2 <audio> tag(s) in the text but 1 audio(s) in 'audios' (expected one tag per medium)"),
                   (f"{file}:3", "0 <audio> tag(s) in the text but 1 audio(s) in 'audios' (expected one tag per medium)"),
                   (f"{file}:4", "field images[0]: expected a file path (a non-empty string), got a number (3)")]
    samples, bad = encode_all(examples, graft.processor, 4096, bad=bad)
    assert len(samples) == 1 and bad[-1][0] == f"{file}:5" and "no such audio file" in bad[-1][1]
    with pytest.raises(DataError, match=r"s\.jsonl:2: 2 <audio> tag\(s\)"):
        encode_all(examples, graft.processor, 4096, strict=True, bad=read_data(file, PROMPT)[1])
    share = media / "g.json"
    share.write_text(json.dumps([SHAREGPT[0], {"conversations": [{"from": "robot", "value": "x"}]},
                                 {"conversations": [{"from": "human", "value": "<audio>"}, {"from": "gpt", "value": "1"}]}], indent=1))
    _, bad = read_data(share, PROMPT)
    starts = [n for n, line in enumerate(share.read_text().splitlines(), start=1) if line == " {"]  # each row's first line
    assert len(starts) == 3 and [w for w, _ in bad] == [f"{share}:{starts[1]}", f"{share}:{starts[2]}"]
    assert "conversations[0].from: expected one of" in bad[0][1] and bad[1][1].startswith("1 <audio> tag(s) in the text but 0 audio(s)")
    _, bad = read_data(_write_jsonl(media / "a.jsonl", [{"instruction": "<audio>"}]), PROMPT, "alpaca")
    assert bad == [(f"{media / 'a.jsonl'}:1", "field 'output': missing (an alpaca row has keys ['instruction'])")]
    _, bad = read_data(file, PROMPT, "alpaca")  # forced: a swift file read as alpaca names the missing field per row
    assert len(bad) == 5 and all("field 'instruction': missing" in why for _, why in bad)


# -- parquet and Arrow ---------------------------------------------------------------------------------------------
def _asr_rows(root: Path, as_bytes: bool, audio="audio", text="text"):
    answers = ["42", "7", "315"]
    return [{audio: {"bytes": (root / "clips" / f"{i}.wav").read_bytes(), "path": f"{i}.wav"} if as_bytes else f"clips/{i}.wav",
             text: answers[i], "voice": f"v{i}"} for i in range(3)]


def _qva_asr(root: Path) -> Path:
    return _write_jsonl(root / "asr.jsonl", [{"audio": f"clips/{i}.wav", "text": t, "voice": f"v{i}"} for i, t in enumerate(["42", "7", "315"])])


def test_parquet_shards_with_audio_bytes_or_paths_yield_the_qva_samples(media, graft, monkeypatch):
    want, _ = encode_all(read_manifest(_qva_asr(media), PROMPT)[0], graft.processor, 4096)
    rows = _asr_rows(media, as_bytes=True)
    shards = media / "ds" / "data"
    shards.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:2]), shards / "train-00000-of-00002.parquet", row_group_size=1)
    pq.write_table(pa.Table.from_pylist(rows[2:]), shards / "train-00001-of-00002.parquet")
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read the whole table"))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole file"))
    for source in (media / "ds", str(shards / "*.parquet"), shards):
        assert detect_format(source) == "parquet"
        examples, bad = read_data(source, PROMPT)
        assert bad == [] and [e.meta for e in examples] == [{"text": t, "voice": f"v{i}"} for i, t in enumerate(["42", "7", "315"])]
        got, bad = encode_all(examples, graft.processor, 4096)
        assert bad == []
        assert_same_samples(got, want)
    assert examples[0].where == f"{shards / 'train-00000-of-00002.parquet'}:1" and examples[2].where.endswith("00002.parquet:1")
    pq.write_table(pa.Table.from_pylist(_asr_rows(media, False, "speech", "sentence")), media / "paths.parquet")
    examples, bad = read_data(media / "paths.parquet", PROMPT, "parquet", audio_column="speech", text_column="sentence")
    got, bad = encode_all(examples, graft.processor, 4096, bad=bad)
    assert bad == []
    assert_same_samples(got, want)
    _, bad = read_data(media / "paths.parquet", PROMPT)
    assert len(bad) == 3 and "needs the columns 'audio' and 'text' (--audio-column, --text-column)" in bad[0][1]


def test_swift_rows_in_parquet(media, graft):
    want, _ = encode_all(read_manifest(_write_jsonl(media / "qva.jsonl", QVA), PROMPT)[0], graft.processor, 4096)
    pq.write_table(pa.Table.from_pylist([{"messages": r["messages"], "audios": r.get("audios", []), "images": r.get("images", [])} for r in SWIFT]),
                   media / "swift.parquet")
    examples, bad = read_data(media / "swift.parquet", PROMPT)
    got, bad = encode_all(examples, graft.processor, 4096, bad=bad)
    assert bad == []
    assert_same_samples(got, want)


def test_save_to_disk_folder_written_with_pyarrow_yields_the_qva_samples(media, graft):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files, dataset_info.json, state.json."""
    want, _ = encode_all(read_manifest(_qva_asr(media), PROMPT)[0], graft.processor, 4096)
    rows = _asr_rows(media, as_bytes=True)
    ds = media / "saved"
    ds.mkdir()
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    for name, part in zip(names, (rows[:2], rows[2:])):
        table = pa.Table.from_pylist(part)
        with pa.ipc.new_stream(str(ds / name), table.schema) as w:
            for batch in table.to_batches(max_chunksize=1):
                w.write_batch(batch)
    (ds / "dataset_info.json").write_text(json.dumps({"features": {"audio": {"_type": "Audio", "sampling_rate": 16000},
                                                                   "text": {"dtype": "string", "_type": "Value"}}}))
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_format_type": None,
                                               "_split": "train"}))
    assert detect_format(ds) == "arrow"
    examples, bad = read_data(ds, PROMPT)
    got, bad = encode_all(examples, graft.processor, 4096, bad=bad)
    assert bad == []
    assert_same_samples(got, want)
    assert [e.where for e in examples] == [f"{ds / names[0]}:1", f"{ds / names[0]}:2", f"{ds / names[1]}:1"]


def test_bad_parquet_rows_are_skipped_and_named(media, graft):
    good = _asr_rows(media, as_bytes=True)[0]
    rows = [good, {**good, "text": None}, {**good, "audio": {"bytes": None, "path": None}}, {**good, "audio": {"bytes": b"not audio", "path": "x"}}]
    file = media / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), file)
    examples, bad = read_data(file, PROMPT)
    assert bad == [(f"{file}:2", "field 'text': expected a string, got null"),
                   (f"{file}:3", "field 'audio': expected a file path (a non-empty string), got null")]
    samples, bad = encode_all(examples, graft.processor, 4096, bad=bad)
    assert len(samples) == 1 and bad[-1][0] == f"{file}:4"
    with pytest.raises(DataError, match=r"bad\.parquet:2: field 'text'"):
        encode_all(examples, graft.processor, 4096, strict=True, bad=read_data(file, PROMPT)[1])


def test_training_from_parquet_bytes_equals_training_from_jsonl(train_dirs, tmp_path):
    """Same seed, same data: the parquet-with-bytes run's losses equal the JSONL run's, bit for bit."""
    manifest = train_dirs[4]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    table = [{"audio": {"bytes": (manifest.parent / r["audio"]).read_bytes(), "path": r["audio"]}, "text": r["text"], "voice": r["voice"]}
             for r in rows]
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "train.parquet", row_group_size=3)
    from qva.train.loop import train

    def losses(run):
        return [json.loads(line)["loss"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]

    a = train_config(train_dirs, tmp_path, "1", out=str(tmp_path / "jsonl"), bucket_by_length=True)
    b = replace(a, train_data=str(tmp_path / "train.parquet"), out=str(tmp_path / "parquet"))
    train(a, quiet=True)
    train(b, quiet=True)
    assert losses(a.out) == losses(b.out) and len(losses(a.out)) == 3


def test_eval_json_scores_each_set(train_dirs, tmp_path, capsys):
    """`qva-train eval RUN --data A --data B --json`: one score object per set (the same data as JSONL and as
    parquet-with-bytes scores the same); one --data keeps the flat object."""
    from qva.train.cli import main
    from qva.train.loop import train

    manifest = train_dirs[4]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:4]
    pq.write_table(pa.Table.from_pylist([{"audio": {"bytes": (manifest.parent / r["audio"]).read_bytes(), "path": None}, "text": r["text"]}
                                         for r in rows]), tmp_path / "dev.parquet")
    _write_jsonl(tmp_path / "dev.jsonl", [{"audio": str(manifest.parent / r["audio"]), "text": r["text"]} for r in rows])
    cfg = train_config(train_dirs, tmp_path, "1", steps=1)
    train(cfg, quiet=True)
    capsys.readouterr()
    assert main(["eval", cfg.out, "--data", str(tmp_path / "dev.jsonl"), "--data", str(tmp_path / "dev.parquet"), "--json",
                 "--cache", "none", "--max-new-tokens", "4"]) == 0
    sets = json.loads(capsys.readouterr().out)["sets"]
    a, b = sets[str(tmp_path / "dev.jsonl")], sets[str(tmp_path / "dev.parquet")]
    assert a == b and a["n"] == 4 and set(a) == {"exact_match", "wer", "cer", "wer_plain", "n"}
    assert main(["eval", cfg.out, "--data", str(tmp_path / "dev.parquet"), "--json", "--cache", "none", "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == b


def test_training_scores_several_eval_sets(train_dirs, tmp_path):
    """`--eval A,B`: each set scored at every evaluation, all recorded under "sets" in metrics.jsonl, the first's flat
    (as with one set) and choosing the best checkpoint; recorded paths absolute."""
    from qva.train.loop import train

    manifest = train_dirs[4]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    _write_jsonl(tmp_path / "a.jsonl", [{"audio": str(manifest.parent / r["audio"]), "text": r["text"]} for r in rows[:3]])
    pq.write_table(pa.Table.from_pylist([{"audio": {"bytes": (manifest.parent / r["audio"]).read_bytes(), "path": None}, "text": r["text"]}
                                         for r in rows[3:5]]), tmp_path / "b.parquet")
    cfg = train_config(train_dirs, tmp_path, "1", steps=2, eval_every=1, max_new_tokens=4,
                       eval_data=f"{tmp_path / 'a.jsonl'}, {tmp_path / 'b.parquet'}")
    summary = train(cfg, quiet=True)
    evals = [r for r in map(json.loads, (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()) if "sets" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        a, b = r["sets"][str(tmp_path / "a.jsonl")], r["sets"][str(tmp_path / "b.parquet")]
        assert a["n"] == 3 and b["n"] == 2 and all(r[k] == a[k] for k in a)
    assert summary["best"]["step"] in (1, 2) and summary["best"]["n"] == 3
    recorded = json.loads((Path(cfg.out) / "train_config.json").read_text())["eval_data"]
    assert recorded == f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.parquet'}"


def test_bucketed_run_resumes_bit_exact(train_dirs, tmp_path):
    from safetensors.torch import load_file

    from qva.train.loop import train

    def last(run):
        return load_file(str(sorted((Path(run) / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))

    cfg = train_config(train_dirs, tmp_path, "1", steps=4, bucket_by_length=True, batch_size=3, save_every=1, keep_last=10)
    train(cfg, quiet=True)
    want = last(cfg.out)
    for step in (3, 4):  # as if stopped after step 2
        shutil.rmtree(Path(cfg.out) / "checkpoints" / f"step-{step:08d}")
    train(replace(cfg, resume=True), quiet=True)
    got = last(cfg.out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# -- scoring -------------------------------------------------------------------------------------------------------
# (sentence, Whisper's EnglishTextNormalizer, normalize.english where it differs)
SENTENCES = [
    ("Mr. Smith won't pay $20.50 for 3 apples!", "mister smith will not pay $20.50 for 3 apples", None),
    ("eight seven seven eight nine", "87789", None),
    ("It's twenty-one degrees, isn't it?", "it is 21 degrees is not it", None),
    ("I'd been there in 1999.", "i had been there in 1999", None),
    ("One hundred and five percent", "105%", None),
    ("zero eight one zero zero three", "081003", None),
    ("Hello [laughs] world (um), uh, yes", "hello world yes", None),
    ("the first time, the twenty second", "the 1st time the 22nd", None),
    ("They're here; we'll see, I've done, I'm ok", "they are here we will see i have done i am ok", None),
    ("1,000 people", "1000 people", None),
    ("Dr. Who and Mrs. Jones, a hundred", "doctor who and missus jones a 100", None),
    ("John's car", "john is car", "johns car"),  # Whisper writes every 's as "is"; a possessive keeps its s here
    # Whisper joins a decimal to the next number, and joins number words across commas (its punctuation is gone by
    # then); here a decimal and a comma end a number
    ("nineteen ninety nine three point five twenty dollars", "$19993.520", "19993.5 $20"),
    ("nineteen ninety nine, three point five, twenty dollars", "$19993.520", "1999 3.5 $20"),
]


def test_english_normalisation_against_whisper():
    for sentence, whisper, ours in SENTENCES:
        assert english(sentence) == (ours or whisper), sentence
    try:
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer
    except ImportError:
        return
    reference = EnglishTextNormalizer({})  # no British → American spelling list: qva does not map spellings either
    for sentence, whisper, _ in SENTENCES:
        assert reference(sentence) == whisper, sentence


def test_score_wer_cer_after_normalisation():
    s = score(["Twenty-one, please.", "I can't", "08"], ["21 please", "i can not", "oh eight"])
    assert s["wer"] == 0.0 and s["cer"] == 0.0 and s["exact_match"] == 0.0 and s["wer_plain"] > 0 and s["n"] == 3
    s = score(["abd"], ["abc"])
    assert s["cer"] == pytest.approx(100 / 3) and s["wer"] == 100.0


# -- bucketing -----------------------------------------------------------------------------------------------------
class _S:
    def __init__(self, n):
        self.input_ids = torch.zeros(n)


def test_bucket_order_is_seeded_recomputable_and_pads_less():
    rng = np.random.default_rng(0)
    samples = [_S(int(n)) for n in rng.integers(10, 400, 640)]
    plain = epoch_order(samples, 3, 1)
    assert plain == torch.randperm(640, generator=torch.Generator().manual_seed(3 * 100_003 + 1)).tolist()  # unchanged order
    bucketed = epoch_order(samples, 3, 1, bucket=8)
    assert sorted(bucketed) == list(range(640)) and bucketed != plain
    assert epoch_order(list(samples), 3, 1, bucket=8) == bucketed  # a fresh call (as on resume) gives the same order
    assert epoch_order(samples, 4, 1, bucket=8) != bucketed and epoch_order(samples, 3, 2, bucket=8) != bucketed
    lengths = [s.input_ids.shape[0] for s in samples]
    assert padding_fraction([lengths[i] for i in bucketed], 8) < padding_fraction([lengths[i] for i in plain], 8) / 4


def test_bucket_order_keeps_batches_whole_when_the_batch_does_not_divide_the_epoch():
    """645 samples at batch 8, over four epochs as a run takes them (micro-batches of 8 on one grid across epochs,
    `loop.next_sample`): every micro-batch is one batch of a sorted window (its lengths rise), except the one that
    spans each epoch boundary; nowhere does a short batch sit mid-epoch, where every later micro-batch would
    straddle two batches."""
    rng = np.random.default_rng(1)
    samples = [_S(int(n)) for n in rng.integers(10, 4000, 645)]
    orders = [epoch_order(samples, 3, e, bucket=8) for e in range(4)]
    assert all(sorted(order) == list(range(645)) for order in orders)
    run = [samples[i].input_ids.shape[0] for order in orders for i in order]  # lengths in the run's order
    spanning = {e * 645 // 8 for e in range(1, 4)}  # the micro-batches that hold an epoch boundary (645 is odd)
    micro = [run[b:b + 8] for b in range(0, len(run) - 7, 8)]
    assert all(m == sorted(m) for k, m in enumerate(micro) if k not in spanning)


@need_shared(SHARED / "spoken-digits")
def test_bucketing_on_spoken_digits_pads_less():
    """Token lengths of the spoken-digits training set (audio tokens from the clip durations, pool 4, plus the
    template and the answer): the padding fraction at batch 64 with and without bucketing."""
    from qva.audio import audio_token_count

    rows = [json.loads(line) for line in (SHARED / "spoken-digits" / "train.jsonl").read_text().splitlines()]
    samples = [_S(audio_token_count(int(r["seconds"] * 100), "valid", 4) + len(r["text"]) + 20) for r in rows]
    lengths = [s.input_ids.shape[0] for s in samples]
    plain = padding_fraction([lengths[i] for i in epoch_order(samples, 0, 0)], 64)
    bucketed = padding_fraction([lengths[i] for i in epoch_order(samples, 0, 0, bucket=64)], 64)
    print(f"spoken-digits padding fraction at batch 64: {plain:.3f} plain, {bucketed:.3f} bucketed")
    assert bucketed < plain
