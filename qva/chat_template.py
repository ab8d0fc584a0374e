"""Qwen2-VL's chat template (Qwen2.5-VL's and Qwen3-VL's too), rendered in Python from Hugging Face-style messages.

    [{"role": "user", "content": [{"type": "image", "image": ...}, {"type": "text", "text": "..."}]}]

renders exactly as the Jinja template in Qwen2-VL's `chat_template.json`: a default system prompt when
the first message is not a system one, `<|im_start|>role\\n … <|im_end|>\\n` per message, and one
`<|vision_start|><|image_pad|><|vision_end|>` per image (`<|video_pad|>` per video), and, for the
audio graft, `<|audio_start|><|audio_pad|><|audio_end|>` per audio clip. The processor later repeats
each pad token once per feature row. Qwen3-VL's template differs in one thing these messages reach: no
default system prompt (`family="qwen3_vl"`).
"""

from __future__ import annotations

DEFAULT_SYSTEM = "You are a helpful assistant."

# media type → (label used with add_vision_id, start token, pad token, end token)
MEDIA = {
    "image": ("Picture", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "video": ("Video", "<|vision_start|>", "<|video_pad|>", "<|vision_end|>"),
    "audio": ("Audio", "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"),  # the qva graft
}


def media_type(item: dict) -> str | None:
    """Which media a content item is, with the template's rules (`type`, or the presence of a key)."""
    if item.get("type") == "image" or "image" in item or "image_url" in item:
        return "image"
    for kind in MEDIA:
        if item.get("type") == kind or kind in item:
            return kind
    return None


def check_messages(messages) -> None:
    """Refuse what the template cannot render, naming the message and item: a missing or non-string role,
    `content` that is neither a string nor a list, an item that is not a dict, text that is not a string
    or is not valid Unicode (a lone surrogate cannot be encoded as UTF-8)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: must be a dict with 'role' and 'content', got {str(m)[:80]!r}")
        if not isinstance(m["role"], str):
            raise ValueError(f"message {i}: 'role' must be a string, got {type(m['role']).__name__}")
        content = m["content"]
        if isinstance(content, str):
            check_text(content, f"message {i} content")
            continue
        if not isinstance(content, list):
            raise ValueError(f"message {i}: 'content' must be a string or a list of items, got {type(content).__name__}")
        for j, item in enumerate(content):
            if not isinstance(item, dict):
                raise ValueError(f"message {i} item {j}: must be a dict like {{'type': 'text', 'text': ...}}, got {type(item).__name__}")
            if media_type(item) is None:
                if "text" not in item:
                    raise ValueError(f"message {i} item {j}: neither text nor image/video/audio (keys {sorted(item)})")
                check_text(item["text"], f"message {i} item {j} text")


def check_text(text, where: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{where}: must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: not valid Unicode at character {e.start} ({text[e.start]!r}: a lone surrogate)") from None


def render(messages: list[dict], add_generation_prompt: bool = False, add_vision_id: bool = False, family: str = "qwen2_vl") -> str:
    return "".join(text for text, _ in render_segments(messages, add_generation_prompt, add_vision_id, family))


def render_segments(messages: list[dict], add_generation_prompt: bool = False, add_vision_id: bool = False,
                    family: str = "qwen2_vl") -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_answer) pieces: `is_answer` marks each assistant message's content
    and its `<|im_end|>`, what a model is trained to produce (everything else is context)."""
    check_messages(messages)
    counts = dict.fromkeys(MEDIA, 0)
    out: list[tuple[str, bool]] = []
    for i, message in enumerate(messages):
        if i == 0 and message["role"] != "system" and family != "qwen3_vl":
            out.append((f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n", False))
        out.append((f"<|im_start|>{message['role']}\n", False))
        answer = message["role"] == "assistant"
        content = message["content"]
        if isinstance(content, str):
            out.append((content, answer))
        else:
            for item in content:
                kind = media_type(item)
                if kind is not None:
                    counts[kind] += 1
                    label, start, pad, end = MEDIA[kind]
                    if add_vision_id:
                        out.append((f"{label} {counts[kind]}: ", False))
                    out.append((start + pad + end, False))
                elif "text" in item:
                    out.append((item["text"], answer))
        out.append(("<|im_end|>", answer))
        out.append(("\n", False))
    if add_generation_prompt:
        out.append(("<|im_start|>assistant\n", False))
    return out


def video_fps(messages: list[dict]) -> list[float | None]:
    """Each video item's `fps` (None where it names none), in order of appearance."""
    return [item.get("fps") for m in messages if not isinstance(m["content"], str) for item in m["content"] if media_type(item) == "video"]


def media_items(messages: list[dict]) -> dict[str, list]:
    """The media objects referenced by the messages, per type, in order of appearance."""
    found: dict[str, list] = {k: [] for k in MEDIA}
    for message in messages:
        if isinstance(message["content"], str):
            continue
        for item in message["content"]:
            kind = media_type(item)
            if kind is not None:
                found[kind].append(item.get(kind, item.get("image_url") if kind == "image" else None))
    return found
