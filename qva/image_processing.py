"""Images and videos → Qwen2-VL pixel rows, equal to `Qwen2VLImageProcessor` (PIL backend).

RGB (alpha composited onto white) → `smart_resize` to multiples of 28 within [min_pixels, max_pixels]
→ PIL bicubic → ×1/255 → CLIP mean/std → cut into 14×14 patches, two frames deep (an image is its own
second frame; a video with an odd frame count repeats its last), emitted 2×2-merge-window-major:
rows of 3·2·14·14 = 1176 values, `grid_thw` = (frames/2, h/14, w/14).

Qwen3-VL (16-pixel patches, factor 32, mean/std 0.5 from its preprocessor_config.json) sizes a video's frames
together (`smart_resize_frames`): its min/max pixels bound all frames at once.

`video_frames` is the one video decoder (a folder of frames, an animated GIF/WebP, an opened PIL image):
`qva-generate`, the server (`qva.serve.media`) and `process_video` all read videos through it.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageSequence, UnidentifiedImageError

from weights_loader import CheckpointError, Fields

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image or video that cannot be used: the message names it and says why."""


@dataclass
class VisionPreprocessConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    frames_share_pixels: bool = False  # Qwen3-VL videos: min/max pixels bound all frames together, not each

    @classmethod
    def from_dict(cls, d: dict, source: str = "preprocessor_config.json") -> "VisionPreprocessConfig":
        """Read and check the fields (a wrong type or impossible value names the file and field)."""
        f = Fields(d, source)
        size = f.sub("size") if d.get("size") is not None else Fields({}, source, "size.")
        min_pixels = f.int("min_pixels") if "min_pixels" in f else size.int("shortest_edge", cls.min_pixels)
        max_pixels = f.int("max_pixels") if "max_pixels" in f else size.int("longest_edge", cls.max_pixels)
        if min_pixels > max_pixels:
            raise f.error("min_pixels", f"{min_pixels} must not exceed max_pixels {max_pixels}")
        return cls(
            min_pixels=min_pixels, max_pixels=max_pixels, patch_size=f.int("patch_size", 14),
            temporal_patch_size=f.int("temporal_patch_size", 2), merge_size=f.int("merge_size", 2),
            image_mean=tuple(f.floats("image_mean", CLIP_MEAN, length=3)),
            image_std=tuple(f.floats("image_std", CLIP_STD, length=3, positive=True)),
        )

    def check_against(self, vision, source: str) -> None:
        """The patch geometry must be the vision tower's (`vision`: the model's VisionConfig)."""
        for ours, theirs in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                             ("merge_size", "spatial_merge_size")):
            if getattr(self, ours) != getattr(vision, theirs):
                raise CheckpointError(
                    f"{source}: field {ours!r} is {getattr(self, ours)} but the model's vision_config.{theirs} is "
                    f"{getattr(vision, theirs)}"
                )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size  # 28


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Sides rounded to multiples of `factor` (Python's banker's `round`), area brought into [min, max]."""
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ImageError(f"{name} must be a positive integer, got {value!r}")
    if min_pixels > max_pixels:
        raise ImageError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    if min(height, width) <= 0:
        raise ImageError(f"image has an empty side: {height}×{width}")
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio must be at most 200, got {height}×{width} ({max(height, width) / min(height, width):.1f})")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def smart_resize_frames(frames: int, height: int, width: int, temporal: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video sizing: sides rounded to multiples of `factor`, the pixels of all frames (their count
    rounded to a multiple of `temporal`) brought into [min, max]; sides below `factor` are first scaled up."""
    if min(height, width) <= 0:
        raise ImageError(f"video frames have an empty side: {height}×{width}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio must be at most 200, got {height}×{width} ({max(height, width) / min(height, width):.1f})")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = max(temporal, round(frames / temporal) * temporal)
    if t * h * w > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image, name: str = "image") -> Image.Image:
    """A PIL RGB image from a path, a PIL image (any mode) or a uint8 array `[H, W]`/`[H, W, C]`/`[C, H, W]`."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        try:
            with warnings.catch_warnings():  # sizes are checked below, with a clearer message than PIL's warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    check_pixel_count(im.width, im.height, str(path))
                    im.load()
                    image = im.copy()
        except Image.DecompressionBombError as e:
            raise ImageError(f"{path}: too many pixels to decode safely ({e})") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ImageError(f"{path}: cannot read as an image ({type(e).__name__}: {e})") from None
        name = str(path)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        arr = image.numpy() if isinstance(image, torch.Tensor) else image
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # [C, H, W] → [H, W, C]
        if arr.dtype != np.uint8:
            raise ImageError(f"{name}: arrays must be uint8 RGB(A) pixels, got dtype {arr.dtype}")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
            raise ImageError(f"{name}: expected [H, W], [H, W, 3|4] or [3|4, H, W], got shape {list(arr.shape)}")
        check_pixel_count(arr.shape[1], arr.shape[0], name)
        image = Image.fromarray(arr)
    elif not isinstance(image, Image.Image):
        raise ImageError(f"{name}: expected a path, PIL image or uint8 array, got {type(image).__name__}")
    check_pixel_count(image.width, image.height, name)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def check_pixel_count(width: int, height: int, name: str) -> None:
    """Refuse images over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, None: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageError(
            f"{name}: {width}×{height} = {width * height} pixels is over the decompression-bomb limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS); downscale it first, or raise that limit if you trust the file"
        )


def _normalized(image: Image.Image, size: tuple[int, int], cfg: VisionPreprocessConfig) -> np.ndarray:
    """Resize (PIL bicubic) to `size` = (h, w), rescale and normalise: float32 `[3, h, w]`."""
    h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    x = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return x.transpose(2, 0, 1)


def patchify(frames: np.ndarray, cfg: VisionPreprocessConfig) -> tuple[torch.Tensor, list[int]]:
    """frames `[T, C, H, W]` (T a multiple of 2) → rows `[T/2 · H/14 · W/14, C·2·14·14]` and grid (t, h, w)."""
    t, c, h, w = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    rows = rearrange(
        torch.from_numpy(np.ascontiguousarray(frames)),
        "(gt tp) c (hb mh ph) (wb mw pw) -> (gt hb wb mh mw) (c tp ph pw)",
        tp=tp, mh=m, ph=p, mw=m, pw=p,
    )
    return rows.contiguous(), [t // tp, h // p, w // p]


def pixel_bounds(cfg, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """(min, max) pixels: the call's where given, else the processor config's."""
    return (cfg.min_pixels if min_pixels is None else min_pixels, cfg.max_pixels if max_pixels is None else max_pixels)


def process_image(image, cfg: VisionPreprocessConfig, min_pixels: int | None = None, max_pixels: int | None = None):
    """One image → (rows `[N, 1176]` float32, grid [1, h/14, w/14])."""
    rgb = to_rgb(image)
    size = smart_resize(rgb.height, rgb.width, cfg.factor, *pixel_bounds(cfg, min_pixels, max_pixels))
    x = _normalized(rgb, size, cfg)
    return patchify(np.repeat(x[None], cfg.temporal_patch_size, axis=0), cfg)


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # the frames of a video folder


def frame_count(im: Image.Image) -> int:
    """Frames of an opened (not yet decoded) image from its headers alone: GIF counts by skipping through frame
    headers, WebP and APNG read it; a still image is 1. ImageError (from Pillow's) when they cannot be read."""
    try:
        return int(getattr(im, "n_frames", 1))
    except Exception as e:  # Pillow raises many kinds for a broken file
        raise ImageError(f"cannot count the video's frames ({type(e).__name__}: {e})") from e


def video_frames(source) -> list[Image.Image]:
    """The one video decoder: a folder of frames (sorted by name), an animated GIF/WebP file (a still image is one
    frame), or an opened PIL image → its RGB frames. Every problem is an ImageError; one Pillow raised while
    decoding a file's frames is its `__cause__`."""
    if isinstance(source, Image.Image):
        try:
            return [f.convert("RGB") for f in ImageSequence.Iterator(source)]
        except Exception as e:  # Pillow raises many kinds for a truncated or broken file
            raise ImageError(f"cannot decode the video frames ({type(e).__name__}: {e})") from e
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ImageError(f"{path}: no image frames (.png/.jpg/.jpeg/.webp/.bmp) in the folder")
        return [to_rgb(p) for p in files]
    if not path.is_file():
        raise ImageError(f"{path}: no such video")
    try:
        with Image.open(path) as im:
            return video_frames(im)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from e.__cause__
    except Exception as e:  # not an image Pillow reads (UnidentifiedImageError, DecompressionBombError, …)
        raise ImageError(f"{path}: cannot decode as a video ({type(e).__name__}: {e})") from e


def video_input(video) -> list:
    """`process_video`'s input as a list of frames: a list/tuple of images, an array `[T, H, W, 3]`, or a folder of images."""
    if isinstance(video, (str, os.PathLike)):
        folder = Path(video)
        if not folder.is_dir():
            raise ImageError(f"{folder}: videos are given as a folder of frames (or a list/array of frames)")
        return video_frames(folder)
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim != 4:
            raise ImageError(f"video array must be [T, H, W, C], got shape {list(video.shape)}")
        return list(video)
    frames = list(video)
    if not frames:
        raise ImageError("video has no frames")
    return frames


def process_video(video, cfg: VisionPreprocessConfig, min_pixels: int | None = None, max_pixels: int | None = None):
    """Frames → (rows `[T/2 · h/14 · w/14, 1176]`, grid [T/2, h/14, w/14]); odd T repeats the last frame."""
    frames = [to_rgb(f, f"video frame {i}") for i, f in enumerate(video_input(video))]
    sizes = {f.size for f in frames}
    if len(sizes) != 1:
        raise ImageError(f"video frames differ in size: {sorted(sizes)}")
    lo, hi = pixel_bounds(cfg, min_pixels, max_pixels)
    if cfg.frames_share_pixels:
        size = smart_resize_frames(len(frames), frames[0].height, frames[0].width, cfg.temporal_patch_size, cfg.factor, lo, hi)
    else:
        size = smart_resize(frames[0].height, frames[0].width, cfg.factor, lo, hi)
    x = np.stack([_normalized(f, size, cfg) for f in frames])  # [T, 3, h, w]
    if len(frames) % cfg.temporal_patch_size:
        pad = cfg.temporal_patch_size - len(frames) % cfg.temporal_patch_size
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return patchify(x, cfg)
