"""OpenAI's audio endpoints, `POST /v1/audio/transcriptions` and `POST /v1/audio/translations`, on the engine.

    a form upload (`multipart.py`) ─► `AudioRequest`: every field checked, unknown ones refused by name
    its file ─► the header probed and charged (`media.py`: --max-audio-seconds, --max-body-bytes) before
               anything is decoded ─► decoded to 16 kHz mono (NaN/inf, lying headers refused)
    ─► a clip of at most 30 s is one window, as it is (the form a model is trained on); a longer one is cut by
       `audio.split_at_pauses` into its speech, in pieces of at most 30 s (one Whisper window each) cut where the
       clip is quietest, long silences left out (a clip with no sound at all has no windows: its text is "")
    ─► `Windows`: one scheduler job per piece (the instruction + the piece's audio), submitted in order and
       at most the engine's rows at a time, so a long clip fills the rows and is decoded as one batch, while
       other requests still find a row between its windows
    ─► the pieces' texts in order: one transcript (each piece's text stripped, pieces joined by a space),
       streamed as `transcript.text.delta` events then `transcript.text.done`, or answered whole as json,
       text, verbose_json (a segment per piece: its start, end, text, tokens, avg_logprob), srt or vtt

What the model is asked: the instruction it was trained with (a qva-train run folder's
`train_config.json` records it; `trained_prompt`), else the server's --transcribe-prompt; translation
asks for English (--translate-prompt). A request's `prompt` (context: names, spellings) goes before it as
a system message. `language` is checked (an ISO-639 code) and reported in verbose_json; it is not given to
the model, which is asked in the words it was trained on.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi.concurrency import run_in_threadpool

from .. import chat_template
from ..audio import SAMPLE_RATE, AudioError, clip_tokens, split_at_pauses
from ..generate import TextStream, eos_ids
from ..image_processing import ImageError
from ..sampling import SamplingParams
from .errors import APIError, bad
from .media import Budget, MediaLimits, probe_audio_bytes
from .multipart import Part
from .protocol import openai_sampling
from .scheduler import Job, QueueFull

FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
FIELDS = {  # the form fields each task takes (OpenAI's; translations have no language, stream or timestamps)
    "transcribe": {"file", "model", "prompt", "language", "response_format", "temperature", "stream", "timestamp_granularities[]",
                   "timestamp_granularities"},
    "translate": {"file", "model", "prompt", "response_format", "temperature"},
}
DEFAULT_TRANSCRIBE_PROMPT = "Transcribe the audio."  # qva-train's default --prompt
DEFAULT_TRANSLATE_PROMPT = "Translate the audio into English."
WINDOW_SECONDS = 30  # one Whisper window a piece
MAX_FIELD_BYTES = 64 * 1024  # a text field of the form


def trained_prompt(*folders) -> str | None:
    """The instruction a qva-train run was trained with: `prompt` in the first of `folders` that has a readable
    `train_config.json` saying one (a run folder is the stage's output; a plain model folder has none)."""
    for folder in folders:
        if folder is None:
            continue
        try:
            prompt = json.loads((Path(folder) / "train_config.json").read_text()).get("prompt")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(prompt, str) and prompt.strip():
            return prompt
    return None


# -- the request ----------------------------------------------------------------------------------------------------
@dataclass
class AudioRequest:
    task: str  # "transcribe" | "translate"
    audio: bytes
    filename: str
    prompt: str | None
    language: str | None
    response_format: str
    sampling: SamplingParams  # from `temperature` (0: greedy); max_new_tokens is set per window (`Windows.job`)
    stream: bool
    id: str = field(default_factory=lambda: "trsc-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def temperature(self) -> float:
        """The request's temperature, as verbose_json reports it (0: greedy)."""
        return self.sampling.temperature if self.sampling.do_sample else 0.0


def _text_field(part: Part) -> str:
    if part.filename is not None:
        raise bad(f"'{part.name}' must be a text field, not a file", part.name, "invalid_type")
    if len(part.data) > MAX_FIELD_BYTES:
        raise bad(f"'{part.name}' is over {MAX_FIELD_BYTES} bytes", part.name)
    try:
        text = part.data.decode("utf-8")
    except UnicodeDecodeError:
        raise bad(f"'{part.name}' is not valid UTF-8", part.name, "invalid_value") from None
    try:
        chat_template.check_text(text, part.name)
    except ValueError as e:
        raise bad(str(e), part.name) from None
    return text


def parse_audio_request(parts: list[Part], task: str, model_name: str) -> AudioRequest:
    """A form's parts → AudioRequest, or an APIError naming the first field that is wrong (all unknown ones at once)."""
    allowed = FIELDS[task]
    unknown = sorted({p.name for p in parts} - allowed)
    if unknown:
        names = ", ".join(repr(n[:40]) for n in unknown[:8])
        raise bad(f"unknown or unsupported field(s) {names}; this endpoint takes {', '.join(sorted(allowed - {'timestamp_granularities'}))}",
                  unknown[0][:40], "unknown_parameter")
    by_name: dict[str, list[Part]] = {}
    for p in parts:
        by_name.setdefault(p.name, []).append(p)
    for name, given in by_name.items():
        if len(given) > 1 and not name.startswith("timestamp_granularities"):
            raise bad(f"'{name}' is given {len(given)} times", name)

    def text(name: str) -> str | None:
        return _text_field(by_name[name][0]) if name in by_name else None

    files = by_name.get("file")
    if not files:
        raise bad("'file' is required: the audio file as a form part (e.g. curl -F file=@speech.wav)", "file", "missing_file")
    file = files[0]
    if file.filename is None:
        raise bad("'file' must be a file part (with a filename), not a text field", "file", "invalid_type")
    if not file.data:
        raise bad("'file' is empty (0 bytes)", "file", "empty_file")
    model = text("model")
    if model is None:
        raise bad("'model' is required", "model", "missing_model")
    if model != model_name:
        raise APIError(404, f"the model '{model[:100]}' does not exist; this server serves '{model_name}'", "model", "model_not_found")
    fmt = text("response_format") or "json"
    if fmt not in FORMATS:
        raise bad(f"'response_format' must be one of {', '.join(FORMATS)}, got {fmt[:40]!r}", "response_format", "unsupported_value")
    temperature = 0.0
    if (t := text("temperature")) is not None and t.strip():
        try:
            temperature = float(t)
        except ValueError:
            raise bad(f"'temperature' must be a number, got {t[:40]!r}", "temperature", "invalid_type") from None
        if not (math.isfinite(temperature) and 0 <= temperature <= 1):
            raise bad(f"'temperature' must be between 0 and 1, got {t[:40]}", "temperature")
    stream = (text("stream") or "false").strip().lower()
    if stream not in ("true", "false"):
        raise bad(f"'stream' must be true or false, got {stream[:40]!r}", "stream", "invalid_type")
    if stream == "true" and fmt not in ("json", "text"):
        raise bad(f"stream=true sends transcript.text.delta/done events: 'response_format' must be json or text, got {fmt!r}",
                  "response_format", "unsupported_value")
    for p in by_name.get("timestamp_granularities[]", []) + by_name.get("timestamp_granularities", []):
        if (g := _text_field(p)) != "segment":
            raise bad(f"'timestamp_granularities[]' {g[:40]!r} is not supported (only 'segment': each window's start and end)",
                      p.name, "unsupported_value")
    language = text("language")
    if language is not None and not re.fullmatch(r"[a-z]{2,3}", language):
        raise bad(f"'language' must be an ISO-639-1 code such as 'en', got {language[:40]!r}", "language")
    prompt = text("prompt")
    return AudioRequest(task, file.data, file.filename, prompt or None, language, fmt, openai_sampling(temperature), stream == "true")


def decode_upload(req: AudioRequest, limits: MediaLimits):
    """The upload as a 16 kHz waveform: header probed and charged first (duration, bytes), then decoded."""
    budget = Budget(MediaLimits(max_audio_seconds=limits.max_audio_seconds, max_bytes=limits.max_bytes))  # windows, not the context
    budget.charge_bytes(len(req.audio), "file")
    return probe_audio_bytes(req.audio, "file", "file", budget)()


# -- the windows as jobs ----------------------------------------------------------------------------------------------
@dataclass
class Window:
    start: int  # samples
    end: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # stripped, once done
    job: Job | None = None


class Windows:
    """A request's pieces as scheduler jobs: submitted in order, at most `in_flight` at once; `events()` gives back
    their text in order. `close()` cancels whatever is still running (the client left, or the answer is done)."""

    def __init__(self, server, req: AudioRequest, wave, pieces: list[tuple[int, int]], instruction: str):
        self.server, self.req, self.wave, self.instruction = server, req, wave, instruction
        self.windows = [Window(a, b) for a, b in pieces]
        self.queues = [asyncio.Queue() for _ in pieces]
        self.loop = asyncio.get_running_loop()
        self.in_flight, self.running = server.scheduler.engine.rows, 0
        self.freed = asyncio.Event()
        self.ready: dict[int, tuple[dict, int]] = {}  # inputs prepared ahead (the longest window, checked first)
        self.task: asyncio.Task | None = None
        self.text = ""  # the joined transcript, once `events()` has run to the end

    def messages(self, w: Window) -> list[dict]:
        out = [{"role": "system", "content": self.req.prompt}] if self.req.prompt else []
        return out + [{"role": "user", "content": [{"type": "audio", "audio": self.wave[w.start : w.end]},
                                                    {"type": "text", "text": self.instruction}]}]

    def prepare(self, i: int) -> tuple[dict, int]:
        """Model inputs of window i and its token budget; APIError when a window cannot run in this server's context."""
        server, w = self.server, self.windows[i]
        try:
            inputs = server.model.processor.apply_chat_template(self.messages(w), add_generation_prompt=True, tokenize=True)
            server.model.check_inputs(**inputs)
        except (ValueError, AudioError, ImageError) as e:
            raise bad(str(e), "file") from None
        n = int(inputs["input_ids"].shape[1])
        if n >= server.max_len:
            raise bad(f"a window of {(w.end - w.start) / SAMPLE_RATE:.1f} s and the instruction take {n} tokens, which leaves no room "
                      f"in this server's context of {server.max_len} tokens (--max-model-len)", "file", "context_length_exceeded")
        return inputs, min(server.settings.transcribe_max_tokens, server.max_len - n)

    def check(self) -> None:
        """Prepare the longest window now (in the caller's thread): a context too small is a 400 before any job runs."""
        if self.windows:
            i = max(range(len(self.windows)), key=lambda k: self.windows[k].end - self.windows[k].start)
            self.ready[i] = self.prepare(i)

    async def start(self) -> None:
        """Submit the first `in_flight` windows together (one batch from the first decode step; a full queue is a 429
        here), then, in a task, one more as each of ours ends."""
        if self.windows:
            first = await self._submit(0)
            self.task = asyncio.create_task(self._submit_rest(first))

    def job(self, i: int) -> Job:
        inputs, budget = self.ready.pop(i) if i in self.ready else self.prepare(i)
        return Job(inputs, replace(self.req.sampling, max_new_tokens=budget), set(eos_ids(None)), self._emitter(i), logprobs=True)

    async def _submit(self, i: int) -> int:
        """Windows i, i+1, … as many as rows (and the queue) have room for, submitted together; returns the next index."""
        while self.running >= self.in_flight:
            self.freed.clear()
            await self.freed.wait()
        sched, n = self.server.scheduler, len(self.windows)
        take = range(i, min(n, i + self.in_flight - self.running, i + max(1, sched.max_queue - len(sched.waiting))))
        jobs = await run_in_threadpool(lambda: [self.job(k) for k in take])
        while True:
            try:
                sched.submit_all(jobs)
                break
            except QueueFull as e:  # wait for one of ours to finish; with none running, the server is full
                if not self.running:
                    raise APIError(429, str(e), None, "queue_full", "rate_limit_error") from None
                self.freed.clear()
                await self.freed.wait()
        for k, job in zip(take, jobs):
            self.windows[k].job = job
        self.running += len(jobs)
        return take.stop

    async def _submit_rest(self, i: int) -> None:
        try:
            while i < len(self.windows):
                i = await self._submit(i)
        except APIError as e:  # reported where the answer has got to: window i's events
            self.queues[i].put_nowait(("error", e))

    def _emitter(self, i: int):
        def emit(kind, value):  # the engine thread
            self.loop.call_soon_threadsafe(self._event, i, kind, value)
        return emit

    def _event(self, i: int, kind: str, value) -> None:
        self.queues[i].put_nowait((kind, value))
        if kind in ("done", "error"):
            self.running -= 1
            self.freed.set()

    def abandon(self) -> None:
        """The client left: every window's events end at once."""
        for q in self.queues:
            q.put_nowait(("gone", None))

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for w in self.windows:
            if w.job is not None:
                self.server.scheduler.cancel(w.job)  # a no-op for a finished job

    async def events(self):
        """("text", piece) of the joined transcript as it becomes final, ("window", i) as window i ends, windows in
        order; returns early (without "window" for the rest) when the client leaves."""
        joined = Joined()
        processor = self.server.model.processor
        for i, w in enumerate(self.windows):
            stream = TextStream(processor)
            joined.next_window()
            while True:
                kind, value = await self.queues[i].get()
                if kind == "gone":
                    return
                if kind == "error":
                    if isinstance(value, APIError):
                        raise value
                    raise bad(str(value), "file")  # the engine refused the prompt after all
                if kind == "done":
                    break
                w.tokens.append(value)
                if piece := joined.push(stream.push(value)):
                    yield "text", piece
            w.text = stream.text.strip()
            yield "window", i
        self.text = joined.text

    @property
    def usage(self) -> dict:
        prompt = sum(w.job.prompt_tokens for w in self.windows if w.job is not None)
        audio = sum(clip_tokens(w.end - w.start, self.server.model.config.audio_frames, self.server.model.config.audio_pool)
                    for w in self.windows if w.job is not None)
        out = sum(w.job.produced for w in self.windows if w.job is not None)
        return {"type": "tokens", "input_tokens": prompt, "input_token_details": {"audio_tokens": audio, "text_tokens": prompt - audio},
                "output_tokens": out, "total_tokens": prompt + out}


class Joined:
    """Window texts → one transcript, delta by delta: each window's text stripped, windows joined by one space
    (trailing whitespace is held back until more text follows it)."""

    def __init__(self):
        self.text, self.pending, self.started = "", "", False

    def next_window(self) -> None:
        self.pending, self.started = "", False

    def push(self, piece: str) -> str:
        lead = ""
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started, lead = True, " " if self.text else ""
        body = self.pending + piece
        kept = body.rstrip()
        self.pending = body[len(kept):]
        self.text += lead + kept
        return lead + kept


# -- answers ---------------------------------------------------------------------------------------------------------
def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def segments(windows: Windows, temperature: float) -> list[dict]:
    """verbose_json's segments: one per window, its times in seconds of the clip (OpenAI's fields; `no_speech_prob`
    is not estimated and is 0)."""
    out = []
    for i, w in enumerate(windows.windows):
        raw = w.text.encode()
        produced = w.job.produced if w.job is not None else 0
        out.append({"id": i, "seek": w.start // 160, "start": round(w.start / SAMPLE_RATE, 3), "end": round(w.end / SAMPLE_RATE, 3),
                    "text": w.text, "tokens": w.tokens, "temperature": temperature,
                    "avg_logprob": round(w.job.logprob_sum / produced, 4) if produced else 0.0,
                    "compression_ratio": round(len(raw) / len(zlib.compress(raw)), 4) if raw else 0.0, "no_speech_prob": 0.0})
    return out


def answer(req: AudioRequest, windows: Windows, duration: float):
    """(body, media type) of a whole answer in the request's response_format."""
    text, fmt = windows.text, req.response_format
    if fmt == "json":
        return {"text": text, "usage": windows.usage}, "application/json"
    if fmt == "text":
        return text + "\n", "text/plain; charset=utf-8"
    cues = [w for w in windows.windows if w.text]
    if fmt == "srt":
        body = "".join(f"{i}\n{_clock(w.start / SAMPLE_RATE, ',')} --> {_clock(w.end / SAMPLE_RATE, ',')}\n{w.text}\n\n"
                       for i, w in enumerate(cues, 1))
        return body, "text/plain; charset=utf-8"
    if fmt == "vtt":
        body = "WEBVTT\n\n" + "".join(f"{_clock(w.start / SAMPLE_RATE, '.')} --> {_clock(w.end / SAMPLE_RATE, '.')}\n{w.text}\n\n"
                                      for w in cues)
        return body, "text/vtt; charset=utf-8"
    language = "english" if req.task == "translate" else req.language or "unknown"
    return {"task": req.task, "language": language, "duration": round(duration, 3), "text": text,
            "segments": segments(windows, req.temperature), "usage": {"type": "duration", "seconds": round(duration, 3)}}, "application/json"


async def stream_events(windows: Windows):
    """The server-sent events of a streamed transcription (OpenAI's), ending with `transcript.text.done`."""
    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        async for kind, value in windows.events():
            if kind == "text":
                yield event({"type": "transcript.text.delta", "delta": value})
        yield event({"type": "transcript.text.done", "text": windows.text, "usage": windows.usage})
    except APIError as e:  # headers are sent: reported in-band, as the chat stream does
        yield event(e.body())
    finally:
        windows.close()


def instruction(server, task: str) -> str:
    s = server.settings
    return s.translate_prompt if task == "translate" else s.transcribe_prompt


async def run(server, req: AudioRequest, gone) -> tuple[Windows, float]:
    """Decode and split the upload, check the longest window fits, start its windows. `gone()` says whether the
    client has left (then nothing is started)."""
    wave = await run_in_threadpool(decode_upload, req, server.limits.media)
    pieces = await run_in_threadpool(split_at_pauses, wave, WINDOW_SECONDS)
    if pieces and wave.shape[0] <= WINDOW_SECONDS * SAMPLE_RATE:  # one window: the clip as it is, silences included (as trained)
        pieces = [(0, wave.shape[0])]
    windows = Windows(server, req, wave, pieces, instruction(server, req.task))
    await run_in_threadpool(windows.check)
    duration = wave.shape[0] / SAMPLE_RATE
    server.counters.audio_seconds += duration
    server.counters.audio_windows += len(pieces)
    if not gone():
        await windows.start()
    return windows, duration
