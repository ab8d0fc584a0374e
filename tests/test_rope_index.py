"""3-axis position ids: equal to transformers where the semantics agree, original Qwen2-VL where they differ."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, tiny_qwen2vl_config

from qva.rope_index import rope_index, vision_block_ids


def block(pad, grid):
    t, h, w = grid
    return [VISION_START] + [pad] * (t * h * w // 4) + [VISION_END]


def ours(ids, mask=None, igrid=None, vgrid=None):
    return rope_index(ids, mask, igrid, vgrid, image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, spatial_merge_size=2)


def reference(ids, mask=None, igrid=None, vgrid=None):
    from transformers import Qwen2VLModel

    with torch.device("meta"):
        model = Qwen2VLModel(tiny_qwen2vl_config())
    types = (ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int()
    return model.get_rope_index(ids, types, igrid, vgrid, mask)


@pytest.mark.parametrize(
    "case",
    ["image", "two_images", "short_video", "video_and_image", "padded_batch"],
)
def test_equal_to_transformers_where_semantics_agree(case):
    mask = igrid = vgrid = None
    if case == "image":
        ids = [1, 2] + block(IMAGE_PAD, [1, 4, 6]) + [3, 4, 5]
        igrid = [[1, 4, 6]]
    elif case == "two_images":
        ids = [1] + block(IMAGE_PAD, [1, 8, 2]) + [3] + block(IMAGE_PAD, [1, 2, 10]) + [7]
        igrid = [[1, 8, 2], [1, 2, 10]]
    elif case == "short_video":
        ids = [1] + block(VIDEO_PAD, [3, 6, 8]) + [2, 3]
        vgrid = [[3, 6, 8]]
    elif case == "video_and_image":
        ids = block(IMAGE_PAD, [1, 4, 4]) + [5] + block(VIDEO_PAD, [2, 4, 4]) + [6]
        igrid, vgrid = [[1, 4, 4]], [[2, 4, 4]]
    else:
        a = [1, 2] + block(IMAGE_PAD, [1, 4, 4]) + [3]
        b = [4] + block(IMAGE_PAD, [1, 2, 2]) + [5]
        ids = [a, [0] * (len(a) - len(b)) + b]
        mask = torch.tensor([[1] * len(a), [0] * (len(a) - len(b)) + [1] * len(b)])
        igrid = [[1, 4, 4], [1, 2, 2]]
    ids = torch.tensor([ids] if isinstance(ids[0], int) else ids)
    igrid = torch.tensor(igrid) if igrid else None
    vgrid = torch.tensor(vgrid) if vgrid else None
    pos, delta = ours(ids, mask, igrid, vgrid)
    ref_pos, ref_delta = reference(ids, mask, igrid, vgrid)
    keep = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    assert torch.equal(pos[:, keep], ref_pos[:, keep])
    assert delta.flatten().tolist() == ref_delta.flatten().tolist()


def test_long_video_uses_original_semantics():
    """grid (10, 4, 4): 10 temporal steps, 2×2 merged spatial grid. Text after it starts at max + 1 = s + 10."""
    s = 3
    ids = torch.tensor([[7, 8, VISION_START] + [VIDEO_PAD] * 40 + [VISION_END, 9]])
    pos, delta = ours(ids, vgrid=torch.tensor([[10, 4, 4]]))
    expected = torch.cat(
        [
            torch.arange(3).expand(3, -1),  # 7, 8, <|vision_start|>
            torch.stack(
                [
                    s + torch.arange(10).repeat_interleave(4),  # t: one step per temporal patch
                    s + torch.tensor([0, 0, 1, 1]).repeat(10),  # h
                    s + torch.tensor([0, 1, 0, 1]).repeat(10),  # w
                ]
            ),
            torch.tensor([[13, 14]]).expand(3, -1),  # <|vision_end|> at max(12) + 1, then 14
        ],
        dim=1,
    )
    assert torch.equal(pos[:, 0], expected)
    assert delta.item() == 15 - ids.shape[1]
    # transformers 5.x advances by max(h, w)/2 = 2 instead, so it differs here by design
    ref_pos, _ = reference(ids, vgrid=torch.tensor([[10, 4, 4]]))
    assert ref_pos[0, 0, -1].item() == s + 2 + 1 != pos[0, 0, -1].item()


def test_text_only_and_left_padding():
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, delta = ours(ids, mask)
    assert pos[:, 0].tolist() == [[1, 1, 0, 1, 2]] * 3  # padded slots hold a constant
    assert pos[:, 1].tolist() == [[0, 1, 2, 3, 4]] * 3
    assert delta.flatten().tolist() == [0, 0]


def test_audio_like_tokens_are_text():
    ids = torch.tensor([[1, 151657, 151659, 151659, 151658, 2]])
    pos, _ = ours(ids)
    assert pos[0, 0].tolist() == list(range(6))


def test_vision_block_ids_order_is_t_h_w_row_major():
    ids = vision_block_ids(5, 2, 2, 3)
    assert ids.shape == (3, 12)
    assert ids[:, :4].tolist() == [[5, 5, 5, 5], [5, 5, 5, 6], [5, 6, 7, 5]]


def test_mismatched_grids_are_errors():
    ids = torch.tensor([[1] + block(IMAGE_PAD, [1, 4, 4]) + [2]])
    with pytest.raises(ValueError, match="more image placeholder blocks than image_grid_thw rows"):
        ours(ids)
    with pytest.raises(ValueError, match="needs 8 consecutive placeholder tokens"):
        ours(ids, igrid=torch.tensor([[2, 4, 4]]))
