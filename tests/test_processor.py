"""Processor: the real Qwen2-VL tokenizer, chat template and placeholder expansion against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import QWEN_TOKENIZER, need_shared
from PIL import Image

from qva.processor import Processor

pytestmark = need_shared(QWEN_TOKENIZER)


@pytest.fixture(scope="module")
def proc():
    return Processor.from_pretrained(QWEN_TOKENIZER)


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN_TOKENIZER)


def template():
    return json.loads((QWEN_TOKENIZER / "chat_template.json").read_text())["chat_template"]


def image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_tokenizer_test_vectors(proc):
    inputs = (QWEN_TOKENIZER / "tokenizer_test_vectors.inp").read_text().split("\n__ggml_vocab_test__\n")
    outputs = (QWEN_TOKENIZER / "tokenizer_test_vectors.out").read_text().split("\n")
    assert len(inputs) == 47
    for text, ids in zip(inputs, outputs):
        assert proc.tokenizer.encode(text, add_special_tokens=False).ids == [int(i) for i in ids.split()], repr(text)


def test_special_token_ids(proc):
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    for tok, tid in expected.items():
        assert proc.token_id(tok) == tid


MESSAGES = [
    [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is this? 你好"}]}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
    [
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "image", "image": "b"}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "video", "video": "v"}, {"type": "text", "text": "And this?"}]},
    ],
]


@pytest.mark.parametrize("i", range(len(MESSAGES)))
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("vision_id", [False, True])
def test_chat_template_string_and_ids_match(proc, hf_tok, i, gen, vision_id):
    ours = proc.apply_chat_template(MESSAGES[i], add_generation_prompt=gen, add_vision_id=vision_id)
    ref = hf_tok.apply_chat_template(MESSAGES[i], chat_template=template(), add_generation_prompt=gen, tokenize=False, add_vision_id=vision_id)
    assert ours == ref
    assert proc.tokenizer.encode(ours, add_special_tokens=False).ids == hf_tok(ref, add_special_tokens=False)["input_ids"]


def test_processor_expands_placeholders_like_reference(proc, hf_tok):
    """Reference: PIL image processor + tokenizer + the expansion the transformers processor documents."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    imgs = [image(300, 200, 1), image(50, 700, 2)]
    messages = [{"role": "user", "content": [{"type": "image", "image": imgs[0]}, {"type": "text", "text": "and"},
                                             {"type": "image", "image": imgs[1]}, {"type": "text", "text": "?"}]}]
    out = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    cfg = json.loads((QWEN_TOKENIZER / "preprocessor_config.json").read_text())
    ref_px = Qwen2VLImageProcessorPil(min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])(images=imgs, return_tensors="pt")
    text = hf_tok.apply_chat_template(messages, chat_template=template(), add_generation_prompt=True, tokenize=False)
    for grid in ref_px.image_grid_thw:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // 4), 1)
    text = text.replace("<|placeholder|>", "<|image_pad|>")
    ref_ids = hf_tok(text, add_special_tokens=False)["input_ids"]

    assert out["input_ids"][0].tolist() == ref_ids
    assert torch.equal(out["image_grid_thw"], ref_px.image_grid_thw)
    assert (out["pixel_values"] - ref_px.pixel_values).abs().max() <= 1e-6
    assert int((out["input_ids"] == 151655).sum()) == int(ref_px.image_grid_thw.prod(-1).sum()) // 4


def test_batch_left_padding(proc):
    out = proc(text=["a long prompt with several words", "short"])
    ids, mask = out["input_ids"], out["attention_mask"]
    n_short = len(proc.tokenizer.encode("short", add_special_tokens=False).ids)
    assert mask[1].tolist() == [0] * (ids.shape[1] - n_short) + [1] * n_short
    assert (ids[1, : ids.shape[1] - n_short] == 151643).all()
    assert mask[0].all()


def test_video_placeholders(proc):
    frames = np.random.default_rng(0).integers(0, 256, (3, 56, 84, 3), dtype=np.uint8)
    out = proc(text=["<|vision_start|><|video_pad|><|vision_end|>describe"], videos=[frames])
    t, h, w = out["video_grid_thw"][0].tolist()
    assert t == 2
    assert int((out["input_ids"] == 151656).sum()) == t * h * w // 4
    assert out["pixel_values_videos"].shape == (t * h * w, 1176)


def test_placeholder_media_mismatch_is_an_error_before_compute(proc):
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\) .* but 1 image\(s\) were given"):
        proc(text=["<|image_pad|> and <|image_pad|>"], images=[image(28, 28)])
    with pytest.raises(ValueError, match=r"0 video placeholder\(s\) .* but 1 video\(s\)"):
        proc(text=["no video here"], videos=[np.zeros((2, 28, 28, 3), np.uint8)])
