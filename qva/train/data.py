"""Training data: JSONL manifests → encoded samples (token ids, labels, media) → left-padded batches.

A line is either the inference message format, or the short ASR form that `prompt` turns into one:

    {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "clips/1.flac"},
                                              {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": "..."}]}
    {"audio": "clips/1.flac", "text": "3071"}        # + prompt → user: (audio, prompt), assistant: text

Media paths are relative to the manifest. Labels cover each assistant message's content and its
`<|im_end|>`; everything else is −100 (`Processor.encode_conversation`). Other keys of a line are kept as
metadata (e.g. `voice`). A sample that cannot be used (unreadable line, missing or corrupt audio,
placeholder/media mismatch, longer than `max_seq_len`, nothing to learn) is skipped and counted, the
first few named; with `strict` it is an error instead.

Whisper is frozen in every stage, so without augmentation its output for each clip (the kept, pooled
encoder rows) is computed once and cached on disk, keyed by the encoder's weights and the clip.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import chat_template
from ..audio import AudioError, audio_token_count
from ..image_processing import ImageError
from ..model import IGNORE
from ..processor import Processor

MEDIA_KINDS = ("image", "video", "audio")
ANSWER_END = "<|im_end|>"


class DataError(ValueError):
    """A sample or manifest that cannot be used: the message names the file and line."""


@dataclass
class Example:
    """One conversation from a manifest, media paths resolved."""

    messages: list[dict]
    where: str  # "file:line"
    meta: dict = field(default_factory=dict)

    @property
    def answer(self) -> str:
        """The text of the last assistant message (what evaluation compares against)."""
        content = self.messages[-1]["content"]
        return content if isinstance(content, str) else "".join(i.get("text", "") for i in content if isinstance(i, dict))

    @property
    def audio_sources(self) -> list:
        return chat_template.media_items(self.messages)["audio"]


@dataclass
class Sample:
    """An encoded example: `input_ids` / `labels` `[S]`, the prompt length for generation (the tokens before
    the last answer), media tensors, and the Whisper rows of its audio once computed."""

    example: Example
    input_ids: torch.Tensor
    labels: torch.Tensor
    prompt_len: int
    media: dict[str, torch.Tensor]
    audio_rows: torch.Tensor | None = None

    @property
    def n_labels(self) -> int:
        return int((self.labels != IGNORE).sum())


def read_manifest(path: str | os.PathLike, prompt: str | None = None) -> tuple[list[Example], list[tuple[str, str]]]:
    """Examples of a JSONL manifest, and (where, why) for the lines that cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest")
    examples, bad = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            examples.append(parse_line(json.loads(line), path.parent, where, prompt))
        except (json.JSONDecodeError, DataError) as e:
            bad.append((where, str(e).removeprefix(f"{where}: ")))
    return examples, bad


def parse_line(obj, root: Path, where: str, prompt: str | None) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        meta = {k: v for k, v in obj.items() if k != "messages"}
    elif "audio" in obj and "text" in obj:
        if prompt is None:
            raise DataError(f"{where}: a short {{'audio', 'text'}} line needs a prompt (--prompt)")
        messages = [{"role": "user", "content": [{"type": "audio", "audio": obj["audio"]}, {"type": "text", "text": prompt}]},
                    {"role": "assistant", "content": str(obj["text"])}]
        meta = {k: v for k, v in obj.items() if k not in ("audio",)}
    else:
        raise DataError(f"{where}: a line needs 'messages', or 'audio' and 'text' (got keys {sorted(obj)})")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer")
    return Example(resolve_media(messages, root), where, meta)


def resolve_media(messages: list[dict], root: Path) -> list[dict]:
    """A copy of `messages` with relative media paths made relative to `root` (the manifest's folder)."""
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            content = []
            for item in m["content"]:
                if isinstance(item, dict):
                    item = dict(item)
                    for kind in MEDIA_KINDS:
                        value = item.get(kind)
                        if isinstance(value, str) and not value.startswith(("data:", "http://", "https://")) and not Path(value).is_absolute():
                            item[kind] = str(root / value)
                content.append(item)
            m = {**m, "content": content}
        out.append(m)
    return out


def encode(example: Example, processor: Processor, max_seq_len: int) -> Sample:
    """Tokens, labels and media of one example; a `DataError` names it when it cannot be used."""
    try:
        enc = processor.encode_conversation(example.messages)
    except (AudioError, ImageError, ValueError, OSError) as e:
        raise DataError(f"{example.where}: {e}") from None
    ids, labels = enc.pop("input_ids")[0], enc.pop("labels")[0]
    enc.pop("attention_mask")
    if ids.shape[0] > max_seq_len:
        raise DataError(f"{example.where}: {ids.shape[0]} tokens, over max_seq_len {max_seq_len}")
    return Sample(example, ids, labels, _last_answer_start(labels), enc)


def _last_answer_start(labels: torch.Tensor) -> int:
    """Where the last answer's labels begin: the generation prompt is everything before (the last message is
    always the assistant's, so its `<|im_end|>` at least is labelled)."""
    scored = (labels != IGNORE).tolist()
    i = len(scored) - 1
    while i >= 0 and not scored[i]:
        i -= 1
    while i > 0 and scored[i - 1]:
        i -= 1
    return i


def encode_all(examples: list[Example], processor: Processor, max_seq_len: int, strict: bool = False,
               bad: list[tuple[str, str]] | None = None) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Encode every example; unusable ones are skipped and returned as (where, why) (or raise, if strict)."""
    bad = list(bad or [])
    if strict and bad:
        raise DataError(f"{bad[0][0]}: {bad[0][1]}")
    samples = []
    for ex in examples:
        try:
            samples.append(encode(ex, processor, max_seq_len))
        except DataError as e:
            if strict:
                raise
            bad.append((ex.where, str(e).removeprefix(f"{ex.where}: ")))
    return samples, bad


def describe_skipped(bad: list[tuple[str, str]], shown: int = 3) -> str:
    if not bad:
        return ""
    lines = [f"skipped {len(bad)} sample(s) that cannot be used (--strict makes this an error):"]
    lines += [f"  {where}: {why}" for where, why in bad[:shown]]
    if len(bad) > shown:
        lines.append(f"  … and {len(bad) - shown} more")
    return "\n".join(lines)


def collate(samples: list[Sample], pad_id: int, prompt_only: bool = False) -> dict[str, torch.Tensor]:
    """Left-padded batch: `input_ids`, `attention_mask`, `labels` (−100 on padding; none with `prompt_only`,
    which keeps each sample's generation prompt), and the media of all samples in batch order (placeholders
    are matched row-major, so concatenation keeps them aligned)."""
    rows = [s.input_ids[: s.prompt_len] if prompt_only else s.input_ids for s in samples]
    longest = max(r.shape[0] for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE)
    for i, (r, s) in enumerate(zip(rows, samples)):
        input_ids[i, longest - r.shape[0]:] = r
        mask[i, longest - r.shape[0]:] = 1
        if not prompt_only:
            labels[i, longest - r.shape[0]:] = s.labels
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if not prompt_only:
        batch["labels"] = labels
    if all(s.audio_rows is not None for s in samples if _has_audio(s)) and any(_has_audio(s) for s in samples):
        batch["audio_rows"] = torch.cat([s.audio_rows for s in samples if s.audio_rows is not None])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "input_features", "audio_valid_frames"):
        if key in ("input_features", "audio_valid_frames") and "audio_rows" in batch:
            continue
        parts = [s.media[key] for s in samples if key in s.media]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


def _has_audio(s: Sample) -> bool:
    return "input_features" in s.media or s.audio_rows is not None


# -- Whisper rows, computed once per clip and cached on disk -------------------------------------------------
def encoder_fingerprint(model) -> str:
    """Identifies the audio encoder's weights and token settings: cached rows are valid only for these."""
    enc, cfg = model.audio_encoder, model.config
    h = hashlib.sha256(json.dumps([cfg.audio.to_dict(), cfg.audio_frames, cfg.audio_pool, str(enc.conv1.weight.dtype)]).encode())
    for t in (enc.conv1.weight, enc.layers[-1].fc2.weight, enc.layer_norm.weight):
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def clip_key(sample: Sample) -> str:
    """A sample's audio identity: its sources (paths with size and mtime; arrays by content)."""
    h = hashlib.sha256()
    for src in sample.example.audio_sources:
        if isinstance(src, (str, os.PathLike)) and Path(src).is_file():
            st = Path(src).stat()
            h.update(f"{Path(src).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(repr(src).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def fill_audio_rows(model, samples: list[Sample], cache_dir: Path | None, batch_size: int = 16, progress=None) -> int:
    """Compute (or read from `cache_dir`) each audio sample's Whisper rows, dropping its log-mel features.
    Returns how many clips were encoded (the rest came from the cache)."""
    todo = [s for s in samples if "input_features" in s.media]
    cache: dict[str, torch.Tensor] = {}
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"whisper-rows-{encoder_fingerprint(model)}.safetensors"
        if cache_file.is_file():
            cache = load_file(str(cache_file))
    keys = [clip_key(s) for s in todo]
    missing = [(s, k) for s, k in zip(todo, keys) if k not in cache]
    was_training = model.training
    model.eval()
    for i in range(0, len(missing), batch_size):
        chunk = missing[i:i + batch_size]
        feats = torch.cat([s.media["input_features"] for s, _ in chunk])
        valid = torch.cat([s.media["audio_valid_frames"] for s, _ in chunk])
        rows = model.audio_encoder_rows(feats.to(model.lm_head.weight.device), valid).float().cpu()
        start = 0
        for s, k in chunk:
            cfg = model.config
            n = sum(audio_token_count(v, cfg.audio_frames, cfg.audio_pool) for v in s.media["audio_valid_frames"].tolist())
            cache[k] = rows[start:start + n].clone()
            start += n
        if progress is not None:
            progress(min(i + batch_size, len(missing)), len(missing))
    model.train(was_training)
    for s, k in zip(todo, keys):
        s.audio_rows = cache[k]
        del s.media["input_features"], s.media["audio_valid_frames"]
    if cache_file is not None and missing:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}")
        save_file(cache, str(tmp))
        os.replace(tmp, cache_file)  # atomic: a reader sees the old cache or the new one
    return len(missing)

