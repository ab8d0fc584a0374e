"""Image and video pixels equal to transformers' `Qwen2VLImageProcessorPil` (≤ 1e-6)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qva.image_processing import (
    ImageError,
    VisionPreprocessConfig,
    process_image,
    process_video,
    smart_resize,
)

MIN, MAX = 56 * 56, 160_000  # a small max keeps "over max_pixels" inputs cheap
CFG = VisionPreprocessConfig(min_pixels=MIN, max_pixels=MAX)


def reference(images, min_pixels=MIN, max_pixels=MAX):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    out = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images=images, return_tensors="pt")
    return out.pixel_values, out.image_grid_thw


def noise_image(h, w, mode="RGB", seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(arr, "RGBA")
    img = Image.fromarray(arr[..., :3], "RGB")
    return img if mode == "RGB" else img.convert(mode)


@pytest.mark.parametrize(
    "h,w,mode",
    [
        (20, 15, "RGB"),  # tiny: smaller than one 28-px merge window
        (100, 300, "RGBA"),  # alpha composited onto white
        (333, 500, "L"),
        (1000, 1300, "RGB"),  # far over max_pixels
        (64, 64, "CMYK"),
        (57, 1200, "RGB"),  # wide
        (777, 90, "P"),  # tall, palette
        (224, 224, "RGB"),  # already a multiple of 28
    ],
)
def test_pixels_match_reference(h, w, mode):
    img = noise_image(h, w, mode, seed=h + w)
    rows, grid = process_image(img, CFG)
    ref_rows, ref_grid = reference([img])
    assert [1, *grid[1:]] == ref_grid[0].tolist() == grid
    assert rows.shape == ref_rows.shape
    assert (rows - ref_rows).abs().max().item() <= 1e-6
    assert grid[1] * grid[2] * 14 * 14 <= MAX and grid[1] * grid[2] * 14 * 14 >= MIN


def test_paths_arrays_and_tensors_agree(tmp_path):
    img = noise_image(90, 120, seed=3)
    img.save(tmp_path / "x.png")
    arr = np.array(img)  # writable copy
    want, _ = process_image(img, CFG)
    for source in (tmp_path / "x.png", str(tmp_path / "x.png"), arr, torch.from_numpy(arr).permute(2, 0, 1)):
        got, _ = process_image(source, CFG)
        assert torch.equal(got, want)


def test_per_call_pixel_limits_override():
    img = noise_image(500, 500, seed=4)
    _, grid = process_image(img, CFG, max_pixels=28 * 28 * 4)
    assert grid == [1, 4, 4]
    rows, ref_grid = reference([img], max_pixels=28 * 28 * 4)
    assert ref_grid[0].tolist() == grid


def framewise_reference_video(frames, min_pixels=MIN, max_pixels=MAX):
    """Reference video rows: each frame through the PIL image processor, then paired along time in the
    documented order (rows are (C, T, 14, 14) per 2×2-window-major patch)."""
    per_frame = [reference([f], min_pixels, max_pixels) for f in frames]
    if len(frames) % 2:
        per_frame.append(per_frame[-1])  # odd T: the last frame is repeated
    rows = [r.view(r.shape[0], 3, 2, 14, 14)[:, :, 0] for r, _ in per_frame]  # one frame's patches [N, C, 14, 14]
    pairs = [torch.stack([rows[i], rows[i + 1]], dim=2).flatten(1) for i in range(0, len(rows), 2)]
    _, g = per_frame[0]
    return torch.cat(pairs), [len(pairs), *g[0, 1:].tolist()]


@pytest.mark.parametrize("n_frames", [3, 4])
def test_video_matches_framewise_reference(n_frames):
    frames = [noise_image(150, 200, seed=10 + i) for i in range(n_frames)]
    rows, grid = process_video(frames, CFG)
    ref_rows, ref_grid = framewise_reference_video(frames)
    assert grid == ref_grid == [2, *ref_grid[1:]]
    assert (rows - ref_rows).abs().max().item() <= 1e-6


def test_video_array_and_folder(tmp_path):
    frames = [noise_image(60, 80, seed=20 + i) for i in range(5)]
    as_array = np.stack([np.asarray(f) for f in frames])  # [T, H, W, 3]
    for i, f in enumerate(frames):
        f.save(tmp_path / f"frame_{i:03d}.png")
    want, grid = process_video(frames, CFG)
    assert grid[0] == 3
    for source in (as_array, tmp_path):
        got, g = process_video(source, CFG)
        assert g == grid and torch.equal(got, want)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([(3136, 12845056), (56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 1280 * 28 * 28)]))
def test_smart_resize_equals_reference(h, w, limits):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as ref_resize,
    )

    if max(h, w) / min(h, w) > 200:
        with pytest.raises(ImageError, match="aspect ratio"):
            smart_resize(h, w, 28, *limits)
        return
    assert smart_resize(h, w, 28, *limits) == ref_resize(h, w, 28, *limits)


def test_smart_resize_bankers_rounding():
    assert smart_resize(42, 56) == (56, 56)  # 1.5 → 2
    assert smart_resize(70, 84) == (56, 84)  # 2.5 → 2 (banker's), not 3


def test_errors(tmp_path):
    with pytest.raises(ImageError, match="aspect ratio must be at most 200"):
        process_image(noise_image(10, 2100), CFG)
    with pytest.raises(ImageError, match="no such image file"):
        process_image(tmp_path / "missing.png", CFG)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageError, match="text.png: cannot read as an image"):
        process_image(tmp_path / "text.png", CFG)
    noise_image(200, 200).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:3000])
    with pytest.raises(ImageError, match="cut.png"):
        process_image(tmp_path / "cut.png", CFG)
    with pytest.raises(ImageError, match="uint8"):
        process_image(np.zeros((10, 10, 3), np.float32), CFG)
    with pytest.raises(ImageError, match="frames differ in size"):
        process_video([noise_image(60, 80), noise_image(80, 60)], CFG)
    with pytest.raises(ImageError, match="folder of frames"):
        process_video(tmp_path / "full.png", CFG)


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    """Over PIL's limit: a clear ImageError for files, arrays and PIL images alike (PIL itself warns up to
    2× the limit and raises its own DecompressionBombError beyond)."""
    from PIL import Image

    noise_image(100, 100).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 - 1)
    for source in (tmp_path / "big.png", noise_image(100, 100), np.zeros((100, 100, 3), np.uint8)):
        with pytest.raises(ImageError, match=r"100×100 = 10000 pixels is over the decompression-bomb limit of 9999"):
            process_image(source, CFG)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # beyond 2×: PIL raises while opening
    with pytest.raises(ImageError, match=r"big.png: too many pixels to decode safely"):
        process_image(tmp_path / "big.png", CFG)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit set: nothing refused
    assert process_image(tmp_path / "big.png", CFG)[1] == [1, 8, 8]


@pytest.mark.parametrize("limits,message", [
    ((0, 10000), "min_pixels must be a positive integer, got 0"),
    ((3136, -1), "max_pixels must be a positive integer, got -1"),
    ((8000, 4000), "min_pixels (8000) must not exceed max_pixels (4000)"),
])
def test_bad_pixel_limits(limits, message):
    with pytest.raises(ImageError, match=re.escape(message)):
        process_image(noise_image(50, 50), CFG, *limits)
