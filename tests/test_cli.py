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
        (["--model", "{demo}", "--prompt", "word " * 5000], "exceeds the model's context of 4096"),
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
