"""Qwen2-VL logits parity against transformers' `Qwen2VLForConditionalGeneration` (fp32, tiny random weights)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, left_padded, tiny_qwen2vl, write_hub_layout

from qva.model import QVAModel
from weights_loader import CheckpointError

TOL = 1e-4


def vision_block(pad: int, grid: list[int]) -> list[int]:
    t, h, w = grid
    return [VISION_START] + [pad] * (t * h * w // 4) + [VISION_END]


def prompt(*parts) -> list[int]:
    ids = [151644, 872, 198]  # <|im_start|>user\n
    for p in parts:
        ids += p if isinstance(p, list) else [p]
    return ids + [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n


def pixels(grids: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 1176, generator=torch.Generator().manual_seed(seed)), torch.tensor(grids)


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
    return ref, QVAModel.from_pretrained(saved), saved


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
    pad = ids.shape[1] - len(short)
    assert_parity(ours, ref, ids, mask, pixel_values=px, image_grid_thw=grid)
    # the padded row equals that prompt run alone
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask, pixel_values=px, image_grid_thw=grid).logits[1, pad:]
        alone = ours(torch.tensor([short])).logits[0]
    assert (batched - alone).abs().max().item() <= TOL


def test_hub_layout_flat_config_sharded_tied(tied, tmp_path):
    ref, _, saved = tied
    hub = write_hub_layout(saved, tmp_path / "hub")
    cfg = json.loads((hub / "config.json").read_text())
    assert "text_config" not in cfg and cfg["rope_scaling"]["type"] == "mrope" and cfg["vision_config"]["in_chans"] == 3
    assert (hub / "model.safetensors.index.json").is_file()
    index = json.loads((hub / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and len(set(index.values())) > 1
    ours = QVAModel.from_pretrained(hub)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    px, grid = pixels([[1, 4, 6]], seed=6)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 4, 6]), 3838)])
    assert_parity(ours, ref, ids, pixel_values=px, image_grid_thw=grid)


def test_untied_lm_head(tmp_path):
    ref = tiny_qwen2vl(seed=7, tie=False).eval()
    ref.save_pretrained(tmp_path)
    ours = QVAModel.from_pretrained(tmp_path)
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
        QVAModel.from_pretrained(tmp_path / "nolm")


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
    ours16 = QVAModel.from_pretrained(saved, dtype=torch.bfloat16)
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
        ours16 = QVAModel.from_pretrained(saved, dtype=torch.bfloat16)
        few = ours16(ids, logits_to_keep=2).logits  # 4 rows: products over the bf16 head as stored
        many = ours16(ids).logits  # fp32 products over the upcast head (this CPU has no fast bf16)
    assert few.dtype == many.dtype
    rel = ((few - many[:, -2:]).norm() / many.norm()).item()
    assert rel < 0.01


def test_unsupported_model_type(tied, tmp_path):
    _, _, saved = tied
    cfg = json.loads((saved / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2_5_vl"}))
    with pytest.raises(CheckpointError, match="qwen2_5_vl.*not supported.*qwen2_vl"):
        QVAModel.from_pretrained(tmp_path)


def test_bad_pixel_shapes(tied):
    _, ours, _ = tied
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 4, 6]))])
    with pytest.raises(ValueError, match=r"pixel_values must be \[24, 1176\]"):
        ours(ids, pixel_values=torch.zeros(23, 1176), image_grid_thw=torch.tensor([[1, 4, 6]]))
