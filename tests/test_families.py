"""Every path that works for Qwen2-VL, on the newer bases (Qwen2.5-VL, Qwen3-VL): int8/int4/NF4 (the vision tower
too), qva-generate, qva-serve (answers equal to `generate`'s), qva-train stages 1, 2 (LoRA, QLoRA) and lm. Parity
with transformers is each family's own file (test_qwen2_5_vl.py, test_qwen3_vl.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import IMAGE_PAD, ServeProcess, http, make_train_dirs, pixels, prompt, rel_l2, train_config, vision_block

import qva
from qva.linear import QUANTIZED_LINEARS


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def dirs(request, tmp_path_factory):
    """A tiny model of the family with the demo tokenizer, a tiny Whisper and a small manifest (conftest.make_train_dirs)."""
    return request.param, make_train_dirs(tmp_path_factory.mktemp(f"train-{request.param}"), request.param)


def image_and_prompt(family: str, seed: int):
    """A 10 × 14-patch image's pixels for the family's patch size, and a prompt around it."""
    px, grid = pixels([[1, 10, 14]], seed=seed, patch_dim=3 * 2 * (16 if family == "qwen3_vl" else 14) ** 2)
    return px, grid, torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 10, 14]), 3838, 374)])


@pytest.mark.parametrize("fmt,bound", [("int8", 0.05), ("int4", 0.5), ("nf4", 0.5)])
def test_quantized(dirs, tmp_path, fmt, bound):
    family, (_, qwen, _, whisper, _) = dirs
    modules = ("llm", "vision", "whisper")
    ref = qva.load(qwen, whisper=whisper)
    model = qva.load(qwen, whisper=whisper, quantize=fmt, quantize_modules=modules, group_size=32)
    kind = QUANTIZED_LINEARS[fmt]
    for stack in (model.visual, model.model.layers):  # the family's tower too (int4: the shapes it packs)
        assert any(isinstance(m, kind) for m in stack.modules())
    px, grid, ids = image_and_prompt(family, seed=10)
    with torch.no_grad():
        want, got = ref(ids, pixel_values=px, image_grid_thw=grid).logits, model(ids, pixel_values=px, image_grid_thw=grid).logits
    assert 0 < rel_l2(got, want) < bound
    qva.save(model, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(qva.load(tmp_path / "q")(ids, pixel_values=px, image_grid_thw=grid).logits, got)


def test_qva_generate(dirs, tmp_path, capsys):
    from PIL import Image

    from qva.cli import main

    _, (_, qwen, _, whisper, manifest) = dirs
    Image.new("RGB", (150, 230), (40, 90, 160)).save(tmp_path / "a.png")
    code = main(["--model", str(qwen), "--whisper", str(whisper), "--image", str(tmp_path / "a.png"),
                 "--audio", str(manifest.parent / "clips" / "3.wav"), "--prompt", "What is said?", "--max-new-tokens", "3"])
    assert code == 0 and capsys.readouterr().out.strip()


def test_qva_serve_answers_as_generate_does(dirs, tmp_path):
    import base64
    import io

    from PIL import Image

    _, (_, qwen, _, whisper, manifest) = dirs
    png = io.BytesIO()
    Image.new("RGB", (150, 230), (40, 90, 160)).save(png, format="PNG")
    wav = (manifest.parent / "clips" / "3.wav").read_bytes()
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}},
               {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
               {"type": "text", "text": "What is said?"}]
    srv = ServeProcess("--model", str(qwen), "--whisper", str(whisper), "--dtype", "fp32", "--served-model-name", "qva")
    try:
        status, body = http(srv.base + "/v1/chat/completions", {"model": "qva", "max_tokens": 4, "temperature": 0,
                                                               "messages": [{"role": "user", "content": content}]})
    finally:
        srv.stop()
    assert status == 200, body
    served = json.loads(body)["choices"][0]["message"]["content"]
    model = qva.load(qwen, whisper=whisper)
    offline = [{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(png.getvalue()))},
                                            {"type": "audio", "audio": qva.load_audio(wav)}, {"type": "text", "text": "What is said?"}]}]
    inputs = model.processor.apply_chat_template(offline, add_generation_prompt=True, tokenize=True)
    out = model.generate(**inputs, max_new_tokens=4)
    assert served == model.processor.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.mark.parametrize("stage,extra", [("1", {}), ("2", {}), ("2", {"qlora": True}), ("lm", {})],
                         ids=["stage 1", "stage 2 LoRA", "stage 2 QLoRA", "stage lm"])
def test_qva_train_stages(dirs, tmp_path, stage, extra):
    from qva.train.loop import train

    family, train_dirs = dirs
    whisper = train_dirs[3]
    cfg = train_config(train_dirs, tmp_path, stage=stage, steps=2, whisper=str(whisper), **extra)  # lm: the LLM under audio
    summary = train(cfg, quiet=True)
    assert math.isfinite(summary["loss"])
    model = qva.load(cfg.out)
    assert model.config.family == family and type(model.visual).__name__ == type(qva.load(train_dirs[1]).visual).__name__
    assert model.audio_encoder is not None
