"""Training data: JSONL manifests → encoded samples (token ids, labels, media) → left-padded batches; the order
of an epoch (optionally bucketed by length). Other formats (ms-swift, LLaMA-Factory, parquet, Arrow) are turned
into the same Examples by `formats.py`; audio may be given as an encoded file's bytes (the processor decodes it).

A line is either the inference message format, or the short ASR form that `prompt` turns into one:

    {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "clips/1.flac"},
                                              {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": "..."}]}
    {"audio": "clips/1.flac", "text": "3071"}        # + prompt → user: (audio, prompt), assistant: text

A manifest is UTF-8 (a leading byte-order mark is accepted), one JSON object a line, lines split on "\\n"
only (a U+2028 inside a string is text, not a line break). Every field a line uses is checked as it is read
and never coerced: `"text": null` or `3071` (a number would lose a leading zero) is a bad line, not the
answer "None" or "3071"; invalid UTF-8 is a bad line, not U+FFFD; a key given twice is a bad line, not the
last value. Media paths are relative to the manifest. Labels cover each assistant message's content and its
`<|im_end|>`; everything else is −100 (`Processor.encode_conversation`). Other keys of a line are kept as
metadata (e.g. `voice`). A sample that cannot be used (unreadable line, a field of the wrong type, missing or
corrupt audio, placeholder/media mismatch, longer than `max_seq_len` or the model's context, nothing to
learn) is skipped and counted, the first few named with file:line, the field, and what was expected vs got;
with `strict` it is an error instead. It is never truncated.

Whisper is frozen in every stage, so without augmentation its output for each clip (the kept, pooled
encoder rows) is computed once and cached on disk, keyed by the encoder's weights and the clip. A cache
file that cannot be read, or an entry of the wrong dtype, shape or with non-finite values, is reported and
recomputed (the file is qva's own, so it is rewritten); a cache that cannot be written (a full disk) is
reported once and training goes on without it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from weights_loader.writer import WriteError, atomic_file

from .. import chat_template
from ..audio import AudioError, audio_token_count
from ..image_processing import ImageError
from ..inputs import MEDIA, ModelInputs
from ..model import IGNORE
from ..processor import Processor

MEDIA_KINDS = ("image", "video", "audio")
ROLES = ("system", "user", "assistant")
# a content item's payload key → the kind it is (`image_url` is the OpenAI spelling of an image)
ITEM_KEYS = {"text": "text", "image": "image", "image_url": "image", "video": "video", "audio": "audio"}


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
    """Examples of a qva JSONL manifest, and (where, why) for the lines that cannot be read. Other formats
    (ms-swift, LLaMA-Factory, parquet, Arrow): `qva.train.formats.read_data`."""
    path = Path(path)
    examples, bad = [], []
    for where, obj, why in jsonl_objects(path):
        if why is not None:
            bad.append((where, why))
            continue
        try:
            examples.append(parse_line(obj, path.parent, where, prompt))
        except DataError as e:
            bad.append((where, str(e).removeprefix(f"{where}: ")))
    return examples, bad


def jsonl_objects(path: Path):
    """(where, decoded JSON, None) for each non-empty line of a JSONL file, or (where, None, why) for a line
    that cannot be decoded; the rules below hold for every JSONL format read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest")
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}: starts with a UTF-16 byte-order mark; a manifest must be UTF-8 (one JSON object a line)")
    data = data.removeprefix(codecs.BOM_UTF8)  # rule: a leading UTF-8 BOM is accepted, nothing else is dropped
    for n, raw in enumerate(data.split(b"\n"), start=1):  # rule: only "\n" ends a line ("\r\n" too: JSON allows the "\r")
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")  # rule: strict, per line; a bad byte skips its line, never becomes U+FFFD
        except UnicodeDecodeError as e:
            yield where, None, f"not valid UTF-8: byte {e.start + 1} of the line is {raw[e.start:e.start + 1]!r} ({e.reason})"
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line, object_pairs_hook=_unique_keys), None
        except json.JSONDecodeError as e:
            yield where, None, f"not valid JSON: {e.msg} at column {e.colno}"
        except DataError as e:
            yield where, None, str(e)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object that gives a key twice is refused (JSON readers disagree on which value wins)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise DataError(f"key {k!r} is given twice in one object (expected each key once)")
        out[k] = v
    return out


def _got(value) -> str:
    """A JSON value described for an error message: its JSON type, and scalars shown."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"the string {value[:60]!r}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:8]}"
    return type(value).__name__


def _text(value, name: str) -> str:
    """`value` if it is a string of valid Unicode; else a DataError naming the field."""
    if not isinstance(value, str):
        raise DataError(f"field {name}: expected a string, got {_got(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"field {name}: expected valid Unicode text, got a lone surrogate ({value[e.start]!r}) at character {e.start}") from None
    return value


def _path(value, name: str) -> str:
    """`value` if it is a usable media path: a non-empty string of valid Unicode with no NUL."""
    if not isinstance(value, str) or not value:
        raise DataError(f"field {name}: expected a file path (a non-empty string), got {_got(value)}")
    _text(value, name)
    if "\0" in value:
        raise DataError(f"field {name}: expected a file path, got a string holding a NUL character")
    return value


def parse_line(obj, root: Path, where: str, prompt: str | None) -> Example:
    """One manifest line (decoded JSON) → an Example; a DataError names the field that cannot be used."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_got(obj)}")
    try:
        if "messages" in obj:
            messages = check_messages(obj["messages"])
            meta = {k: v for k, v in obj.items() if k != "messages"}
        elif "audio" in obj and "text" in obj:
            audio, text = _path(obj["audio"], "'audio'"), _text(obj["text"], "'text'")
            if prompt is None:
                raise DataError("a short {'audio', 'text'} line needs a prompt (--prompt)")
            messages = [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": _text(prompt, "prompt")}]},
                        {"role": "assistant", "content": text}]
            meta = {k: v for k, v in obj.items() if k not in ("audio",)}
        else:
            raise DataError(f"a line needs 'messages', or 'audio' and 'text' (got keys {sorted(obj)})")
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    return Example(resolve_media(messages, root), where, meta)


def check_messages(messages) -> list[dict]:
    """`messages` if every field the template and processor read is of its type: roles, content (a string or a
    list of items), each item exactly one of text/image/video/audio (agreeing with its `type`), text a string,
    media a path (a video may be a list of frame paths); the last message is the assistant's answer."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"field messages: expected a non-empty list of {{'role', 'content'}} objects, got {_got(messages)}")
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"field {name}: expected an object with 'role' and 'content', got {_got(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"field {name}.{key}: missing (the message has keys {sorted(m)})")
        if m["role"] not in ROLES:
            raise DataError(f"field {name}.role: expected one of {', '.join(map(repr, ROLES))}, got {_got(m['role'])}")
        content = m["content"]
        if isinstance(content, str):
            _text(content, f"{name}.content")
            continue
        if not isinstance(content, list):
            raise DataError(f"field {name}.content: expected a string or a list of items, got {_got(content)}")
        for j, item in enumerate(content):
            check_item(item, f"{name}.content[{j}]")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"field messages[{len(messages) - 1}].role: the last message must be the assistant's answer, "
                        f"got {_got(messages[-1]['role'])}")
    return messages


def check_item(item, name: str) -> None:
    if not isinstance(item, dict):
        raise DataError(f"field {name}: expected an object like {{'type': 'text', 'text': ...}}, got {_got(item)}")
    keys = [k for k in ITEM_KEYS if k in item]
    kind = item.get("type")
    if "type" in item and kind not in ITEM_KEYS:
        raise DataError(f"field {name}.type: expected one of {', '.join(map(repr, ITEM_KEYS))}, got {_got(kind)}")
    if len(keys) != 1:  # rule: an item with text and an image would silently lose its text in the template
        raise DataError(f"field {name}: expected exactly one of 'text', 'image', 'video', 'audio', got {keys or f'none (keys {sorted(item)})'}")
    key = keys[0]
    if kind is not None and ITEM_KEYS[kind] != ITEM_KEYS[key]:
        raise DataError(f"field {name}.type: {kind!r} but the item holds {key!r}")
    if key == "text":
        _text(item[key], f"{name}.text")
    elif key == "video" and isinstance(item[key], list):
        if not item[key]:
            raise DataError(f"field {name}.video: expected a folder path or a non-empty list of frame paths, got an empty list")
        for f, frame in enumerate(item[key]):
            _path(frame, f"{name}.video[{f}]")
    elif key == "audio" and isinstance(item[key], (bytes, bytearray)):  # an encoded file, from parquet / Arrow rows
        if not item[key]:
            raise DataError(f"field {name}.audio: expected the bytes of an audio file, got empty bytes")
    else:
        _path(item[key], f"{name}.{key}")


def resolve_media(messages: list[dict], root: Path) -> list[dict]:
    """A copy of `messages` with relative media paths (and video frame paths) made relative to `root` (the
    manifest's folder)."""
    def resolve(value):
        if isinstance(value, str) and not value.startswith(("data:", "http://", "https://")) and not Path(value).is_absolute():
            return str(root / value)
        return value

    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            content = []
            for item in m["content"]:
                if isinstance(item, dict):
                    item = dict(item)
                    for kind in MEDIA_KINDS:
                        if kind in item:
                            value = item[kind]
                            item[kind] = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
                content.append(item)
            m = {**m, "content": content}
        out.append(m)
    return out


def check_max_seq_len(max_seq_len: int, context: int) -> None:
    """Refuse a `max_seq_len` the model cannot run: a sample longer than its context (`max_position_embeddings`)
    would pass the length filter and then stop the run when it comes up. Call once, before encoding."""
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
        raise DataError(f"max_seq_len: expected a positive integer, got {_got(max_seq_len)}")
    if max_seq_len > context:
        raise DataError(f"max_seq_len {max_seq_len} is over the model's context of {context} tokens (max_position_embeddings): "
                        f"use --max-seq-len {context} or less")


def encode(example: Example, processor: Processor, max_seq_len: int, context: int | None = None) -> Sample:
    """Tokens, labels and media of one example; a `DataError` names it when it cannot be used. A sample over
    `max_seq_len` (or over `context`, the model's, when given) is refused with its length, never truncated."""
    try:
        enc = processor.encode_conversation(example.messages)
    except (AudioError, ImageError, ValueError, OSError) as e:
        raise DataError(f"{example.where}: {e}") from None
    ids, labels = enc.input_ids[0], enc.labels[0]
    if ids.shape[0] > max_seq_len:
        raise DataError(f"{example.where}: {ids.shape[0]} tokens, over max_seq_len {max_seq_len}")
    if context is not None and ids.shape[0] > context:
        raise DataError(f"{example.where}: {ids.shape[0]} tokens, over the model's context of {context} (max_position_embeddings)")
    return Sample(example, ids, labels, _last_answer_start(labels), enc.media())


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
               bad: list[tuple[str, str]] | None = None, context: int | None = None) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Encode every example; unusable ones are skipped and returned as (where, why) (or raise, if strict).
    `context` (the model's `max_position_embeddings`), when given, also skips samples longer than it."""
    bad = list(bad or [])
    if strict and bad:
        raise DataError(f"{bad[0][0]}: {bad[0][1]}")
    samples = []
    for ex in examples:
        try:
            samples.append(encode(ex, processor, max_seq_len, context))
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


def collate(samples: list[Sample], pad_id: int, prompt_only: bool = False) -> ModelInputs:
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
    batch = ModelInputs(input_ids, mask, labels=None if prompt_only else labels)
    if all(s.audio_rows is not None for s in samples if _has_audio(s)) and any(_has_audio(s) for s in samples):
        batch.audio_rows = torch.cat([s.audio_rows for s in samples if s.audio_rows is not None])
    for key in MEDIA:
        if key in ("input_features", "audio_valid_frames") and batch.audio_rows is not None or key == "audio_rows":
            continue
        parts = [s.media[key] for s in samples if key in s.media]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


# -- the order of an epoch ------------------------------------------------------------------------------------------
BUCKET_BATCHES = 64  # with bucketing, batches are formed by length within windows of this many batches of the permutation
_orders: dict = {}


def epoch_order(samples: list[Sample], seed: int, epoch: int, bucket: int | None = None) -> list[int]:
    """The sample indices of one epoch, a function of (seed, epoch, the samples' lengths) only.

    Without `bucket`: the seeded permutation (`torch.randperm`, seed · 100 003 + epoch), as always.
    With `bucket` = the batch size: that permutation is cut into windows of BUCKET_BATCHES batches, each window
    sorted by length (stable) and cut into batches, and the full batches of the whole epoch are put in a seeded
    random order (so a step is not always the shortest or the longest). A run takes its micro-batches as runs of
    `bucket` indices on one grid across epochs, so when the batch does not divide the epoch, an epoch's grid starts
    `lead` samples in: those first samples complete the previous epoch's last micro-batch, and the remainder goes
    last (both drawn from the short batch, with one full batch broken up where it is too small). Every micro-batch
    then holds samples of similar length, except the one that spans each epoch boundary.
    The last order is kept (recomputing it for every sample of a step would be quadratic)."""
    key = (id(samples), len(samples), seed, epoch, bucket)
    kept = _orders.get("last")
    if kept is not None and kept[0] == key and kept[1] is samples:
        return kept[2]
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(samples), generator=g).tolist()
    if bucket:
        lengths = [s.input_ids.shape[0] for s in samples]
        window = bucket * BUCKET_BATCHES
        batches = []
        for w in range(0, len(order), window):
            part = sorted(order[w:w + window], key=lambda j: lengths[j])
            batches += [part[b:b + bucket] for b in range(0, len(part), bucket)]
        short = [j for b in batches if len(b) < bucket for j in b]  # the last window's remainder: N mod bucket samples
        batches = [b for b in batches if len(b) == bucket]
        shuffled = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)).tolist()
        full = [batches[b] for b in shuffled]
        lead = -epoch * len(samples) % bucket  # where this epoch's part of the run's micro-batch grid begins
        if lead > len(short):
            short += full.pop()
        ends = sorted(short, key=lambda j: lengths[j])  # the lead, then the tail: (len(short) - lead) samples
        order = ends[:lead] + [j for b in full for j in b] + ends[lead:]
    _orders["last"] = (key, samples, order)
    return order


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Padded positions over all positions when `lengths` are batched in order, `batch_size` at a time."""
    padded = total = 0
    for b in range(0, len(lengths), batch_size):
        chunk = lengths[b:b + batch_size]
        padded += max(chunk) * len(chunk) - sum(chunk)
        total += max(chunk) * len(chunk)
    return padded / max(total, 1)


def to_device(batch: ModelInputs, device: torch.device) -> ModelInputs:
    """The batch on the model's device; grid metadata stays on the host (read with .tolist())."""
    return batch if device.type == "cpu" else batch.to(device)


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
        if isinstance(src, (bytes, bytearray)):  # an encoded file's bytes: identified by their content
            h.update(b"bytes:" + hashlib.sha256(src).digest())
        elif isinstance(src, (str, os.PathLike)) and Path(src).is_file():
            st = Path(src).stat()
            h.update(f"{Path(src).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(repr(src).encode())
    return h.hexdigest()[:24]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _unusable(t: torch.Tensor, rows: int, width: int) -> str | None:
    """Why a cached entry cannot stand for a clip's rows (`[rows, width]` float32, finite), or None."""
    if t.dtype != torch.float32:
        return f"dtype {t.dtype}, expected torch.float32"
    if tuple(t.shape) != (rows, width):
        return f"shape {list(t.shape)}, expected [{rows}, {width}]"
    if not bool(torch.isfinite(t).all()):
        return f"{int((~torch.isfinite(t)).sum())} non-finite value(s)"
    return None


@torch.no_grad()
def fill_audio_rows(model, samples: list[Sample], cache_dir: Path | None, batch_size: int = 16, progress=None,
                    log: Callable[[str], None] = _stderr) -> int:
    """Compute (or read from `cache_dir`) each audio sample's Whisper rows, dropping its log-mel features.
    Returns how many clips were encoded (the rest came from the cache). A cache that cannot be read, or
    entries that do not fit the clip, are recomputed and the file rewritten; a cache that cannot be written
    is skipped. Each such event is one line through `log` (default: stderr)."""
    todo = [s for s in samples if "input_features" in s.media]
    cfg = model.config
    need = [sum(audio_token_count(v, cfg.audio_frames, cfg.audio_pool) for v in s.media["audio_valid_frames"].tolist()) for s in todo]
    keys = [clip_key(s) for s in todo]
    cache: dict[str, torch.Tensor] = {}
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"whisper-rows-{encoder_fingerprint(model)}.safetensors"
        if cache_file.is_file():
            try:
                cache = load_file(str(cache_file))
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                log(f"whisper-row cache {cache_file}: cannot be read ({type(e).__name__}: {e}); recomputing its rows and rewriting it")
        bad = {}
        for k, n in zip(keys, need):  # rule: a cached entry is used only if it is exactly what the encoder would give
            if k in cache and k not in bad and (why := _unusable(cache[k], n, cfg.audio.d_model)) is not None:
                bad[k] = why
        if bad:
            log(f"whisper-row cache {cache_file}: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} unusable "
                f"({next(iter(bad.values()))}); recomputing them and rewriting the cache")
            for k in bad:
                del cache[k]
    missing, seen = [], set()
    for s, k, n in zip(todo, keys, need):
        if k not in cache and k not in seen:
            missing.append((s, k, n))
            seen.add(k)
    was_training = model.training
    model.eval()
    for i in range(0, len(missing), batch_size):
        chunk = missing[i:i + batch_size]
        feats = torch.cat([s.media["input_features"] for s, _, _ in chunk])
        valid = torch.cat([s.media["audio_valid_frames"] for s, _, _ in chunk])
        rows = model.audio_encoder_rows(feats.to(model.device), valid).float().cpu()
        start = 0
        for _, k, n in chunk:
            cache[k] = rows[start:start + n].clone()
            start += n
        if progress is not None:
            progress(min(i + batch_size, len(missing)), len(missing))
    model.train(was_training)
    for s, k in zip(todo, keys):
        s.audio_rows = cache[k]
        del s.media["input_features"], s.media["audio_valid_frames"]
    if cache_file is not None and missing:
        _write_cache(cache, cache_file, log)
    return len(missing)


def _write_cache(cache: dict[str, torch.Tensor], cache_file: Path, log: Callable[[str], None]) -> None:
    """Write the cache atomically (`atomic_file`: a reader sees the old cache or the new). A failure (full
    disk, no permission) is one line through `log`, and only qva's temporary file is removed."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_file(cache_file, lambda tmp: save_file(cache, str(tmp)))
    except (SafetensorError, OSError, WriteError) as e:
        log(f"whisper-row cache {cache_file}: not written ({type(e).__name__}: {e}); going on without caching these rows")
