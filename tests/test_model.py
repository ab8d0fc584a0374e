"""Qwen2-VL logits parity against transformers' `Qwen2VLForConditionalGeneration` (fp32, tiny random weights)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import (
    AUDIO_END,
    AUDIO_PAD,
    AUDIO_START,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    assert_padded_row_alone,
    left_padded,
    pixels,
    prompt,
    tiny_qwen2vl,
    vision_block,
    write_hub_layout,
)

import qva
from qva.model import QVAModel
from weights_loader import CheckpointError

TOL = 1e-4


def reference_logits(ref, input_ids, attention_mask=None, **media):
    types = (input_ids == IMAGE_PAD).int() + 2 * (input_ids == VIDEO_PAD).int()
    with torch.no_grad():
        return ref(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=types, **media).logits


def assert_parity(ours: QVAModel, ref, input_ids, attention_mask=None, **media) -> float:
    with torch.no_grad():
        got = ours(input_ids, attention_mask=attention_mask, **media).logits
    want = reference_logits(ref, input_ids, attention_mask, **media)
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    err = (got - want)[keep].abs().max().item()
    assert err <= TOL, err
    assert want[keep].abs().max() > 1.0  # the comparison is not of near-zero logits
    return err


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    ref = tiny_qwen2vl(seed=0, tie=True).eval()
    saved = tmp_path_factory.mktemp("tied")
    ref.save_pretrained(saved)
    return ref, qva.load(saved), saved


def test_text_only(tied):
    ref, ours, _ = tied
    assert_parity(ours, ref, torch.tensor([prompt(9707, 11, 1879, 0, 358, 1079)]))


def test_one_image(tied):
    ref, ours, _ = tied
    px, grid = pixels([[1, 4, 6]])
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 4, 6]), 3838, 374, 419, 30)])
    assert_parity(ours, ref, ids, pixel_values=px, image_grid_thw=grid)


def test_two_images_of_different_sizes(tied):
    ref, ours, _ = tied
    grids = [[1, 4, 6], [1, 6, 2]]
    px, grid = pixels(grids, seed=1)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, grids[0]), 3838, vision_block(IMAGE_PAD, grids[1]), 30, 31)])
    assert_parity(ours, ref, ids, pixel_values=px, image_grid_thw=grid)


def test_one_video(tied):
    ref, ours, _ = tied
    px, grid = pixels([[2, 4, 6]], seed=2)  # 2 temporal steps ≤ max(h, w)/2: both position semantics agree
    ids = torch.tensor([prompt(vision_block(VIDEO_PAD, [2, 4, 6]), 3838, 374)])
    assert_parity(ours, ref, ids, pixel_values_videos=px, video_grid_thw=grid)


def test_image_and_video_together(tied):
    ref, ours, _ = tied
    px, igrid = pixels([[1, 2, 4]], seed=3)
    pv, vgrid = pixels([[2, 4, 4]], seed=4)  # t ≤ max(h, w)/2, where transformers' positions equal the original's
    ids = torch.tensor([prompt(vision_block(VIDEO_PAD, [2, 4, 4]), 11, vision_block(IMAGE_PAD, [1, 2, 4]), 30)])
    assert_parity(ours, ref, ids, pixel_values=px, image_grid_thw=igrid, pixel_values_videos=pv, video_grid_thw=vgrid)


def test_left_padded_batch(tied):
    ref, ours, _ = tied
    px, grid = pixels([[1, 4, 4]], seed=5)
    short = prompt(9707, 1879)
    ids, mask = left_padded([prompt(vision_block(IMAGE_PAD, [1, 4, 4]), 3838, 374, 419), short])
    assert mask[1, : ids.shape[1] - len(short)].sum() == 0  # the second row is left-padded
    assert_parity(ours, ref, ids, mask, pixel_values=px, image_grid_thw=grid)
    assert_padded_row_alone(ours, ids, mask, short, pixel_values=px, image_grid_thw=grid)  # as that prompt run alone


def test_hub_layout_flat_config_sharded_tied(tied, tmp_path):
    ref, _, saved = tied
    hub = write_hub_layout(saved, tmp_path / "hub")
    cfg = json.loads((hub / "config.json").read_text())
    assert "text_config" not in cfg and cfg["rope_scaling"]["type"] == "mrope" and cfg["vision_config"]["in_chans"] == 3
    assert (hub / "model.safetensors.index.json").is_file()
    index = json.loads((hub / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and len(set(index.values())) > 1
    ours = qva.load(hub)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    px, grid = pixels([[1, 4, 6]], seed=6)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 4, 6]), 3838)])
    assert_parity(ours, ref, ids, pixel_values=px, image_grid_thw=grid)


def test_untied_lm_head(tmp_path):
    ref = tiny_qwen2vl(seed=7, tie=False).eval()
    ref.save_pretrained(tmp_path)
    ours = qva.load(tmp_path)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert not torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)
    px, grid = pixels([[1, 2, 2]], seed=8)
    assert_parity(ours, ref, torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 2, 2]), 30)]), pixel_values=px, image_grid_thw=grid)
    # a checkpoint that says untied but has no lm_head is refused clearly
    cfg = json.loads((tmp_path / "config.json").read_text())
    from weights_loader import Checkpoint
    from weights_loader.writer import save_checkpoint

    ck = Checkpoint(tmp_path)
    save_checkpoint(tmp_path / "nolm", {n: ck.read(n) for n in ck.names() if n != "lm_head.weight"}, cfg)
    with pytest.raises(CheckpointError, match="tie_word_embeddings=false but there is no lm_head.weight"):
        qva.load(tmp_path / "nolm")


def test_wrong_patch_order_or_positions_are_caught(tied):
    """The parity tests are sensitive: permuted patches or shifted positions break them."""
    ref, ours, _ = tied
    px, grid = pixels([[1, 4, 6]], seed=9)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 4, 6]), 3838, 374)])
    want = reference_logits(ref, ids, pixel_values=px, image_grid_thw=grid)
    with torch.no_grad():
        swapped = ours(ids, pixel_values=px[torch.randperm(px.shape[0], generator=torch.Generator().manual_seed(0))], image_grid_thw=grid).logits
        pos, _ = ours.position_ids(ids, None, grid, None)
        shifted = ours(ids, pixel_values=px, image_grid_thw=grid, position_ids=pos.roll(1, dims=0)).logits
    assert (swapped - want).abs().max() > 100 * TOL
    assert (shifted - want).abs().max() > 100 * TOL


def test_bf16_close_to_fp32(tied, tmp_path):
    _, ours32, saved = tied
    ours16 = qva.load(saved, dtype=torch.bfloat16)
    assert ours16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    px, grid = pixels([[1, 4, 4]], seed=10)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 4, 4]), 3838, 374)])
    with torch.no_grad():
        a = ours32(ids, pixel_values=px, image_grid_thw=grid).logits
        b = ours16(ids, pixel_values=px, image_grid_thw=grid).logits.float()
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-4 < rel < 0.05  # stated tolerance: 5% relative L2 over all logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8


def test_logits_to_keep_and_few_row_head(tied):
    _, ours32, saved = tied
    ids = torch.tensor([prompt(9707, 11, 358, 1079), prompt(3838, 374, 419, 30)])
    with torch.no_grad():
        full = ours32(ids).logits
        last = ours32(ids, logits_to_keep=1).logits
        assert last.shape == (2, 1, full.shape[-1]) and (last - full[:, -1:]).abs().max() < 1e-5
        ours16 = qva.load(saved, dtype=torch.bfloat16)
        few = ours16(ids, logits_to_keep=2).logits  # 4 rows: products over the bf16 head as stored
        many = ours16(ids).logits  # fp32 products over the upcast head (this CPU has no fast bf16)
    assert few.dtype == many.dtype
    rel = ((few - many[:, -2:]).norm() / many.norm()).item()
    assert rel < 0.01


def test_unsupported_model_type(tied, tmp_path):
    _, _, saved = tied
    cfg = json.loads((saved / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_vl_moe"}))
    with pytest.raises(CheckpointError, match="qwen3_vl_moe.*not supported.*qwen2_vl"):
        qva.load(tmp_path)


def test_bad_pixel_shapes(tied):
    _, ours, _ = tied
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 4, 6]))])
    with pytest.raises(ValueError, match=r"pixel_values must be \[24, 1176\]"):
        ours(ids, pixel_values=torch.zeros(23, 1176), image_grid_thw=torch.tensor([[1, 4, 6]]))


# -- bad inputs to forward: a ValueError naming the argument, before any compute -----------------------------
def nan_at(t: torch.Tensor, i: int = 3) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[i] = float("nan")
    return t


def bad_forward_cases():
    from qva.audio import log_mel

    img = prompt(vision_block(IMAGE_PAD, [1, 4, 4]))
    px, grid = pixels([[1, 4, 4]])
    feats, valid = log_mel(torch.randn(8000) * 0.1, 80)  # 0.5 s: 25 audio tokens
    aud = prompt(AUDIO_START, [AUDIO_PAD] * 25, AUDIO_END)
    t = torch.tensor
    return [
        ("context", {"input_ids": torch.ones(1, 5000, dtype=torch.long)}, "input_ids has 5000 tokens, over the model's context of 4096"),
        ("vocab high", {"input_ids": t([[1, 2, 151936]])}, "token id 151936, outside the vocabulary [0, 151936)"),
        ("vocab negative", {"input_ids": t([[1, -3, 2]])}, "token id -3, outside the vocabulary"),
        ("empty", {"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "input_ids must be a non-empty [batch, seq] integer tensor, got [1, 0]"),
        ("1-D", {"input_ids": t([1, 2, 3])}, "input_ids must be a non-empty [batch, seq] integer tensor, got [3]"),
        ("float ids", {"input_ids": t([[1.0, 2.0]])}, "input_ids must be a non-empty [batch, seq] integer tensor"),
        ("mask shape", {"input_ids": t([[1, 2, 3]]), "attention_mask": t([[1, 1]])}, "attention_mask must have input_ids' shape [1, 3], got [1, 2]"),
        ("image without pixels", {"input_ids": t([img])}, "4 image placeholder token(s) (id 151655) but no pixel_values were given"),
        ("image count", {"input_ids": t([prompt(VISION_START, [IMAGE_PAD] * 3, VISION_END)]), "pixel_values": px, "image_grid_thw": grid},
         "3 image placeholder token(s) (id 151655) but pixel_values make 4 image rows"),
        ("NaN pixels", {"input_ids": t([img]), "pixel_values": nan_at(px), "image_grid_thw": grid}, "pixel_values has 1 NaN/inf value(s)"),
        ("audio without features", {"input_ids": t([aud])}, "25 audio placeholder token(s) (id 151659) but no input_features were given"),
        ("audio count", {"input_ids": t([prompt(AUDIO_START, [AUDIO_PAD] * 21, AUDIO_END)]), "input_features": feats, "audio_valid_frames": valid},
         "21 audio placeholder token(s) (id 151659) but input_features make 25 audio rows"),
        ("NaN features", {"input_ids": t([aud]), "input_features": nan_at(feats), "audio_valid_frames": valid}, "input_features has 1 NaN/inf value(s)"),
        ("inf features", {"input_ids": t([aud]), "input_features": feats.index_fill(2, t([7]), float("inf")), "audio_valid_frames": valid},
         "input_features has 80 NaN/inf value(s)"),
    ]


@pytest.mark.parametrize("case", range(len(bad_forward_cases())), ids=[c[0] for c in bad_forward_cases()])
def test_bad_forward_inputs(demo_dirs, case, monkeypatch):
    import qva

    _, inputs, message = bad_forward_cases()[case]
    model = qva.load(demo_dirs[0], whisper=demo_dirs[1])
    for part in (model.visual, model.audio_encoder, model.model):
        monkeypatch.setattr(part, "forward", lambda *a, **k: pytest.fail("computed before checking the inputs"))
    with pytest.raises(ValueError) as e:
        model(**inputs)
    assert message in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=re.escape(message)):
        model.generate(**inputs, max_new_tokens=0)
