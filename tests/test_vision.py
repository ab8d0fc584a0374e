"""Vision tower parity with transformers, block-diagonal attention, merge-window order sensitivity."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_, tiny_qwen2vl_config

from qva.qwen2vl_config import VisionConfig
from qva.vision import VisionTransformer, attention_segments, patch_hw_ids


@pytest.fixture(scope="module")
def towers():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
    )

    torch.manual_seed(0)
    ref = perturb_(Qwen2VisionTransformerPretrainedModel._from_config(tiny_qwen2vl_config().vision_config), 0)
    ours = VisionTransformer(VisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=4)).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(model, grids, seed=0, ref=False):
    grid = torch.tensor(grids)
    x = torch.randn(int(grid.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x, grid_thw=grid).pooler_output if ref else model(x, grid)


@pytest.mark.parametrize("grids", [[[1, 4, 6]], [[1, 4, 6], [1, 2, 8], [1, 4, 6]], [[3, 4, 4]], [[1, 2, 2], [2, 6, 4]]])
def test_parity(towers, grids):
    ref, ours = towers
    want, got = run(ref, grids, ref=True), run(ours, grids)
    assert got.shape == (sum(t * h * w for t, h, w in grids) // 4, 64)
    assert (got - want).abs().max().item() <= 1e-4


def test_images_do_not_attend_to_each_other(towers):
    _, ours = towers
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    x = torch.randn(32, 1176)
    with torch.no_grad():
        both = ours(x, grid)
        first = ours(x[:16], grid[:1])
        y = x.clone()
        y[16:] = torch.randn(16, 1176)
        changed = ours(y, grid)
    assert (both[:4] - first).abs().max() <= 1e-5  # image 1 unaffected by image 2 in the same pass
    assert (changed[:4] - both[:4]).abs().max() <= 1e-5


def test_patch_order_matters(towers):
    ref, ours = towers
    grid = torch.tensor([[1, 4, 6]])
    x = torch.randn(24, 1176)
    with torch.no_grad():
        want = ref(x, grid_thw=grid).pooler_output
        got = ours(x[torch.randperm(24, generator=torch.Generator().manual_seed(1))], grid)
    assert (got - want).abs().max() > 1e-2


def test_hw_ids_are_merge_window_major():
    ids = patch_hw_ids([[1, 2, 4]], merge=2)
    assert ids.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]


def test_segments_group_equal_slices():
    assert attention_segments([[1, 4, 4], [1, 4, 4], [2, 2, 4], [1, 4, 4]]) == [(0, 16, 2), (32, 8, 2), (48, 16, 1)]
