"""Qwen2.5-VL: logits parity against transformers' `Qwen2_5_VLForConditionalGeneration` (fp32, tiny random weights
with real structure: the Hub's 112-pixel windows, ≥ 2 windows a frame, one full-attention block), the vision tower
alone, video positions on absolute time, the Whisper graft with image + video + audio in one prompt, the Hub's flat
layout, save / reload, and the processor's time and audio tokens."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    IMAGE_PAD,
    PARITY_TOL,
    QWEN_TOKENIZER,
    VIDEO_PAD,
    assert_padded_row_alone,
    assert_parity,
    graft_parity,
    left_padded,
    need_shared,
    pixels,
    prompt,
    reference_logits,
    speechlike,
    tiny_qwen2vl,
    types_of,
    vision_block,
    write_hub_layout,
)

import qva
from qva import qwen2_5_vision
from qva.qwen2vl_config import FIRST_FREE_ID

TOL = PARITY_TOL
AUDIO_START_25, AUDIO_END_25, AUDIO_PAD_25 = 151665, 151666, 151667  # after Qwen2.5-VL's tokenizer (ends at 151664)
QWEN25_EXTRA = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = tiny_qwen2vl(seed=11, tie=True, family="qwen2_5_vl").eval()
    saved = tmp_path_factory.mktemp("qwen25")
    ref.save_pretrained(saved)
    return ref, qva.load(saved), saved


# -- the vision tower alone ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("grids", [[[1, 16, 24]], [[1, 10, 14]], [[2, 8, 8]], [[1, 10, 14], [3, 16, 8], [1, 2, 2]]],
                         ids=["2x3 windows", "odd: edge windows", "video", "mixed"])
def test_vision_tower_alone(pair, grids):
    ref, ours, _ = pair
    px, grid = pixels(grids, seed=1)
    with torch.no_grad():
        got, want = ours.visual(px, grid), ref.model.visual(px, grid_thw=grid).pooler_output
    assert (got - want).abs().max() <= TOL * max(1.0, want.abs().max().item())
    assert want.abs().max() > 1.0


def test_window_order_is_hubs():
    """A 10 × 14-patch image is a 5 × 7 merged grid: windows of 4 × 4 from the top-left (edge ones smaller)."""
    cfg = qva.qwen2vl_config.VisionConfig(depth=1, embed_dim=32, hidden_size=64, num_heads=4, window_size=112)
    order, lengths = qwen2_5_vision.window_order([[1, 10, 14]], cfg)
    assert lengths == [16 * 4, 12 * 4, 4 * 4, 3 * 4]  # 4×4, 4×3, 1×4, 1×3 merged tokens; 4 patches each
    assert order[:5].tolist() == [0, 1, 2, 3, 7] and sorted(order.tolist()) == list(range(35))


def test_a_broken_window_order_or_full_attention_block_fails(pair, monkeypatch):
    ref, ours, _ = pair
    px, grid = pixels([[1, 16, 24]], seed=2)
    with torch.no_grad():
        want = ref.model.visual(px, grid_thw=grid).pooler_output
        right = ours.visual(px, grid)
        real = qwen2_5_vision.window_order

        def shifted(grid_thw, cfg):  # the windows cut one merged token off the Hub's
            order, lengths = real(grid_thw, cfg)
            return order.roll(1), lengths

        monkeypatch.setattr(qwen2_5_vision, "window_order", shifted)
        wrong_order = ours.visual(px, grid)
        monkeypatch.setattr(qwen2_5_vision, "window_order", real)
        ours.visual.config.fullatt_block_indexes = []
        try:
            no_full = ours.visual(px, grid)
        finally:
            ours.visual.config.fullatt_block_indexes = [1]
    assert (right - want).abs().max() <= TOL * max(1.0, want.abs().max().item())
    assert (wrong_order - want).abs().max() > 100 * TOL and (no_full - want).abs().max() > 100 * TOL


# -- logits ----------------------------------------------------------------------------------------------------------
def test_text_only(pair):
    ref, ours, _ = pair
    assert ours.config.family == "qwen2_5_vl" and type(ours.visual).__name__ == "Qwen25VisionTransformer"
    assert_parity(ours, ref, torch.tensor([prompt(9707, 11, 1879, 0, 358, 1079)]))


def test_images_of_odd_sizes(pair):
    ref, ours, _ = pair
    grids = [[1, 10, 14], [1, 6, 22]]
    px, grid = pixels(grids, seed=3)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, grids[0]), 3838, vision_block(IMAGE_PAD, grids[1]), 30)])
    assert_parity(ours, ref, ids, pixel_values=px, image_grid_thw=grid)


def test_video_positions_follow_time(pair):
    """1.5 s a temporal patch × 2 tokens a second: temporal ids 0, 3, 6 (spatial ids reach 7, so transformers'
    advance after the block equals the original's, see rope_index.py)."""
    ref, ours, _ = pair
    grids = [[3, 16, 8]]
    pv, grid = pixels(grids, seed=4)
    ids = torch.tensor([prompt(vision_block(VIDEO_PAD, grids[0]), 3838, 374)])
    seconds = torch.tensor([1.5])
    assert_parity(ours, ref, ids, pixel_values_videos=pv, video_grid_thw=grid, second_per_grid_ts=seconds)
    pos, _ = ours.position_ids(ids, None, None, grid, seconds)
    start = 3  # after <|im_start|>user\n
    assert pos[0, 0, start + 1 :: 32][:3].tolist() == [start + 1, start + 4, start + 7]  # block starts at start + 1
    with torch.no_grad():  # time matters: another frame rate gives other logits
        other = ours(ids, pixel_values_videos=pv, video_grid_thw=grid, second_per_grid_ts=torch.tensor([0.5])).logits
    assert (other - reference_logits(ref, ids, pixel_values_videos=pv, video_grid_thw=grid, second_per_grid_ts=seconds)).abs().max() > 100 * TOL


def test_text_after_a_long_video_follows_the_original(pair):
    """Temporal ids past the spatial ones (6 steps × 3 = ids up to 15, spatial up to 7): the text after the block
    starts at the block's largest id + 1, as the released models were trained (transformers 5.x advances by
    max(h, w) / 2 instead; ../shared/docs/parity-notes.md)."""
    ref, ours, _ = pair
    grid = torch.tensor([[6, 16, 8]])
    ids = torch.tensor([prompt(vision_block(VIDEO_PAD, [6, 16, 8]), 3838)])
    pos, delta = ours.position_ids(ids, None, None, grid, torch.tensor([1.5]))
    after = 3 + 1 + 192 + 1  # <|im_start|>user\n, <|vision_start|>, 192 video tokens, <|vision_end|>
    assert pos[:, 0, after - 1].tolist() == [20] * 3 and pos[:, 0, after - 2].tolist() == [4 + 15, 4 + 7, 4 + 3]
    theirs, _ = ref.model.get_rope_index(ids, types_of(ids), None, grid, torch.tensor([1.5]))
    assert theirs[0, 0, after - 1] == 4 + 8  # the known difference
    assert int(delta) == int(pos.max()) + 1 - ids.shape[1]


def test_ignoring_time_fails(pair, monkeypatch):
    ref, ours, _ = pair
    pv, grid = pixels([[3, 16, 8]], seed=4)
    ids = torch.tensor([prompt(vision_block(VIDEO_PAD, [3, 16, 8]), 3838)])
    monkeypatch.setattr(ours.config.vision, "tokens_per_second", None)
    with torch.no_grad():
        got = ours(ids, pixel_values_videos=pv, video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.5])).logits
    want = reference_logits(ref, ids, pixel_values_videos=pv, video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.5]))
    assert (got - want).abs().max() > 100 * TOL


def test_image_and_video_in_a_left_padded_batch(pair):
    ref, ours, _ = pair
    px, igrid = pixels([[1, 10, 14]], seed=5)
    pv, vgrid = pixels([[4, 16, 8]], seed=6)
    seconds = torch.tensor([1.0])
    short = prompt(9707, 1879)
    ids, mask = left_padded([prompt(vision_block(VIDEO_PAD, [4, 16, 8]), 11, vision_block(IMAGE_PAD, [1, 10, 14]), 30), short])
    media = dict(pixel_values=px, image_grid_thw=igrid, pixel_values_videos=pv, video_grid_thw=vgrid, second_per_grid_ts=seconds)
    assert_parity(ours, ref, ids, mask, **media)
    assert_padded_row_alone(ours, ids, mask, short, **media)


def test_hub_layout_and_save_reload(pair, tmp_path):
    ref, _, saved = pair
    hub = write_hub_layout(saved, tmp_path / "hub")
    cfg = json.loads((hub / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl" and "text_config" not in cfg and cfg["vision_config"]["out_hidden_size"] == 64
    ours = qva.load(hub)
    px, grid = pixels([[1, 10, 14]], seed=7)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 10, 14]), 3838)])
    assert_parity(ours, ref, ids, pixel_values=px, image_grid_thw=grid)
    qva.save(ours, tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["model_type"] == "qwen2_5_vl" and written["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert written["vision_config"]["fullatt_block_indexes"] == [1] and written["vision_config"]["window_size"] == 112
    again = qva.load(tmp_path / "saved")
    with torch.no_grad():
        a = ours(ids, pixel_values=px, image_grid_thw=grid).logits
        b = again(ids, pixel_values=px, image_grid_thw=grid).logits
    assert torch.equal(a, b)
    from transformers import Qwen2_5_VLForConditionalGeneration  # and transformers reads what qva wrote

    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    assert_parity(ours, back, ids, pixel_values=px, image_grid_thw=grid)


# -- the graft ---------------------------------------------------------------------------------------------------------
def test_image_video_and_audio_in_one_prompt(pair, whisper_dir, tmp_path):
    ref, _, saved = pair
    encoder, wfolder = whisper_dir
    graft = qva.load(saved, whisper=wfolder, seed=3)
    c = graft.config
    assert (c.audio_start_token_id, c.audio_end_token_id, c.audio_token_id) == (AUDIO_START_25, AUDIO_END_25, AUDIO_PAD_25)
    assert FIRST_FREE_ID["qwen2_5_vl"] == AUDIO_START_25
    px, igrid = pixels([[1, 10, 14]], seed=8)
    pv, vgrid = pixels([[4, 16, 8]], seed=9)
    seconds = torch.tensor([1.0])
    block = lambda n: [AUDIO_START_25] + [AUDIO_PAD_25] * n + [AUDIO_END_25]  # noqa: E731
    media = dict(pixel_values=px, image_grid_thw=igrid, pixel_values_videos=pv, video_grid_thw=vgrid)
    ids, feats, valid, got = graft_parity(
        graft, ref, encoder, lambda n: torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 10, 14]), 11, vision_block(VIDEO_PAD, [4, 16, 8]), 30,
                                                           block(n), 3838)]),
        media, second_per_grid_ts=seconds)
    qva.save(graft, tmp_path / "graft")
    again = qva.load(tmp_path / "graft")
    assert again.config.family == "qwen2_5_vl" and again.config.audio_token_id == AUDIO_PAD_25
    with torch.no_grad():
        assert torch.equal(again(ids, input_features=feats, audio_valid_frames=valid, second_per_grid_ts=seconds, **media).logits, got)


# -- the processor --------------------------------------------------------------------------------------------------
@need_shared(QWEN_TOKENIZER)
def test_processor_time_and_audio_tokens(pair, whisper_dir, tmp_path):
    """With Qwen2.5-VL's tokenizer (Qwen2-VL's plus 8 tokens up to 151664) a fresh graft's audio tokens are
    151665–151667, in the config too, saved and reloaded; videos carry temporal_patch_size / fps seconds a patch;
    the image rows and ids equal the reference processor's."""
    import shutil

    from PIL import Image
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    _, _, saved = pair
    folder = tmp_path / "base"
    shutil.copytree(saved, folder)
    tok = Tokenizer.from_file(str(QWEN_TOKENIZER / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN25_EXTRA])
    assert tok.token_to_id("<|file_sep|>") == 151664
    tok.save(str(folder / "tokenizer.json"))
    tok_cfg = json.loads((QWEN_TOKENIZER / "tokenizer_config.json").read_text())  # as Qwen2.5-VL's lists them
    for i, t in enumerate(QWEN25_EXTRA):
        tok_cfg["added_tokens_decoder"][str(151657 + i)] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                            "single_word": False, "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    graft = qva.load(folder, whisper=whisper_dir[1])
    p = graft.processor
    assert p.audio_token_id == graft.config.audio_token_id == AUDIO_PAD_25 and p.token_id("<tool_call>") == 151657
    image = Image.fromarray((torch.rand(150, 230, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    frames = [Image.fromarray((torch.rand(120, 90, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()) for i in range(5)]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "video", "video": frames, "fps": 4.0},
                                             {"type": "audio", "audio": speechlike(2.0, 0).numpy()}, {"type": "text", "text": "What?"}]}]
    inputs = p.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert inputs["second_per_grid_ts"].tolist() == [2 / 4.0]
    assert int((inputs["input_ids"] == AUDIO_PAD_25).sum()) > 0 and int((inputs["input_ids"] == 151659).sum()) == 0
    ref_img = Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt")
    assert torch.allclose(inputs["pixel_values"], ref_img["pixel_values"], atol=1e-6)
    assert inputs["image_grid_thw"].tolist() == ref_img["image_grid_thw"].tolist()
    text = p.apply_chat_template(messages, add_generation_prompt=True)
    qva.save(graft, tmp_path / "graft")
    ref_tok = AutoTokenizer.from_pretrained(tmp_path / "graft")  # the saved tokenizer, with the audio tokens
    n_img = int(inputs["image_grid_thw"].prod()) // 4
    n_vid = int(inputs["video_grid_thw"].prod()) // 4
    n_aud = int((inputs["input_ids"] == AUDIO_PAD_25).sum())
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * n_img).replace("<|video_pad|>", "<|video_pad|>" * n_vid)
    expanded = expanded.replace("<|audio_pad|>", "<|audio_pad|>" * n_aud)
    assert ref_tok(expanded, add_special_tokens=False)["input_ids"] == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        out = graft.generate(**inputs, max_new_tokens=2)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    again = qva.load(tmp_path / "graft")
    assert again.processor.audio_token_id == AUDIO_PAD_25 and again.processor.token_id("<tool_call>") == 151657
