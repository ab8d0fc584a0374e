"""Prompts + media → model inputs: tokenizer, chat template, image/video/audio processing, placeholders.

`Processor.from_pretrained(path)` reads the checkpoint's `tokenizer.json` (via `tokenizers`),
`preprocessor_config.json` and, for a graft, the audio settings in `config.json`. Calling it on texts
and media returns left-padded tensors:

    input_ids, attention_mask [B, S]; pixel_values [N, 1176], image_grid_thw [images, 3];
    pixel_values_videos, video_grid_thw likewise; input_features [windows, mels, 3000] and
    audio_valid_frames [windows] for audio.

Each `<|image_pad|>` becomes t·h·w/4 of them (one per merged vision token), each `<|audio_pad|>` one
per audio token. Qwen3-VL's `<|video_pad|>` becomes one block per temporal patch, each after its time as
text: `<1.0 seconds><|vision_start|>` + h·w/4 pads + `<|vision_end|>` (the time of a patch is the mean of its
frames' times, frame i at i / fps), as transformers' Qwen3VLProcessor writes it. Placeholders and media are
matched up front: a mismatch is a clear error before any model compute. The audio tokens `<|audio_start|>`,
`<|audio_end|>`, `<|audio_pad|>` are added to the tokenizer after its last entry, as special tokens (151657–151659
after Qwen2-VL's, 151665– after Qwen2.5-VL's, 151669– after Qwen3-VL's), spare rows of the embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from weights_loader import CheckpointError

from . import chat_template
from .audio import SAMPLE_RATE, audio_token_count, load_audio, log_mel
from .image_processing import VisionPreprocessConfig, process_image, process_video, video_input
from .inputs import ModelInputs

IMAGE_PAD, VIDEO_PAD, AUDIO_PAD = "<|image_pad|>", "<|video_pad|>", "<|audio_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
AUDIO_TOKENS = ("<|audio_start|>", "<|audio_end|>", AUDIO_PAD)
PAD_TOKEN = "<|endoftext|>"
DEFAULT_FPS = 2.0  # frames a second of a video given as frames without its rate (Qwen2.5-VL's time positions)
KEPT_FILES = ("tokenizer_config.json", "chat_template.json", "generation_config.json")  # copied on save


class Processor:
    def __init__(self, tokenizer: Tokenizer, image_config: VisionPreprocessConfig, video_config: VisionPreprocessConfig | None = None,
                 config=None, preprocessor: dict | None = None, kept_files: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        if tokenizer.token_to_id(AUDIO_TOKENS[0]) is None:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in AUDIO_TOKENS])
        self.image_config = image_config
        self.video_config = video_config or image_config
        self.config = config  # the model's Qwen2VLConfig: audio settings, when it has an audio encoder
        self.preprocessor = dict(preprocessor or {})
        self.kept_files = dict(kept_files or {})
        self.pad_token_id = self.token_id(PAD_TOKEN)
        self.image_token_id = self.token_id(IMAGE_PAD)
        self.video_token_id = self.token_id(VIDEO_PAD)
        self.audio_token_id = self.token_id(AUDIO_PAD)
        if config is not None:
            for token, ours, theirs in ((IMAGE_PAD, self.image_token_id, config.image_token_id),
                                        (VIDEO_PAD, self.video_token_id, config.video_token_id),
                                        (AUDIO_PAD, self.audio_token_id, config.audio_token_id if config.audio else None)):
                if theirs is not None and ours != theirs:
                    raise ValueError(f"the tokenizer gives {token} id {ours}, the model's config expects {theirs}")

    @classmethod
    def from_pretrained(cls, path: str | Path, config=None) -> "Processor":
        """The processor of a checkpoint folder; `config` (a Qwen2VLConfig) overrides its config.json."""
        from .qwen2vl_config import Qwen2VLConfig

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises its own Exception type for any bad file
            raise CheckpointError(f"{tok_file}: not a valid tokenizer file ({e})") from None

        def read(name: str) -> dict | None:
            f = path / name
            if not f.is_file():
                return None
            try:
                return json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{f}: invalid JSON ({e})") from None

        pre = read("preprocessor_config.json") or {}
        video = read("video_preprocessor_config.json")
        if config is None and (path / "config.json").is_file():
            config = Qwen2VLConfig.from_pretrained(path)
        image_cfg = VisionPreprocessConfig.from_dict(pre, str(path / "preprocessor_config.json"))
        video_cfg = VisionPreprocessConfig.from_dict(video, str(path / "video_preprocessor_config.json")) if video else None
        if video_cfg is not None and config is not None and config.family == "qwen3_vl":
            video_cfg.frames_share_pixels = True  # Qwen3-VL's video min/max pixels bound all frames together
        if config is not None:
            image_cfg.check_against(config.vision, str(path / "preprocessor_config.json"))
            if video_cfg is not None:
                video_cfg.check_against(config.vision, str(path / "video_preprocessor_config.json"))
        kept = {n: (path / n).read_text() for n in KEPT_FILES if (path / n).is_file()}
        try:
            return cls(tokenizer, image_cfg, video_cfg, config, pre, kept)
        except ValueError as e:
            raise CheckpointError(f"{tok_file}: {e}") from None

    @property
    def family(self) -> str:
        """The model's base family (its chat template and video prompt differ); Qwen2-VL's without a config."""
        return self.config.family if self.config is not None else "qwen2_vl"

    @property
    def feature_size(self) -> int | None:
        """Mel bins the saved preprocessor config declares (None if it declares none)."""
        return self.preprocessor.get("feature_size")

    def files(self) -> dict[str, str]:
        """The files that reproduce this processor in a saved checkpoint folder."""
        pre = dict(self.preprocessor)
        if self.config is not None and self.config.audio is not None:
            pre.update(feature_size=self.config.audio.num_mel_bins, sampling_rate=SAMPLE_RATE, n_fft=400, hop_length=160,
                       chunk_length=30, n_samples=480_000, nb_max_frames=3000)
        return {**self.kept_files, "tokenizer.json": self.tokenizer.to_str(), "preprocessor_config.json": json.dumps(pre, indent=2)}

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer has no {token!r} token (is this a Qwen2-VL tokenizer?)")
        return tid

    # -- text -----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False, add_vision_id: bool = False):
        """The prompt string; with `tokenize=True` the full model inputs, media taken from the messages."""
        text = chat_template.render(messages, add_generation_prompt, add_vision_id, self.family)
        if not tokenize:
            return text
        media = chat_template.media_items(messages)
        return self(text=[text], images=media["image"] or None, videos=media["video"] or None, audio=media["audio"] or None,
                    fps=chat_template.video_fps(messages) or None)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- everything -----------------------------------------------------------------------------------
    def __call__(self, text, images=None, videos=None, audios=None, min_pixels: int | None = None, max_pixels: int | None = None,
                 audio=None, fps: float | list[float | None] | None = None) -> ModelInputs:
        """Texts with placeholders + media → left-padded model inputs. `audio=` is transformers' current
        keyword for the clips, `audios=` the older one; give one of them. `fps`: the videos' frame rates (one for
        all, or one each; None: DEFAULT_FPS), which place Qwen2.5-VL's video positions in time."""
        if audio is not None and audios is not None:
            raise ValueError("give the audio clips as audio= or as audios=, not both")
        texts = [text] if isinstance(text, str) else list(text)
        out, counts = self._media(texts, images, videos, audio if audio is not None else audios, min_pixels, max_pixels, fps)
        remaining = {k: list(v) for k, v in counts.items()}  # consumed across the texts, in order
        out.update(self._tokenize([self._expand(t, remaining) for t in texts]))
        return ModelInputs(**out)

    def encode_conversation(self, messages: list[dict], min_pixels: int | None = None, max_pixels: int | None = None) -> ModelInputs:
        """One whole conversation (media taken from the messages) → model inputs for training, batch of one:
        `input_ids` `[1, S]`, `labels` `[1, S]` holding the ids of each assistant message's content and its
        `<|im_end|>` and −100 everywhere else (system, user, media placeholders, template tokens)."""
        segments = chat_template.render_segments(messages, family=self.family)
        media = chat_template.media_items(messages)
        out, counts = self._media(["".join(t for t, _ in segments)], media["image"], media["video"], media["audio"], min_pixels, max_pixels,
                                  chat_template.video_fps(messages) or None)
        counts = {k: list(v) for k, v in counts.items()}
        text, spans = "", []
        for piece, answer in segments:
            piece = self._expand(piece, counts)  # placeholders are repeated in order, across the pieces
            if answer:
                spans.append((len(text), len(text) + len(piece)))
            text += piece
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids = torch.tensor([enc.ids], dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for i, (a, b) in enumerate(enc.offsets):
            if any(a < end and b > start for start, end in spans):  # the token overlaps an answer span
                labels[0, i] = ids[0, i]
        return ModelInputs(**out, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)

    def _media(self, texts: list[str], images, videos, audios, min_pixels, max_pixels, fps=None) -> tuple[dict, dict[str, list[str]]]:
        """Media → tensors, and each item's placeholder expansion (the pad once per feature row)."""
        images, videos, audios = list(images or []), list(videos or []), list(audios or [])
        for kind, pad, given in (("image", IMAGE_PAD, images), ("video", VIDEO_PAD, videos), ("audio", AUDIO_PAD, audios)):
            n = sum(t.count(pad) for t in texts)
            if n != len(given):
                raise ValueError(f"the prompt has {n} {kind} placeholder(s) ({pad}) but {len(given)} {kind}(s) were given")
        out: dict[str, torch.Tensor] = {}
        counts: dict[str, list[str]] = {}
        videos = [video_input(v) for v in videos]  # frames, counted for Qwen3-VL's timestamps
        for kind, items, fn, cfg in (("image", images, process_image, self.image_config), ("video", videos, process_video, self.video_config)):
            if not items:
                continue
            rows, grids = zip(*(fn(x, cfg, min_pixels, max_pixels) for x in items))
            key = "pixel_values" if kind == "image" else "pixel_values_videos"
            out[key] = torch.cat(rows)
            out[f"{kind}_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            merge = cfg.merge_size**2
            pad = IMAGE_PAD if kind == "image" else VIDEO_PAD
            counts[kind] = [pad * (t * h * w // merge) for t, h, w in grids]
        if videos and self.family == "qwen2_5_vl":
            out["second_per_grid_ts"] = self._seconds_per_grid(fps, len(videos))
        if videos and self.family == "qwen3_vl":
            merge = self.video_config.merge_size**2
            counts["video"] = [
                "".join(f"<{t:.1f} seconds>{VISION_START}{VIDEO_PAD * (h * w // merge)}{VISION_END}" for t in times)
                for times, (_, h, w) in zip(self._patch_times(fps, [len(v) for v in videos]), out["video_grid_thw"].tolist())
            ]
        if audios:
            out["input_features"], out["audio_valid_frames"], counts["audio"] = self._audio(audios)
        return out, counts

    @staticmethod
    def _rates(fps, videos: int) -> list[float]:
        """Each video's frame rate (DEFAULT_FPS where none is given), checked."""
        rates = list(fps) if isinstance(fps, (list, tuple)) else [fps] * videos
        if len(rates) != videos:
            raise ValueError(f"fps has {len(rates)} rates for {videos} videos")
        rates = [DEFAULT_FPS if r is None else r for r in rates]
        for r in rates:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0 or r == float("inf"):
                raise ValueError(f"a video's fps must be a number > 0, got {r!r}")
        return rates

    def _seconds_per_grid(self, fps, videos: int) -> torch.Tensor:
        """Seconds each temporal patch of each video spans: temporal_patch_size / its frame rate `[videos]`."""
        return torch.tensor([self.video_config.temporal_patch_size / r for r in self._rates(fps, videos)], dtype=torch.float32)

    def _patch_times(self, fps, frames: list[int]) -> list[list[float]]:
        """Qwen3-VL: each video's temporal patches' times in seconds, the mean of their first and last frame's
        (frame i at i / fps; a last patch short of frames repeats the last frame, as the pixels do)."""
        tp = self.video_config.temporal_patch_size
        out = []
        for n, rate in zip(frames, self._rates(fps, len(frames))):
            last = lambda i: min(i, n - 1)  # noqa: E731
            out.append([(last(k) + last(k + tp - 1)) / 2 / rate for k in range(0, n, tp)])
        return out

    def _audio(self, audios: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Clips → log-mel windows, valid frames per window, and each clip's placeholder expansion."""
        cfg = self.config
        if cfg is None or cfg.audio is None:
            raise ValueError("audio was given but this model has no audio encoder (load it with qva.load(..., whisper=PATH))")
        waves = []
        for a in audios:  # a path, (array, sample_rate), or an array already at 16 kHz
            encoded = isinstance(a, (str, Path, bytes, bytearray, memoryview))  # a file, by path or by its bytes
            waves.append(load_audio(*a) if isinstance(a, tuple) else load_audio(a, None if encoded else SAMPLE_RATE))
        per_clip = []
        feats, valid = [], []
        for w in waves:
            f, v = log_mel(w, cfg.audio.num_mel_bins)
            feats.append(f)
            valid.append(v)
            per_clip.append(AUDIO_PAD * sum(audio_token_count(n, cfg.audio_frames, cfg.audio_pool) for n in v.tolist()))
        return torch.cat(feats), torch.cat(valid), per_clip

    @staticmethod
    def _expand(text: str, counts: dict[str, list[str]]) -> str:
        """Replace each placeholder by its item's expansion (the pad once per feature row), consuming (popping)
        the per-item expansions in order."""
        for kind, pad in (("image", IMAGE_PAD), ("video", VIDEO_PAD), ("audio", AUDIO_PAD)):
            if kind not in counts:
                continue
            pieces = text.split(pad)
            it = counts[kind]
            text = pieces[0] + "".join(it.pop(0) + rest for rest in pieces[1:])
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
