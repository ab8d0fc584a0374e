"""qva-generate: the demo runs the whole pipeline through the real loader; user errors are one line."""

from __future__ import annotations

import pytest

from qva.cli import main
from qva.demo import QWEN_SPECIAL_TOKENS, demo_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QVA_CACHE", str(tmp_path))
    return tmp_path


def test_demo_runs_end_to_end(cache, capsys):
    assert main(["--demo", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert "RANDOM weights" in err
    assert "prompt " in err and " 6 new; prefill " in err and "decode " in err
    assert len(out.strip()) > 0 and out.strip().isprintable()
    demo = cache / "demo"
    assert (demo / "qwen2-vl" / "config.json").is_file() and (demo / "whisper" / "model.safetensors").is_file()
    mtime = (demo / "qwen2-vl" / "model.safetensors").stat().st_mtime
    assert main(["--demo", "--max-new-tokens", "2"]) == 0  # cached: not written again
    assert (demo / "qwen2-vl" / "model.safetensors").stat().st_mtime == mtime


def test_demo_tokenizer_has_qwen_ids():
    tok = demo_tokenizer()
    assert [tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS] == list(range(151643, 151657))
    ids = tok.encode("<|im_start|>héllo 🦙<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 151644 and ids[-1] == 151645
    assert tok.decode(ids, skip_special_tokens=True) == "héllo 🦙"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent", "--prompt", "hi"], "/nonexistent: no such model folder"),
        (["--prompt", "hi"], "--model and --prompt are required"),
        (["--model", "{tmp}", "--prompt", "hi"], "no config.json (is this a Qwen2-VL checkpoint folder?)"),
        (["--model", "{demo}", "--prompt", "hi", "--audio", "{demo_wav}"], "has no audio encoder"),
        (["--model", "{demo}", "--prompt", "hi", "--image", "{tmp}/missing.png"], "missing.png: no such image file"),
        (["--model", "{demo}", "--prompt", "hi", "--video", "{tmp}/missing"], "missing: no such video"),
        (["--model", "{demo}", "--prompt", "word " * 5000], "the model's context of 4096"),
    ],
)
def test_user_errors_are_one_line(cache, capsys, args, message):
    main(["--demo", "--max-new-tokens", "1"])  # makes the demo checkpoint
    capsys.readouterr()
    demo = cache / "demo"
    args = [a.format(tmp=cache, demo=demo / "qwen2-vl", demo_wav=demo / "speech.wav") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qva-generate: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cuda_requested_without_cuda(cache, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    main(["--demo", "--max-new-tokens", "1"])
    capsys.readouterr()
    assert main(["--model", str(cache / "demo" / "qwen2-vl"), "--prompt", "hi", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


# -- every bad input is one line and exit status 2 ---------------------------------------------------------
def shift_offsets(data: bytes) -> bytes:
    """The same safetensors file with every tensor's byte range moved 4 bytes on (and 4 bytes appended)."""
    import json
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    for name, entry in header.items():
        if name != "__metadata__":
            entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :] + b"\0" * 4


def with_config(**changes):
    def edit(old: bytes) -> dict:
        import json

        return {**json.loads(old), **changes}
    return edit


CLI_CASES = [
    # (files of the model folder replaced, extra arguments, what the one line must say)
    ({"model__safetensors": shift_offsets}, [], "corrupt header: tensor"),
    ({"config__json": with_config(num_hidden_layers=2.0)}, [], "config.json: field 'num_hidden_layers' must be an integer, got 2.0"),
    ({"config__json": with_config(num_attention_heads=0)}, [], "config.json: field 'num_attention_heads' must be ≥ 1"),
    ({"config__json": with_config(vision_config=None)}, [], "config.json: field 'vision_config' is null"),
    ({"config__json": with_config(image_token_id=151654)}, [], "tokenizer gives <|image_pad|> id 151655, the model's config expects 151654"),
    ({"preprocessor_config__json": with_config(merge_size=3)}, [], "preprocessor_config.json: field 'merge_size' is 3"),
    ({"preprocessor_config__json": with_config(image_std=[0.2, 0.0, 0.2])}, [], "field 'image_std' must be a list of 3 numbers > 0"),
    ({"preprocessor_config__json": "{oops"}, [], "preprocessor_config.json: invalid JSON"),
    ({"tokenizer__json": "[]"}, [], "tokenizer.json: not a valid tokenizer file"),
    ({}, ["--max-new-tokens", "-1"], "max_new_tokens must be an integer ≥ 0, got -1"),
    ({}, ["--temperature", "nan"], "temperature must be a finite number ≥ 0"),
    ({}, ["--temperature", "-1"], "temperature must be a finite number ≥ 0"),
    ({}, ["--temperature", "0.7", "--top-p", "2"], "top_p must be in (0, 1]"),
    ({}, ["--temperature", "0.7", "--top-k", "-1"], "top_k must be an integer ≥ 0"),
    ({}, ["--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0"),
    ({}, ["--top-p", "0.9"], "--top-k/--top-p need sampling"),
    ({}, ["--image", "{bomb}"], "pixels is over the decompression-bomb limit"),
    ({}, ["--whisper", "{whisper}", "--audio", "{empty_wav}"], "empty.wav: audio is empty (0 samples)"),
    ({}, ["--whisper", "{whisper}", "--audio", "{nan_wav}"], "nan.wav: audio has 1 NaN/inf sample(s)"),
    ({}, ["--whisper", "{bad_whisper}", "--audio", "{nan_wav}"], "config.json: field 'd_model' must be an integer"),
    ({}, ["--prompt", "caf\udce9"], "not valid Unicode at character 3"),
    ({}, ["--prompt", "word " * 5000], "over the model's context of 4096"),
]


@pytest.mark.parametrize("files,extra,message", CLI_CASES, ids=[c[2][:60] for c in CLI_CASES])
def test_every_bad_input_is_one_line_and_exit_2(demo_dirs, tmp_path, capsys, monkeypatch, files, extra, message):
    import json

    import numpy as np
    import soundfile as sf
    from conftest import broken_copy
    from PIL import Image

    qwen, whisper = demo_dirs
    model = broken_copy(qwen, tmp_path / "model", **files) if files else qwen
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    sf.write(str(tmp_path / "empty.wav"), np.zeros((0, 1), np.float32), 16000)
    nan = np.zeros(800, np.float32)
    nan[5] = np.nan
    sf.write(str(tmp_path / "nan.wav"), nan, 16000, subtype="FLOAT")
    bad_whisper = broken_copy(whisper, tmp_path / "whisper", config__json=lambda old: {**json.loads(old), "d_model": "64"})
    paths = dict(bomb=tmp_path / "bomb.png", whisper=whisper, empty_wav=tmp_path / "empty.wav", nan_wav=tmp_path / "nan.wav",
                 bad_whisper=bad_whisper)
    extra = [a.format(**paths) for a in extra]
    args = ["--model", str(model), "--prompt", "hi", "--max-new-tokens", "2", *extra]
    assert main(args) == 2
    progress = ("loading ", "loaded in ", "\r[", "[")
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and not line.startswith(progress)]
    assert len(err) == 1 and err[0].startswith("qva-generate: error: ") and message in err[0], err
