"""Prompts + media → model inputs: tokenizer, chat template, image/video processing, placeholder expansion.

`Processor.from_pretrained(path)` reads the checkpoint's `tokenizer.json` (via `tokenizers`) and
`preprocessor_config.json`. Calling it on texts and media returns left-padded tensors:

    input_ids, attention_mask [B, S]; pixel_values [N, 1176], image_grid_thw [images, 3];
    pixel_values_videos, video_grid_thw likewise.

Each `<|image_pad|>` in a text becomes t·h·w/4 of them (one per merged vision token). Placeholders and
media are matched up front, so a mismatch is a clear error before any model compute.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from . import chat_template
from .image_processing import VisionPreprocessConfig, process_image, process_video

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
PAD_TOKEN = "<|endoftext|>"


class Processor:
    def __init__(self, tokenizer: Tokenizer, image_config: VisionPreprocessConfig, video_config: VisionPreprocessConfig | None = None):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.video_config = video_config or image_config
        self.pad_token_id = self.token_id(PAD_TOKEN)
        self.image_token_id = self.token_id(IMAGE_PAD)
        self.video_token_id = self.token_id(VIDEO_PAD)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Processor":
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(tok_file))

        def read(name: str) -> dict | None:
            f = path / name
            return json.loads(f.read_text()) if f.is_file() else None

        image_cfg = VisionPreprocessConfig.from_dict(read("preprocessor_config.json") or {})
        video = read("video_preprocessor_config.json")
        return cls(tokenizer, image_cfg, VisionPreprocessConfig.from_dict(video) if video else image_cfg)

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer has no {token!r} token (is this a Qwen2-VL tokenizer?)")
        return tid

    # -- text -----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False, add_vision_id: bool = False):
        """The prompt string; with `tokenize=True` the full model inputs, media taken from the messages."""
        text = chat_template.render(messages, add_generation_prompt, add_vision_id)
        if not tokenize:
            return text
        media = chat_template.media_items(messages)
        return self(text=[text], images=media["image"] or None, videos=media["video"] or None)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- everything -----------------------------------------------------------------------------------
    def __call__(self, text, images=None, videos=None, min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        images = list(images or [])
        videos = list(videos or [])
        for kind, pad, given in (("image", IMAGE_PAD, images), ("video", VIDEO_PAD, videos)):
            n = sum(t.count(pad) for t in texts)
            if n != len(given):
                raise ValueError(f"the prompt has {n} {kind} placeholder(s) ({pad}) but {len(given)} {kind}(s) were given")

        out: dict[str, torch.Tensor] = {}
        counts: dict[str, list[int]] = {}
        for kind, items, fn, cfg in (("image", images, process_image, self.image_config), ("video", videos, process_video, self.video_config)):
            if not items:
                continue
            rows, grids = zip(*(fn(x, cfg, min_pixels, max_pixels) for x in items))
            key = "pixel_values" if kind == "image" else "pixel_values_videos"
            out[key] = torch.cat(rows)
            out[f"{kind}_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            merge = cfg.merge_size**2
            counts[kind] = [t * h * w // merge for t, h, w in grids]

        expanded = [self._expand(t, counts) for t in texts]
        out.update(self._tokenize(expanded))
        return out

    @staticmethod
    def _expand(text: str, counts: dict[str, list[int]]) -> str:
        """Repeat each placeholder once per vision token, consuming the per-item counts in order."""
        for kind, pad in (("image", IMAGE_PAD), ("video", VIDEO_PAD)):
            if kind not in counts:
                continue
            pieces = text.split(pad)
            it = counts[kind]
            text = pieces[0] + "".join(pad * it.pop(0) + rest for rest in pieces[1:])
        return text

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = [self.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        longest = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, seq in enumerate(ids):  # left padding
            if seq:
                input_ids[row, -len(seq):] = torch.tensor(seq)
                mask[row, -len(seq):] = 1
        return {"input_ids": input_ids, "attention_mask": mask}
