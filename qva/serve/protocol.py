"""OpenAI Chat Completions requests → qva messages and sampling settings; responses and errors back.

A request body (already JSON-decoded) is checked field by field, and every problem is an `APIError`
carrying the HTTP status and OpenAI's error body `{"error": {"message", "type", "param", "code"}}`,
so a client sees a 4xx naming the field, never a 5xx (the official client retries those twice).

Content parts understood (OpenAI's, plus vLLM's `video_url`):

    {"type": "text", "text": "..."}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
    {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav" | "mp3" | "flac"}}
    {"type": "video_url", "video_url": {"url": "data:image/gif;base64,..."}}      # an animated GIF/WebP
    {"type": "video_url", "video_url": {"frames": ["data:image/png;base64,...", ...]}}

Media become what `Processor` takes (PIL images, frame lists, 16 kHz waveforms) in `media.py`: every
part is probed from its header and charged to the request's budget before any part is decoded. Remote
`http(s)` URLs are refused unless the server allows them, and then fetched by `fetch.py`.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from .. import chat_template
from ..sampling import SamplingParams
from .errors import APIError, bad
from .media import AUDIO_FORMATS, Budget, MediaLimits, decode_audio, decode_image, decode_video, probe_audio, probe_image, probe_video, url_bytes

__all__ = ["APIError", "bad", "ChatRequest", "Limits", "parse_chat_request", "openai_sampling", "AUDIO_FORMATS", "decode_audio", "decode_image",
           "decode_video", "completion", "chunk", "usage_chunk"]
ROLES = {"system", "developer", "user", "assistant"}


@dataclass
class ChatRequest:
    messages: list[dict]  # qva / Hugging Face form: {"role", "content": str | [{"type": "text"|"image"|"video"|"audio", ...}]}
    max_tokens: int | None  # None: the rest of the server's context
    sampling: SamplingParams  # max_new_tokens: replaced by the token budget (`Server.prepare`) when the job is made
    stop: list[str]
    stream: bool
    include_usage: bool
    media: int = 0  # media items in the request
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Limits:
    model_name: str
    max_media: int = 8
    allow_remote_media: bool = False
    defaults: dict = field(default_factory=dict)  # sampling defaults: the checkpoint's generation_config, else OpenAI's
    media: MediaLimits = field(default_factory=MediaLimits)  # what one request's media may cost


# -- small typed reads --------------------------------------------------------------------------------
def _number(body: dict, name: str, lo: float, hi: float, default, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not math.isfinite(v):
        raise bad(f"'{name}' must be {kind}, got {v!r}"[:300], name, "invalid_type")
    if not lo <= v <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return v


def parse_chat_request(body, limits: Limits, fetch=None) -> ChatRequest:
    """A decoded JSON body → ChatRequest, or APIError naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("'model' is required and must be a string", "model", "invalid_type")
    if model != limits.model_name:
        raise APIError(404, f"the model '{model[:100]}' does not exist; this server serves '{limits.model_name}'", "model",
                       "model_not_found")
    n = _number(body, "n", 1, 1, 1, integer=True)
    del n
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, -2, 2, 0):
            raise bad(f"'{name}' is not supported (only 0)", name, "unsupported_value")
    for name in ("tools", "functions", "logit_bias", "audio"):
        if body.get(name):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    _response_format(body.get("response_format"))
    if body.get("logprobs"):
        raise bad("'logprobs' is not supported by this server", "logprobs", "unsupported_parameter")
    max_tokens = _number(body, "max_completion_tokens", 1, 2**31, None, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 2**31, None, integer=True)
    d = limits.defaults
    temperature = _number(body, "temperature", 0, 2, d.get("temperature", 1.0))
    top_p = _number(body, "top_p", 0, 1, d.get("top_p", 1.0))
    if top_p == 0:
        raise bad("'top_p' must be > 0", "top_p")
    top_k = _number(body, "top_k", 0, 2**31, d.get("top_k"), integer=True)
    repetition_penalty = _number(body, "repetition_penalty", 1e-3, 100, 1.0)
    seed = _number(body, "seed", -(2**63), 2**63 - 1, None, integer=True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad("'stop' must be a non-empty string or a list of up to 4 of them", "stop", "invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be true or false, got {stream!r}"[:200], "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("'stream_options.include_usage' must be true or false", "stream_options.include_usage", "invalid_type")
    messages, media = parse_messages(body.get("messages"), limits, fetch)
    sampling = openai_sampling(temperature, top_p=float(top_p) if top_p is not None else None, top_k=top_k,
                               repetition_penalty=float(repetition_penalty), seed=seed)
    return ChatRequest(messages, max_tokens, sampling, stop, stream, include_usage, media)


def openai_sampling(temperature: float, **kw) -> SamplingParams:
    """OpenAI's sampling settings as `SamplingParams`: temperature 0 is greedy decoding. The caller has checked the
    ranges; a value `SamplingParams` still refuses (a checkpoint's odd generation_config default) is a 400."""
    try:
        return SamplingParams(do_sample=temperature > 0, temperature=float(temperature) or 1.0, **kw)
    except ValueError as e:
        raise bad(str(e), None) from None


def _response_format(fmt) -> None:
    """Only OpenAI's default, `{"type": "text"}`, is served (there is no constrained decoding)."""
    if fmt is None:
        return
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad("'response_format' must be an object with a 'type' (only {\"type\": \"text\"} is supported)", "response_format",
                  "invalid_type")
    if fmt["type"] != "text":
        raise bad(f"'response_format.type' {fmt['type'][:40]!r} is not supported by this server (only 'text')",
                  "response_format.type", "unsupported_value")


def parse_messages(messages, limits: Limits, fetch=None) -> tuple[list[dict], int]:
    """OpenAI messages → qva messages with decoded media, and the number of media items. Every media part is
    probed (header only) and charged to the request's budget before any is decoded."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' is required and must be a non-empty list", "messages", "invalid_type")
    out, media = [], 0
    budget, pending = Budget(limits.media), []  # (part dict, key, decode) filled once every part fits
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {sorted(ROLES)}, got {str(role)[:40]!r}", f"{where}.role")
        role = "system" if role == "developer" else role
        content = m.get("content")
        if isinstance(content, str):
            _check_text(content, f"{where}.content")
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list) or (role != "user" and any(not isinstance(p, dict) or p.get("type") != "text" for p in content)):
            want = "a string or a list of content parts" if role == "user" else "a string or a list of text parts"
            raise bad(f"{where}.content must be {want}", f"{where}.content", "invalid_type")
        parts = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise bad(f"{pwhere} must be an object with a 'type'", pwhere, "invalid_type")
            kind = part.get("type")
            if kind == "text":
                _check_text(part.get("text"), f"{pwhere}.text")
                parts.append({"type": "text", "text": part["text"]})
                continue
            if kind not in ("image_url", "input_audio", "video_url"):
                raise bad(f"{pwhere}.type must be text, image_url, input_audio or video_url, got {str(kind)[:40]!r}", f"{pwhere}.type")
            media += 1
            if media > limits.max_media:
                raise bad(f"the request has more than {limits.max_media} media items (the server's --limit-media)", pwhere,
                          "too_many_media")
            spec = part.get(kind)
            if not isinstance(spec, dict):
                raise bad(f"{pwhere}.{kind} must be an object", f"{pwhere}.{kind}", "invalid_type")
            remote = limits.allow_remote_media
            if kind == "image_url":
                raw = url_bytes(spec, f"{pwhere}.image_url", remote, budget, fetch)
                part, decode = {"type": "image"}, probe_image(raw, f"{pwhere}.image_url", budget)
            elif kind == "input_audio":
                part, decode = {"type": "audio"}, probe_audio(spec, f"{pwhere}.input_audio", budget)
            else:
                part, decode = {"type": "video"}, probe_video(spec, f"{pwhere}.video_url", remote, budget, fetch)
            parts.append(part)
            pending.append((part, decode))
        out.append({"role": role, "content": parts})
    for part, decode in pending:
        part[part["type"]] = decode()
    return out, media


def _check_text(text, where: str) -> None:
    """The chat template's check (a string, valid Unicode), answered as a 400 naming the field."""
    try:
        chat_template.check_text(text, where)
    except ValueError as e:
        raise bad(str(e), where, "invalid_type" if not isinstance(text, str) else "invalid_value") from None


# -- responses ----------------------------------------------------------------------------------------
def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(req: ChatRequest, model: str, text: str, finish: str, prompt: int, tokens: int) -> dict:
    return {
        "id": req.id, "object": "chat.completion", "created": req.created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}],
        "usage": usage(prompt, tokens),
    }


def chunk(req: ChatRequest, model: str, delta: dict, finish: str | None = None) -> dict:
    out = {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: ChatRequest, model: str, prompt: int, tokens: int) -> dict:
    return {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": model, "choices": [],
            "usage": usage(prompt, tokens)}
