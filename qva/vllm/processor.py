"""vLLM's multimodal processing for a qva graft, with qva's own preprocessing (so vLLM's inputs are qva's).

vLLM tokenizes the prompt itself, then calls a processor on the media alone and expands each placeholder
token by the count that processor reports. Here every step is qva's:

- images / videos: `qva.image_processing` (`smart_resize`, PIL bicubic, merge-window patch order), not
  transformers' image processor: the pixel rows are the ones `qva.Processor` gives;
- audio: any rate and channel count → 16 kHz mono with `qva.load_audio` (qva's polyphase sinc resampler; the
  data parser does it, not vLLM's resampler), then `qva.log_mel` (30 s windows, consecutive, nothing dropped);
- `<|audio_pad|>` becomes `audio_token_count(valid, audio_frames, audio_pool)` pads per window, summed per clip
  (`<|audio_start|>` / `<|audio_end|>` stay around them, from the chat template);
- "audio" is declared in the supported limits (`--limit-mm-per-prompt '{"audio": N}'`); the dummy audio used
  for vLLM's memory profiling is the longest clip whose tokens fit the context.

Per audio item the kwargs are `input_features` `[windows, mels, 3000]` and `audio_valid_frames` `[windows]`
(both flat over windows, so items with different window counts batch), and `audio_windows`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLMultiModalDataParser,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
    _create_qwen2vl_field_factory,
)
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import AudioProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from ..audio import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE, audio_token_count, clip_tokens, load_audio, log_mel
from ..image_processing import VisionPreprocessConfig, process_image, process_video
from ..processor import AUDIO_PAD, AUDIO_TOKENS, IMAGE_PAD, VIDEO_PAD, Processor
from ..qwen2vl_config import Qwen2VLConfig

AUDIO_START, AUDIO_END = AUDIO_TOKENS[0], AUDIO_TOKENS[1]
SAMPLES_PER_TOKEN = 2 * HOP_LENGTH  # one encoder frame: 320 samples (20 ms)


def model_folder(model: str) -> Path:
    """The local folder of the served model (a path, or a Hub id vLLM has already downloaded)."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # vLLM downloads the weights; configs only here

    return Path(snapshot_download(model, allow_patterns=["*.json"]))


@functools.lru_cache(maxsize=4)
def qva_processor(model: str) -> tuple[Qwen2VLConfig, Processor]:
    """qva's config and processor of the served folder (read once per process)."""
    folder = model_folder(model)
    config = Qwen2VLConfig.from_pretrained(folder)
    if config.audio is None:
        raise ValueError(f"{folder}: not a qva graft (no audio encoder in config.json); serve it as Qwen2-VL")
    return config, Processor.from_pretrained(folder, config=config)


def max_clip_samples(max_tokens: int, frames: str, pool: int) -> int:
    """The most 16 kHz samples whose `clip_tokens` fit in `max_tokens` (0 if not even one sample fits)."""
    lo, hi = 0, max(1, max_tokens) * pool * SAMPLES_PER_TOKEN + N_SAMPLES
    while lo < hi:  # clip_tokens grows with the length: the largest n with clip_tokens(n) <= max_tokens
        mid = (lo + hi + 1) // 2
        if clip_tokens(mid, frames, pool) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ImageProcessorView:
    """What vLLM's Qwen2-VL code reads off an HF image processor, from qva's `VisionPreprocessConfig`."""

    def __init__(self, cfg: VisionPreprocessConfig):
        self.config = cfg
        self.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
        self.min_pixels, self.max_pixels = cfg.min_pixels, cfg.max_pixels
        self.patch_size, self.temporal_patch_size, self.merge_size = cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size


class QVAHFProcessor:
    """Stands where vLLM expects a transformers processor: the token strings, the image processor's sizes, and
    `__call__(images=, videos=, audio=)` → a `BatchFeature` of qva's preprocessing (no text: vLLM tokenizes)."""

    image_token, video_token, audio_token = IMAGE_PAD, VIDEO_PAD, AUDIO_PAD
    audio_start_token, audio_end_token = AUDIO_START, AUDIO_END

    def __init__(self, config: Qwen2VLConfig, processor: Processor):
        self.config, self.processor = config, processor
        self.image_processor = ImageProcessorView(processor.image_config)
        self.video_processor = ImageProcessorView(processor.video_config)

    def __call__(self, images=None, videos=None, audio=None, min_pixels: int | None = None, max_pixels: int | None = None,
                 return_tensors: str = "pt", **kwargs) -> BatchFeature:
        out: dict[str, torch.Tensor] = {}
        for key, items, fn, cfg in (("image", images, process_image, self.processor.image_config),
                                    ("video", videos, process_video, self.processor.video_config)):
            if not items:
                continue
            rows, grids = zip(*(fn(x if key == "image" else _frames(x), cfg, min_pixels, max_pixels) for x in items))
            out["pixel_values" if key == "image" else "pixel_values_videos"] = torch.cat(rows)
            out[f"{key}_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        if audio:
            feats, valid, windows = [], [], []
            for wave in audio:  # 16 kHz mono float32 already (QVADataParser)
                f, v = log_mel(torch.as_tensor(np.asarray(wave, dtype=np.float32)), self.config.audio.num_mel_bins)
                feats.append(f)
                valid.append(v)
                windows.append(f.shape[0])
            out["input_features"] = torch.cat(feats)  # [Σ windows, mels, 3000]
            out["audio_valid_frames"] = torch.cat(valid)  # [Σ windows]
            out["audio_windows"] = torch.tensor(windows, dtype=torch.long)  # [clips]
        return BatchFeature(out)


def _frames(video):
    """vLLM hands a video as (frames [T, H, W, 3], metadata) once decoded; qva takes the frames."""
    return video[0] if isinstance(video, tuple) else video


class QVADataParser(Qwen2VLMultiModalDataParser):
    """Audio items → 16 kHz mono float32 arrays with qva's `load_audio` (any rate: `(samples, rate)`; a bare
    array is taken as 16 kHz, as vLLM takes it). Images and videos: Qwen2-VL's parsing."""

    def _parse_audio_data(self, data):
        if data is None or self.is_embeddings(data) or isinstance(data, dict):
            return super()._parse_audio_data(data)
        if isinstance(data, tuple) or (isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 1) or (
                isinstance(data, list) and data and isinstance(data[0], float)):
            data = [data]
        waves: list[np.ndarray | None] = []
        for item in data:
            if item is None:  # a cached item (by uuid) sends no samples
                waves.append(None)
                continue
            samples, rate = self._get_audio_with_sr(item)
            waves.append(load_audio((samples, SAMPLE_RATE if rate is None else rate)).numpy())
        return AudioProcessorItems(waves)


class QVAProcessingInfo(Qwen2VLProcessingInfo):
    @functools.cached_property
    def qva(self) -> tuple[Qwen2VLConfig, Processor]:
        return qva_processor(self.ctx.model_config.model)

    def get_hf_processor(self, **kwargs: object) -> QVAHFProcessor:
        return QVAHFProcessor(*self.qva)

    def get_image_processor(self, **kwargs: object) -> ImageProcessorView:
        return self.get_hf_processor().image_processor

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        pixels = {"min_pixels", "max_pixels", "size"}
        return {"text_kwargs": set(), "images_kwargs": pixels, "videos_kwargs": pixels, "audio_kwargs": set()}

    def get_data_parser(self) -> QVADataParser:
        return QVADataParser(
            self.get_hf_config().vision_config.spatial_merge_size,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None, "audio": None}

    def max_audio_tokens(self, seq_len: int) -> int:
        """The most tokens one clip may take: as many as the context holds (long audio is several windows)."""
        return seq_len

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        out = dict(super().get_mm_max_tokens_per_item(seq_len, mm_counts))
        config, _ = self.qva
        samples = max_clip_samples(self.max_audio_tokens(seq_len), config.audio_frames, config.audio_pool)
        out["audio"] = clip_tokens(samples, config.audio_frames, config.audio_pool) if samples else 0
        return out


class QVADummyInputsBuilder(Qwen2VLDummyInputsBuilder):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        audio = (AUDIO_START + AUDIO_PAD + AUDIO_END) * mm_counts.get("audio", 0)
        return super().get_dummy_text(mm_counts) + audio

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options) -> dict[str, Any]:
        data = dict(super().get_dummy_mm_data(seq_len, mm_counts, mm_options))
        config, _ = self.info.qva
        length = max_clip_samples(self.info.max_audio_tokens(seq_len), config.audio_frames, config.audio_pool)
        data["audio"] = self._get_dummy_audios(length=max(length, 1), num_audios=mm_counts.get("audio", 0),
                                               overrides=mm_options.get("audio") if mm_options else None)
        return data


def audio_field_config(hf_inputs: Mapping[str, torch.Tensor]) -> dict[str, MultiModalFieldConfig]:
    windows = hf_inputs.get("audio_windows", torch.empty(0, dtype=torch.long))
    return dict(
        input_features=MultiModalFieldConfig.flat_from_sizes("audio", windows),
        audio_valid_frames=MultiModalFieldConfig.flat_from_sizes("audio", windows, keep_on_cpu=True),
        audio_windows=MultiModalFieldConfig.batched("audio", keep_on_cpu=True),
    )


class QVAMultiModalProcessor(Qwen2VLMultiModalProcessor):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        return self.info.ctx.call_hf_processor(self.info.get_hf_processor(), hf_data, hf_kwargs)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        return {**_create_qwen2vl_field_factory(merge)(hf_inputs), **audio_field_config(hf_inputs)}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        config, processor = self.info.qva
        pad = processor.audio_token_id

        def audio_pads(item_idx: int) -> list[int]:
            valid = out_mm_kwargs["audio"][item_idx]["audio_valid_frames"].data
            n = sum(audio_token_count(int(v), config.audio_frames, config.audio_pool) for v in valid.tolist())
            return [pad] * n

        updates.append(PromptReplacement(modality="audio", target=[pad], replacement=audio_pads))
        return updates
