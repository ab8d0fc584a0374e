"""`ModelInputs`: what the processor makes and the model, the engine and training's collate take.

    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)   # ModelInputs
    model(**inputs)                       # it is a mapping of its non-None fields, so transformers-style calls work
    inputs.media()                        # the media tensors alone: {name: tensor}
    inputs.to(device)

One home for the names of the inputs: `MEDIA` lists the media fields in the order the model encodes them.
Grid metadata (`*_grid_thw`) stays on the host (the model reads it with `.tolist()`).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, fields

import torch

MEDIA = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "input_features", "audio_valid_frames", "audio_rows",
         "second_per_grid_ts")
HOST = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")  # read on the host: never moved to the device


@dataclass(eq=False)
class ModelInputs(MutableMapping):
    input_ids: torch.Tensor  # [B, S], left-padded
    attention_mask: torch.Tensor | None = None  # [B, S]: 1 = token, 0 = padding
    pixel_values: torch.Tensor | None = None  # [Σ image patches, 1176]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    pixel_values_videos: torch.Tensor | None = None  # [Σ video patches, 1176]
    video_grid_thw: torch.Tensor | None = None  # [videos, 3]
    input_features: torch.Tensor | None = None  # [windows, mels, 3000]: log-mel, 30 s windows
    audio_valid_frames: torch.Tensor | None = None  # [windows]: mel frames of real audio in each
    audio_rows: torch.Tensor | None = None  # [Σ audio tokens, d_audio]: encoder rows computed before (training's cache)
    second_per_grid_ts: torch.Tensor | None = None  # [videos]: seconds per temporal patch (Qwen2.5-VL's video time positions)
    labels: torch.Tensor | None = None  # [B, S]: training targets, −100 where not scored

    @classmethod
    def of(cls, inputs) -> "ModelInputs":
        """`inputs` as ModelInputs (a mapping with these keys; unknown keys are a TypeError naming them)."""
        if isinstance(inputs, cls):
            return inputs
        unknown = set(inputs) - NAMES
        if unknown:
            raise TypeError(f"unexpected model inputs {sorted(unknown)} (expected some of {sorted(NAMES)})")
        return cls(**inputs)

    def media(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in MEDIA if getattr(self, k) is not None}

    def to(self, device) -> "ModelInputs":
        return ModelInputs(**{k: v if k in HOST else v.to(device) for k, v in self.items()})

    # a mapping of the fields that are set
    def __getitem__(self, key: str) -> torch.Tensor:
        value = getattr(self, key, None) if key in NAMES else None
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value) -> None:
        if key not in NAMES:
            raise KeyError(f"{key!r} is not a model input (expected one of {sorted(NAMES)})")
        setattr(self, key, value)

    def __delitem__(self, key: str) -> None:
        self[key]  # KeyError if unset
        setattr(self, key, None)

    def __iter__(self):
        return (f.name for f in fields(self) if getattr(self, f.name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


NAMES = {f.name for f in fields(ModelInputs)}
