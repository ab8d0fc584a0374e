"""Training data as users already hold it: every format `--train` / `--eval` read, turned into qva Examples.

    qva        JSONL (or a JSON list) in the inference message format, or short {"audio", "text"} lines (`data.parse_line`)
    swift      ms-swift JSON / JSONL: {"messages": [{"role", "content": "<audio>What is said?"}, ...],
               "audios": [...], "images": [...], "videos": [...]}
    sharegpt   LLaMA-Factory: {"conversations": [{"from": "human", "value": "<audio>..."}, {"from": "gpt", ...}],
               "system": "...", "audios": [...]}; roles human/user, gpt/assistant, system
    alpaca     LLaMA-Factory: {"instruction", "input", "output", "system", "history": [[q, a], ...], "audios": [...]}
    parquet    a parquet file, a folder of shards (searched recursively) or a glob (Hugging Face datasets' layout)
    arrow      a `datasets.save_to_disk` folder: Arrow IPC stream files named in state.json (+ dataset_info.json)

Each row becomes exactly the Example of the equivalent qva line, then goes through the same checks
(`data.parse_line`): a `<audio>` / `<image>` / `<video>` tag marks where the next medium of its list goes, the
text between tags stays as written (nothing is stripped), a message without tags keeps its string content.
Rules:
  - the number of tags of each kind in a row equals the length of its media list; a mismatch is a bad row
    named with file:line (JSON and JSONL) or file:row (parquet / Arrow, 1-based within the file)
  - alpaca: the user turn is the instruction, then "\\n" and the input when the input is non-empty (as
    LLaMA-Factory joins them); `history` pairs come before it, `system` first
  - parquet / Arrow rows with the audio column (`--audio-column`) and the text column (`--text-column`) are ASR
    rows: (audio, `--prompt`) → text, other columns kept as metadata; rows holding `messages` / `conversations`
    / `instruction` are read as those formats. Audio is a path (relative to the dataset folder) or a
    Hugging Face Audio value {"bytes": ..., "path": ...}: the bytes when present (decoded with
    `qva.audio.load_audio`), else the path
  - parquet is read one record batch (within row groups) at a time, Arrow one stream batch at a time:
    the table is never materialised whole
  - the format is detected from the content (the first readable row of a JSON/JSONL file; a folder's files),
    or forced with `--data-format`
Reading parquet and Arrow needs `pyarrow` (the `qva[data]` extra), not the `datasets` library: its files are
plain parquet and Arrow IPC streams, and pyarrow alone reads them incrementally.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

from .data import DataError, Example, _got, _text, _unique_keys, jsonl_objects, parse_line

FORMATS = ("auto", "qva", "swift", "sharegpt", "alpaca", "parquet", "arrow")
TAG = re.compile(r"<(audio|image|video)>")
LIST_KEYS = {"audio": "audios", "image": "images", "video": "videos"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
BATCH_ROWS = 256  # rows decoded at a time from a parquet / Arrow file


def read_data(path: str | os.PathLike, prompt: str | None = None, data_format: str = "auto", audio_column: str = "audio",
              text_column: str = "text") -> tuple[list[Example], list[tuple[str, str]]]:
    """Examples of a dataset in any format above, and (where, why) for the rows that cannot be used."""
    examples, bad = [], []
    for item in iter_data(path, prompt, data_format, audio_column, text_column):
        (examples if isinstance(item, Example) else bad).append(item)
    return examples, bad


def iter_data(path, prompt=None, data_format="auto", audio_column="audio", text_column="text") -> Iterator:
    """Examples and (where, why) pairs in file order, read incrementally where the format allows."""
    if data_format not in FORMATS:
        raise DataError(f"data format: expected one of {', '.join(FORMATS)}, got {data_format!r}")
    fmt = detect_format(path) if data_format == "auto" else data_format
    if fmt in ("parquet", "arrow"):
        files = parquet_files(path) if fmt == "parquet" else arrow_files(path)
        for file in files:
            root = Path(path) if Path(path).is_dir() else file.parent  # rule: relative audio paths are under the dataset folder
            batches = _parquet_batches(file) if fmt == "parquet" else _arrow_batches(file)
            n = 0
            for rows in batches:
                for row in rows:
                    n += 1
                    where = f"{file}:{n}"
                    try:
                        yield table_row(row, root, where, prompt, audio_column, text_column)
                    except DataError as e:
                        yield where, str(e).removeprefix(f"{where}: ")
        return
    path = Path(path)
    convert = CONVERTERS.get(fmt, lambda obj: obj)  # qva: `data.read_manifest`'s reading, JSON lists too
    for where, obj, why in json_objects(path):
        if why is not None:
            yield where, why
            continue
        try:
            yield parse_line(convert(obj), path.parent, where, prompt)
        except DataError as e:
            yield where, str(e).removeprefix(f"{where}: ")


# -- detection ---------------------------------------------------------------------------------------------------------
def detect_format(path) -> str:
    """The format of `path` from its content: a folder with state.json or .arrow files → arrow, parquet files
    (or a glob of them) → parquet, else the keys of the first readable JSON object."""
    p = Path(path)
    if p.is_dir():
        if (p / "state.json").is_file() or any(p.glob("*.arrow")):
            return "arrow"
        if any(p.rglob("*.parquet")):
            return "parquet"
        raise DataError(f"{p}: a folder with no parquet files and no save_to_disk layout (state.json, *.arrow)")
    if not p.exists() and globlib.has_magic(str(path)):
        return "parquet"
    if not p.is_file():
        raise DataError(f"{p}: no such manifest")
    with open(p, "rb") as f:
        head = f.read(4)
    if head == b"PAR1":
        return "parquet"
    if head[:4] in (b"\xff\xff\xff\xff", b"ARRO"):
        return "arrow"
    for _, obj, why in json_objects(p):
        if why is None and isinstance(obj, dict):
            return row_format(obj)
    return "qva"  # nothing readable: the qva reader names each line


def row_format(obj: dict) -> str:
    """The format one decoded row is in (by its keys)."""
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "messages" in obj and (any(k in obj for k in LIST_KEYS.values()) or _string_contents_with_tags(obj["messages"])):
        return "swift"
    return "qva"


def _string_contents_with_tags(messages) -> bool:
    return isinstance(messages, list) and any(isinstance(m, dict) and isinstance(m.get("content"), str) and TAG.search(m["content"])
                                              for m in messages)


# -- JSON / JSONL ------------------------------------------------------------------------------------------------------
def json_objects(path: Path):
    """(where, object, None) or (where, None, why) for each row of a JSONL file or of a JSON file holding one
    list of objects (where: file:line of the row's first character)."""
    with open(path, "rb") as f:
        start = f.read(64).removeprefix(b"\xef\xbb\xbf").lstrip()
    if not start.startswith(b"["):
        yield from jsonl_objects(path)
        return
    text = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start + 1} ({e.reason})") from None
    strict, plain = json.JSONDecoder(object_pairs_hook=_unique_keys), json.JSONDecoder()
    i = text.index("[") + 1
    ws = re.compile(r"[\s,]*")
    while True:
        i = ws.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            return
        where = f"{path}:{text.count(chr(10), 0, i) + 1}"
        try:
            obj, end = strict.raw_decode(text, i)
        except DataError as e:  # a key given twice: that row is bad, the rest are read
            _, end = plain.raw_decode(text, i)
            yield where, None, str(e)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        else:
            yield where, obj, None
        i = end


def _media_lists(obj: dict) -> dict[str, list]:
    lists = {}
    for kind, key in LIST_KEYS.items():
        value = obj.get(key, [])
        if isinstance(value, str):
            value = [value]  # rule: a single path may be given without its list (LLaMA-Factory allows it)
        if not isinstance(value, list):
            raise DataError(f"field {key!r}: expected a list of paths, got {_got(value)}")
        lists[kind] = [_medium(v, f"{key}[{i}]", kind) for i, v in enumerate(value)]
    return lists


def _medium(value, name: str, kind: str):
    """A media list entry: a path, or (audio) a Hugging Face value {"bytes", "path"}: its bytes, else its path."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if kind == "audio" and isinstance(value.get("bytes"), (bytes, bytearray)) and value["bytes"]:
            return bytes(value["bytes"])
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise DataError(f"field {name}: expected a file path (a non-empty string), got {_got(value)}")
    return value


def split_tags(text: str, lists: dict[str, list], used: dict[str, int], name: str):
    """`text` with its tags replaced by the next media of their lists: the string itself when it has no tags,
    else a list of items (empty text between tags left out)."""
    _text(text, name)
    if not TAG.search(text):
        return text
    items, at = [], 0
    for m in TAG.finditer(text):
        if m.start() > at:
            items.append({"type": "text", "text": text[at:m.start()]})
        kind = m.group(1)
        if used[kind] < len(lists[kind]):
            items.append({"type": kind, kind: lists[kind][used[kind]]})
        used[kind] += 1
        at = m.end()
    if at < len(text):
        items.append({"type": "text", "text": text[at:]})
    return items


def _check_counts(lists: dict[str, list], used: dict[str, int]) -> None:
    for kind, key in LIST_KEYS.items():
        if used[kind] != len(lists[kind]):
            raise DataError(f"{used[kind]} <{kind}> tag(s) in the text but {len(lists[kind])} {kind}(s) in {key!r} "
                            f"(expected one tag per medium)")


def _qva(messages: list[dict], obj: dict, drop: tuple) -> dict:
    return {"messages": messages, **{k: v for k, v in obj.items() if k not in drop}}


def from_swift(obj) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {_got(obj)}")
    if "messages" not in obj:
        raise DataError(f"an ms-swift row needs 'messages' (got keys {sorted(obj)})")
    lists, used = _media_lists(obj), dict.fromkeys(LIST_KEYS, 0)
    messages = obj["messages"]
    if not isinstance(messages, list):
        return obj  # parse_line names it
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            m = {**m, "content": split_tags(m["content"], lists, used, f"messages[{i}].content")}
        out.append(m)
    _check_counts(lists, used)
    return _qva(out, obj, ("messages", *LIST_KEYS.values()))


def from_sharegpt(obj) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {_got(obj)}")
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"field conversations: expected a non-empty list of {{'from', 'value'}} objects, got {_got(turns)}")
    lists, used = _media_lists(obj), dict.fromkeys(LIST_KEYS, 0)
    out = []
    if "system" in obj and obj["system"] not in (None, ""):
        out.append({"role": "system", "content": _text(obj["system"], "'system'")})
    for i, t in enumerate(turns):
        name = f"conversations[{i}]"
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"field {name}: expected an object with 'from' and 'value', got {_got(t)}")
        if t["from"] not in SHAREGPT_ROLES:
            raise DataError(f"field {name}.from: expected one of {', '.join(map(repr, SHAREGPT_ROLES))}, got {_got(t['from'])}")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": split_tags(t["value"], lists, used, f"{name}.value")})
    _check_counts(lists, used)
    return _qva(out, obj, ("conversations", "system", "tools", *LIST_KEYS.values()))


def from_alpaca(obj) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {_got(obj)}")
    for key in ("instruction", "output"):
        if key not in obj:
            raise DataError(f"field {key!r}: missing (an alpaca row has keys {sorted(obj)})")
    lists, used = _media_lists(obj), dict.fromkeys(LIST_KEYS, 0)
    out = []
    if obj.get("system") not in (None, ""):
        out.append({"role": "system", "content": _text(obj["system"], "'system'")})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"field 'history': expected a list of [question, answer] pairs, got {_got(history)}")
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise DataError(f"field history[{i}]: expected a [question, answer] pair, got {_got(pair)}")
        out.append({"role": "user", "content": split_tags(pair[0], lists, used, f"history[{i}][0]")})
        out.append({"role": "assistant", "content": split_tags(pair[1], lists, used, f"history[{i}][1]")})
    query = _text(obj["instruction"], "'instruction'")
    extra = obj.get("input")
    if extra not in (None, ""):
        query = query + "\n" + _text(extra, "'input'")
    out.append({"role": "user", "content": split_tags(query, lists, used, "'instruction'")})
    out.append({"role": "assistant", "content": split_tags(obj["output"], lists, used, "'output'")})
    _check_counts(lists, used)
    return _qva(out, obj, ("instruction", "input", "output", "system", "history", *LIST_KEYS.values()))


CONVERTERS = {"swift": from_swift, "sharegpt": from_sharegpt, "alpaca": from_alpaca}


# -- parquet and Arrow ---------------------------------------------------------------------------------------------------
def _pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise DataError("reading parquet or Arrow needs pyarrow: pip install 'qva[data]' (or pyarrow)") from None
    import pyarrow.ipc
    import pyarrow.parquet
    return pyarrow


def parquet_files(path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.parquet"))
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in sorted(globlib.glob(str(path), recursive=True))]
    if not files:
        raise DataError(f"{path}: no parquet files")
    return files


def arrow_files(path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    state = p / "state.json"
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{state}: expected save_to_disk's state.json with '_data_files' ({type(e).__name__}: {e})") from None
        files = [p / n for n in names]
    else:
        files = sorted(p.glob("*.arrow"))
    missing = [f for f in files if not f.is_file()]
    if missing or not files:
        raise DataError(f"{p}: {'missing Arrow file ' + str(missing[0]) if missing else 'no Arrow files'}")
    return files


def _parquet_batches(file: Path) -> Iterator[list[dict]]:
    pa = _pyarrow()
    try:
        reader = pa.parquet.ParquetFile(file)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{file}: cannot read as parquet ({type(e).__name__}: {e})") from None
    for batch in reader.iter_batches(batch_size=BATCH_ROWS):  # rule: one record batch in memory at a time
        yield batch.to_pylist()


def _arrow_batches(file: Path) -> Iterator[list[dict]]:
    pa = _pyarrow()
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(file)))  # save_to_disk writes IPC streams
    except pa.ArrowInvalid:
        try:
            f = pa.ipc.open_file(pa.memory_map(str(file)))
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{file}: cannot read as an Arrow IPC stream or file ({type(e).__name__}: {e})") from None
        for i in range(f.num_record_batches):
            yield from _sliced(f.get_batch(i))
        return
    for batch in reader:
        yield from _sliced(batch)


def _sliced(batch) -> Iterator[list[dict]]:
    for start in range(0, batch.num_rows, BATCH_ROWS):
        yield batch.slice(start, BATCH_ROWS).to_pylist()


def table_row(row: dict, root: Path, where: str, prompt: str | None, audio_column: str, text_column: str) -> Example:
    """One parquet / Arrow row → an Example: an ASR row (audio + text columns, with the prompt), or a row in one
    of the JSON formats (its columns the JSON keys)."""
    if audio_column in row and text_column in row:
        try:
            audio = _medium(row[audio_column], f"{audio_column!r}", "audio")
            text = _text(row[text_column], f"{text_column!r}")
            if prompt is None:
                raise DataError(f"an ASR row ({audio_column!r}, {text_column!r}) needs a prompt (--prompt)")
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        obj = {"messages": [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": _text(prompt, "prompt")}]},
                            {"role": "assistant", "content": text}],
               **{k: v for k, v in row.items() if k != audio_column and not isinstance(v, (bytes, dict))}}
        return parse_line(obj, root, where, None)
    fmt = row_format(row)
    if fmt == "qva" and "messages" not in row:
        raise DataError(f"{where}: a row needs the columns {audio_column!r} and {text_column!r} (--audio-column, "
                        f"--text-column), or 'messages' / 'conversations' / 'instruction' (got {sorted(row)})")
    row = {k: v for k, v in row.items() if v is not None or k in ("messages", "conversations", "instruction", "output")}
    return parse_line(CONVERTERS[fmt](row) if fmt in CONVERTERS else row, root, where, prompt)
