"""What the server counts and how it says it is alive, in one place: `/metrics` (Prometheus' text format)
and `/health`.

    Stats     written by the engine thread (scheduler.py): prompt and generated tokens, time to first token,
              tokens per second over the last 10 s
    Counters  written by the HTTP side (app.py): every answer by route and status, chat answers by status,
              media parts admitted by kind, audio transcribed (seconds and windows)
    liveness  200 ready; 503 while loading, after a failed load, or when the engine has work and has not
              moved for `stuck_after` seconds (or its thread died)

Both sides only add to counters (ints and floats, whose updates the interpreter makes whole); the one
structure read while written, the recent-tokens deque, is under a lock.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

CLIENT_GONE = 499  # the status recorded for a request whose client left before its answer (nothing is sent)


class Stats:
    """Counters for /metrics, written by the engine thread and read by the HTTP one (the deque under a lock)."""

    TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

    def __init__(self):
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft_counts = [0] * (len(self.TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.recent = collections.deque()  # (time, tokens) of decode steps in the last 10 s
        self.lock = threading.Lock()
        self.decode_steps = self.decode_rows = 0  # rows ÷ steps: the mean batch a decode step ran

    def decoded(self, rows: int) -> None:
        self.decode_steps += 1
        self.decode_rows += rows

    def first_token(self, seconds: float) -> None:
        self.ttft_sum += seconds
        for i, edge in enumerate(self.TTFT_BUCKETS):
            if seconds <= edge:
                self.ttft_counts[i] += 1
                return
        self.ttft_counts[-1] += 1

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        self.generation_tokens += n
        with self.lock:
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - 10:
                self.recent.popleft()

    def tokens_per_second(self) -> float:
        with self.lock:
            now, recent = time.monotonic(), list(self.recent)
        recent = [(t, n) for t, n in recent if t >= now - 10]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1e-3)


@dataclass
class Counters:
    """What the HTTP side counts."""

    routes: tuple[str, ...]  # the routes counted by name; any other path counts as "other"
    answers: dict = field(default_factory=dict)  # (route, HTTP status) → answers
    chat: dict = field(default_factory=dict)  # HTTP status → chat completion answers
    media: dict = field(default_factory=dict)  # "image" | "video" | "audio" → parts of admitted chat requests
    audio_seconds: float = 0.0  # seconds of audio admitted for transcription or translation
    audio_windows: int = 0  # the windows (≤ 30 s each) those were transcribed in

    def answer(self, path: str, status: int) -> None:
        route = path if path in self.routes else "other"
        self.answers[route, status] = self.answers.get((route, status), 0) + 1
        if route == "/v1/chat/completions":
            self.chat[status] = self.chat.get(status, 0) + 1

    def admitted(self, messages: list[dict]) -> None:
        """A chat request's media parts (qva form: {"type": "image"|"video"|"audio", ...}), counted by kind."""
        for m in messages:
            if isinstance(m.get("content"), list):
                for part in m["content"]:
                    if part.get("type") != "text":
                        self.media[part["type"]] = self.media.get(part["type"], 0) + 1


def liveness(load_error: str | None, scheduler, stuck_after: float) -> tuple[int, dict]:
    """/health: (HTTP status, body)."""
    if load_error:
        return 503, {"status": "failed", "error": load_error}
    if scheduler is None:
        return 503, {"status": "loading"}
    if scheduler.stuck(stuck_after):
        return 503, {"status": "stuck", "error": repr(scheduler.error) if scheduler.error else "no progress"}
    return 200, {"status": "ok"}


def prometheus(counters: Counters, scheduler) -> str:
    """The /metrics page, in Prometheus' text format."""
    lines = []

    def metric(name, kind, help, samples):
        lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("qva_requests_total", "counter", "Chat completion requests answered, by HTTP status.",
           [(f'{{status="{k}"}}', v) for k, v in sorted(counters.chat.items())] or [('{status="200"}', 0)])
    metric("qva_http_requests_total", "counter", f"HTTP answers by route and status ({CLIENT_GONE}: the client left first).",
           [(f'{{route="{r}",status="{k}"}}', v) for (r, k), v in sorted(counters.answers.items())]
           or [('{route="/v1/chat/completions",status="200"}', 0)])
    metric("qva_media_parts_total", "counter", "Media parts of admitted chat requests, by kind.",
           [(f'{{kind="{k}"}}', counters.media.get(k, 0)) for k in ("image", "video", "audio")])
    metric("qva_transcribed_audio_seconds_total", "counter", "Seconds of audio admitted for transcription or translation.",
           [("", round(counters.audio_seconds, 3))])
    metric("qva_transcribed_windows_total", "counter", "Windows (at most 30 s each) that audio was transcribed in.",
           [("", counters.audio_windows)])
    if scheduler is not None:
        st = scheduler.stats
        metric("qva_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", st.prompt_tokens)])
        metric("qva_generation_tokens_total", "counter", "Tokens generated.", [("", st.generation_tokens)])
        metric("qva_decode_steps_total", "counter", "Decode steps run.", [("", st.decode_steps)])
        metric("qva_decode_rows_total", "counter", "Rows decoded, summed over steps (÷ steps: the mean batch).", [("", st.decode_rows)])
        metric("qva_queue_depth", "gauge", "Jobs (chat requests, transcription windows) waiting for an engine row.", [("", len(scheduler.waiting))])
        metric("qva_running_requests", "gauge", "Jobs holding an engine row.", [("", len(scheduler.active))])
        cumulative, samples = 0, []
        for edge, count in zip(list(st.TTFT_BUCKETS) + ["+Inf"], st.ttft_counts):
            cumulative += count
            samples.append((f'_bucket{{le="{edge}"}}', cumulative))
        samples += [("_sum", round(st.ttft_sum, 6)), ("_count", cumulative)]
        lines.extend(["# HELP qva_time_to_first_token_seconds Submission to first token.",
                      "# TYPE qva_time_to_first_token_seconds histogram"])
        lines.extend(f"qva_time_to_first_token_seconds{suffix} {v}" for suffix, v in samples)
        metric("qva_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
               [("", round(st.tokens_per_second(), 3))])
    return "\n".join(lines) + "\n"
