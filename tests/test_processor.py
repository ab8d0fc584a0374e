"""Processor: the real Qwen2-VL tokenizer, chat template and placeholder expansion against transformers."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import QWEN_TOKENIZER, broken_copy
from PIL import Image

from qva.processor import Processor


@pytest.fixture(scope="module")
def proc():
    if not QWEN_TOKENIZER.exists():
        pytest.skip(f"{QWEN_TOKENIZER} not found: ../shared data is only beside CI/dev checkouts")
    return Processor.from_pretrained(QWEN_TOKENIZER)


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    if not QWEN_TOKENIZER.exists():
        pytest.skip(f"{QWEN_TOKENIZER} not found: ../shared data is only beside CI/dev checkouts")
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
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

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


# -- a checkpoint folder's processor files, checked at load ------------------------------------------------
def edit_json(**changes):
    def edit(old: bytes) -> dict:
        cfg = json.loads(old)
        cfg.update(changes)
        return cfg
    return edit


BAD_FOLDERS = [
    ({"preprocessor_config__json": edit_json(image_std=[0, 0.26, 0.27])}, "preprocessor_config.json: field 'image_std' must be a list of 3 numbers > 0"),
    ({"preprocessor_config__json": edit_json(image_mean=[0.5, 0.5])}, "preprocessor_config.json: field 'image_mean' must be a list of 3 finite numbers"),
    ({"preprocessor_config__json": edit_json(patch_size=0)}, "preprocessor_config.json: field 'patch_size' must be ≥ 1, got 0"),
    ({"preprocessor_config__json": edit_json(merge_size=4)},
     "preprocessor_config.json: field 'merge_size' is 4 but the model's vision_config.spatial_merge_size is 2"),
    ({"preprocessor_config__json": edit_json(patch_size=16)}, "field 'patch_size' is 16 but the model's vision_config.patch_size is 14"),
    ({"preprocessor_config__json": edit_json(min_pixels=10**6, max_pixels=1000)}, "field 'min_pixels' 1000000 must not exceed max_pixels 1000"),
    ({"preprocessor_config__json": "{not json"}, "preprocessor_config.json: invalid JSON"),
    ({"tokenizer__json": "{\"version\": \"1.0\", \"model\": 42}"}, "tokenizer.json: not a valid tokenizer file"),
    ({"tokenizer__json": b"\x00\xff garbage"}, "tokenizer.json: not a valid tokenizer file"),
    ({"config__json": edit_json(image_token_id=151654)}, "tokenizer gives <|image_pad|> id 151655, the model's config expects 151654"),
    ({"config__json": edit_json(video_token_id=151650)}, "tokenizer gives <|video_pad|> id 151656, the model's config expects 151650"),
]


@pytest.mark.parametrize("files,message", BAD_FOLDERS, ids=[m for _, m in BAD_FOLDERS])
def test_bad_processor_files_are_checkpoint_errors_naming_the_file(demo_dirs, tmp_path, files, message):
    import qva
    from weights_loader import CheckpointError

    folder = broken_copy(demo_dirs[0], tmp_path / "bad", **files)
    with pytest.raises(CheckpointError) as e:
        Processor.from_pretrained(folder)
    assert str(folder) in str(e.value) and message in str(e.value), str(e.value)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        qva.load(folder)  # the same at load, before any weight is read


# -- bad inputs at call time: (what is passed, exception type, what the message must name) -------------------
MESSAGES_BAD = [
    ([{"role": "user", "content": None}], "message 0: 'content' must be a string or a list of items, got NoneType"),
    ([{"role": "user", "content": [{"type": "text", "text": 42}]}], "message 0 item 0 text: must be a string, got int"),
    ([{"role": "system", "content": "x"}, {"role": "user", "content": ["hello"]}], "message 1 item 0: must be a dict"),
    ([{"role": "user", "content": "caf\udce9"}], "message 0 content: not valid Unicode at character 3"),
    ([{"role": "user", "content": [{"type": "text", "text": "a\ud800b"}]}], "message 0 item 0 text: not valid Unicode at character 1"),
    ([{"role": 7, "content": "x"}], "message 0: 'role' must be a string"),
    ([{"content": "x"}], "message 0: must be a dict with 'role' and 'content'"),
    ([], "messages must be a non-empty list"),
    ("hello", "messages must be a non-empty list"),
]


@pytest.mark.parametrize("messages,message", MESSAGES_BAD, ids=[m for _, m in MESSAGES_BAD])
def test_bad_chat_messages_name_the_message_and_item(demo_dirs, messages, message):
    proc = Processor.from_pretrained(demo_dirs[0])
    for tokenize in (False, True):
        with pytest.raises(ValueError) as e:
            proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize)
        assert message in str(e.value), str(e.value)


def test_pixel_limits_checked(demo_dirs):
    from qva.image_processing import ImageError

    proc = Processor.from_pretrained(demo_dirs[0])
    text = ["<|vision_start|><|image_pad|><|vision_end|>"]
    for kwargs, message in (
        ({"min_pixels": 0}, "min_pixels must be a positive integer, got 0"),
        ({"max_pixels": -5}, "max_pixels must be a positive integer, got -5"),
        ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels (5000) must not exceed max_pixels (4000)"),
        ({"min_pixels": 3136.5}, "min_pixels must be a positive integer, got 3136.5"),
    ):
        with pytest.raises(ImageError, match=re.escape(message)):
            proc(text=text, images=[image(56, 56)], **kwargs)
