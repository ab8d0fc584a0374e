"""The HTTP side of `qva-serve`: OpenAI's Chat Completions API over FastAPI, answered by the scheduler.

    POST /v1/chat/completions     streaming (server-sent events, `data: [DONE]`) or not
    POST /v1/audio/transcriptions OpenAI's form upload → text, json, verbose_json, srt, vtt, or streamed events
    POST /v1/audio/translations   the same, asking for English (`transcribe.py`)
    GET  /v1/models               the one served model
    GET  /                        the playground page (`static/playground.html`), answered without the key
    GET  /health                  200 ready; 503 loading, failed, or the engine stuck (`metrics.py`)
    GET  /metrics                 Prometheus text: requests, tokens, media, queue, time to first token, tokens/s

A body is read against a size limit (Content-Length first, then counted) and a deadline; it is parsed
and its media decoded within the request's budget (`protocol.py`, `media.py`), turned into model inputs
by the checkpoint's `Processor` and checked (context length, placeholders) in a worker thread, before
any encoder runs; then it waits for an engine row (`scheduler.py`). Every refusal is a 4xx with OpenAI's
error body; a full queue is a 429 at once. Text is detokenized here (`generate.TextStream`), and `stop`
strings are matched here: a match cancels the job, which frees its row before the next decode step, as
a client disconnecting does (noticed at once, whether it streams or not, and even before its job is
submitted).

`Gate` wraps the app: the API key (every route but /, /health and /metrics), and the count of every answer
by route and status, 5xx included. On shutdown (`Server.drain`) new requests get 503 and running ones
are cut at the grace period's end with `finish_reason` "length", so every stream ends cleanly.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..audio import AudioError, clip_tokens
from ..generate import TextStream, eos_ids
from ..image_processing import ImageError
from . import transcribe
from .media import MediaLimits
from .metrics import CLIENT_GONE, Counters, liveness, prometheus
from .multipart import parse_form
from .protocol import APIError, ChatRequest, Limits, bad, chunk, completion, parse_chat_request, usage_chunk
from .scheduler import Job, QueueFull, Scheduler

AUDIO_ROUTES = ("/v1/audio/transcriptions", "/v1/audio/translations")
ROUTES = ("/v1/chat/completions", *AUDIO_ROUTES, "/v1/models", "/", "/health", "/metrics", "/docs", "/redoc", "/openapi.json")
OPEN_ROUTES = ("/", "/health", "/metrics")  # answered without the API key (the page's own requests carry it)
PLAYGROUND = Path(__file__).with_name("static") / "playground.html"


@dataclass
class Settings:
    max_batch: int = 8
    max_model_len: int | None = None  # default: the model's context, at most 4096
    max_queue: int = 64
    limit_media: int = 8
    allow_remote_media: bool = False
    api_key: str | None = None
    model_name: str = "qva"
    compile: bool = False
    max_body_bytes: int = 64 * 2**20  # a request body, and the media bytes of one request (inline and fetched)
    max_media_pixels: int = 2**26  # decoded image and video-frame pixels per request
    max_audio_seconds: float = 3600.0  # audio per request (and never more than the context holds)
    fetch_timeout: float = 10.0  # seconds for one remote media URL (--allow-remote-media), redirects included
    read_timeout: float = 30.0  # seconds for a request's headers to arrive, and again for its body
    max_connections: int = 512  # open HTTP connections (`connections.py`)
    shutdown_timeout: float = 10.0  # grace for running requests after SIGTERM/SIGINT
    stuck_after: float = 120.0  # seconds with work and no progress before /health says 503
    transcribe_prompt: str = transcribe.DEFAULT_TRANSCRIBE_PROMPT  # what the audio endpoints ask (the trained prompt, if known)
    translate_prompt: str = transcribe.DEFAULT_TRANSLATE_PROMPT
    transcribe_max_tokens: int = 448  # tokens per ≤ 30 s window (Whisper's decoder holds 448)


@dataclass
class Server:
    """What the app serves; `model` is None until loaded (loading runs in a thread so /health answers meanwhile)."""

    settings: Settings
    model: object = None
    scheduler: Scheduler | None = None
    limits: Limits | None = None
    max_len: int = 0
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    counters: Counters = field(default_factory=lambda: Counters(ROUTES))  # what /metrics reports from the HTTP side
    draining: bool = False  # shutting down: no new requests

    def attach(self, model) -> None:
        """Serve a loaded model: build the scheduler (caches allocated once) and the request limits."""
        s = self.settings
        if model.processor is None:
            raise ValueError("the model has no processor (tokenizer.json): it cannot serve text")
        context = model.config.text.max_position_embeddings
        self.max_len = min(s.max_model_len or min(context, 4096), context)
        defaults = {}
        gen = json.loads(model.processor.kept_files.get("generation_config.json", "{}") or "{}")
        for key in ("temperature", "top_p", "top_k"):
            if isinstance(gen.get(key), (int, float)) and not isinstance(gen.get(key), bool):
                defaults[key] = gen[key]
        cfg = model.processor.config
        hears = cfg is not None and cfg.audio is not None
        media = MediaLimits(max_pixels=s.max_media_pixels, max_audio_seconds=s.max_audio_seconds, max_bytes=s.max_body_bytes,
                            fetch_timeout=s.fetch_timeout, context=self.max_len if hears else None,
                            audio_tokens=(lambda n: clip_tokens(n, cfg.audio_frames, cfg.audio_pool)) if hears else None)
        self.limits = Limits(s.model_name, s.limit_media, s.allow_remote_media, defaults, media)
        self.scheduler = Scheduler(model, s.max_batch, self.max_len, s.max_queue, s.compile)
        self.model = model

    def load_in_background(self, loader) -> threading.Thread:
        def run():
            try:
                self.attach(loader())
            except Exception as e:  # reported by /health (and by qva-serve, which then exits)
                self.load_error = f"{type(e).__name__}: {e}"
        t = threading.Thread(target=run, name="qva-load", daemon=True)
        t.start()
        return t

    def drain(self, timeout: float) -> None:
        """Shutting down: refuse new requests; running ones end within `timeout` seconds (cut with "length")."""
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.drain(timeout)

    def count(self, path: str, status: int) -> None:
        self.counters.answer(path, status)

    def health(self) -> tuple[int, dict]:
        return liveness(self.load_error, self.scheduler, self.settings.stuck_after)

    # -- a request's life -------------------------------------------------------------------------------
    def prepare(self, req: ChatRequest) -> tuple[dict, int]:
        """Model inputs for a parsed request and its token budget; APIError for what cannot run."""
        model = self.model
        try:
            inputs = model.processor.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True)
        except (ValueError, AudioError, ImageError) as e:  # no audio encoder, bad frames, placeholder mismatch …
            raise bad(str(e), "messages") from None
        n = int(inputs["input_ids"].shape[1])
        if req.max_tokens is not None and n + req.max_tokens > self.max_len:
            raise bad(f"the prompt ({n} tokens) + max_tokens ({req.max_tokens}) is over this server's context of {self.max_len} tokens",
                      "max_tokens", "context_length_exceeded")
        if n >= self.max_len:
            raise bad(f"the prompt ({n} tokens) leaves no room in this server's context of {self.max_len} tokens",
                      "messages", "context_length_exceeded")
        try:
            model.check_inputs(**inputs)
        except ValueError as e:
            raise bad(str(e), "messages") from None
        return inputs, req.max_tokens or self.max_len - n

    async def events(self, req: ChatRequest, job: Job, queue: asyncio.Queue):
        """("text", piece) as text becomes final, then ("done", finish_reason). A ("gone", None) in the queue (the
        client left: `until_disconnect`) ends it; streaming responses are cancelled by Starlette instead. Either
        way the finally below cancels the job, which frees its row before the next decode step."""
        text = TextStream(self.model.processor)
        hold = max((len(s) for s in req.stop), default=1) - 1  # characters that could still start a stop string
        sent = 0
        try:
            while True:
                kind, value = await queue.get()
                if kind == "gone":
                    return
                if kind == "error":
                    raise value
                if kind == "done":
                    if text.text[sent:]:
                        yield "text", text.text[sent:]
                    yield "done", value
                    return
                text.push(value)
                full = text.text
                hits = [i for i in (full.find(s, max(sent - hold, 0)) for s in req.stop) if i >= 0]
                if hits:  # the finally below cancels the job, freeing its row
                    if min(hits) > sent:
                        yield "text", full[sent:min(hits)]
                    yield "done", "stop"
                    return
                if len(full) - hold > sent:
                    yield "text", full[sent:len(full) - hold]
                    sent = len(full) - hold
        finally:
            self.scheduler.cancel(job)  # a no-op for a finished job; frees the row of an abandoned one


def error_response(e: APIError, headers: dict | None = None) -> JSONResponse:
    if e.status in (401, 408, 413):  # the body may be unread: the connection cannot carry another request
        headers = {**(headers or {}), "Connection": "close"}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def authorised(header: str, key: str) -> bool:
    """`Authorization: Bearer <key>`; the scheme's case does not matter (RFC 7235), the key's does."""
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class Gate:
    """ASGI middleware around the whole app: the API key, and the count of every answer by route and status
    (a bug's 500 included, answered here in OpenAI's shape and logged)."""

    def __init__(self, app, server: "Server"):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, key = scope["path"], self.server.settings.api_key
        status = None

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if key is not None and path not in OPEN_ROUTES:
                given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                if not authorised(given, key):
                    e = APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", None, "invalid_api_key")
                    return await error_response(e, {"WWW-Authenticate": "Bearer"})(scope, receive, counted)
            await self.app(scope, receive, counted)
        except Exception as e:  # a bug: still OpenAI's shape, and counted
            if status is not None:
                raise
            traceback.print_exc(file=sys.stderr)
            body = APIError(500, f"internal error: {type(e).__name__}: {e}"[:500], None, None, "server_error")
            await error_response(body)(scope, receive, counted)
        finally:
            self.server.count(path, status if status is not None else CLIENT_GONE)


async def read_body(request: Request, limit: int, timeout: float) -> bytes | None:
    """The request body, or None when the client left first: 413 past `limit` bytes (Content-Length is
    checked before anything is read, then the bytes are counted), 408 when it has not all arrived within
    `timeout` seconds."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {int(length)} bytes, over the server's limit of {limit}", None, "request_too_large")
    loop = asyncio.get_running_loop()
    deadline, chunks, n = loop.time() + timeout, [], 0
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), deadline - loop.time())
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout:g} s", None, "request_timeout") from None
        if message["type"] == "http.disconnect":
            return None
        body = message.get("body", b"")
        n += len(body)
        if n > limit:
            raise APIError(413, f"the request body is over the server's limit of {limit} bytes", None, "request_too_large")
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def until_gone(request: Request, gone) -> None:
    """Call `gone()` when the client leaves (once its body is read, the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone()


def playground_page(server: Server) -> str:
    """The playground with what it needs to know filled in (its `QVA_CONFIG` object): the model's name, whether a
    key is needed, the sampling defaults, whether the model hears."""
    s, defaults = server.settings, server.limits.defaults if server.limits else {}
    config = {"model": s.model_name, "keyRequired": s.api_key is not None, "defaults": defaults,
              "hears": bool(server.model is not None and server.model.audio_encoder is not None)}
    return PLAYGROUND.read_text().replace("{} /*QVA_CONFIG*/", json.dumps(config).replace("</", "<\\/"), 1)


async def until_disconnect(request: Request, queue: asyncio.Queue) -> None:
    """Wait for the client to leave (once its body is read, the next ASGI message is the disconnect), then
    tell the request's event loop ("gone")."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(("gone", None))


def create_app(server: Server, loader=None) -> FastAPI:
    """The FastAPI app; `loader()` (if given) loads the model in a thread when the app starts."""

    async def lifespan(app):
        if loader is not None:
            server.load_in_background(loader)
        yield
        if server.scheduler is not None:
            server.scheduler.close()

    app = FastAPI(title="qva", lifespan=lifespan)
    app.add_middleware(Gate, server=server)
    s = server.settings

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e, {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown routes, wrong methods
        return error_response(APIError(e.status_code, str(e.detail), None, None, "invalid_request_error"))

    def ready() -> None:
        if server.draining:
            raise APIError(503, "the server is shutting down", None, "shutting_down", "server_error")
        if server.scheduler is None:
            raise APIError(503, "the model is still loading" if not server.load_error else f"the model failed to load: {server.load_error}",
                           None, "model_not_ready", "server_error")
        if server.scheduler.error is not None or not server.scheduler.thread.is_alive():
            raise APIError(503, f"the engine stopped: {server.scheduler.error!r}", None, "engine_failed", "server_error")

    @app.get("/health")
    async def health():
        status, body = server.health()
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": int(server.started), "owned_by": "qva"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(server.counters, server.scheduler), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(playground_page(server), headers={"Cache-Control": "no-cache"})

    async def audio_endpoint(request: Request, task: str):
        ready()
        raw = await read_body(request, s.max_body_bytes, s.read_timeout)
        if raw is None:
            return Response(status_code=CLIENT_GONE)
        if server.model.audio_encoder is None:
            raise bad("this model has no audio encoder, so it cannot transcribe (serve a graft: --whisper PATH, or a trained "
                      "qva folder)", "model", "model_cannot_hear")
        parts = await run_in_threadpool(parse_form, raw, request.headers.get("content-type"))
        del raw
        req = transcribe.parse_audio_request(parts, task, s.model_name)
        del parts
        gone = asyncio.Event()
        watcher = asyncio.create_task(until_gone(request, gone.set))
        windows = None
        try:
            windows, duration = await transcribe.run(server, req, gone.is_set)
            if gone.is_set():
                return Response(status_code=CLIENT_GONE)
            if req.stream:  # Starlette watches a streaming client itself, and cancels the stream when it leaves
                watcher.cancel()
                events, windows = transcribe.stream_events(windows), None  # the stream closes its windows
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            watcher.add_done_callback(lambda _: windows.abandon())
            finished = 0
            async for kind, _ in windows.events():
                finished += kind == "window"
            if finished < len(windows.windows):  # the client went away
                return Response(status_code=CLIENT_GONE)
            body, media_type = transcribe.answer(req, windows, duration)
            if isinstance(body, str):
                return Response(body, media_type=media_type)
            return JSONResponse(body)
        finally:
            watcher.cancel()
            if windows is not None:
                windows.close()

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await audio_endpoint(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await audio_endpoint(request, "translate")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        ready()
        raw = await read_body(request, s.max_body_bytes, s.read_timeout)
        if raw is None:  # the client left before sending its whole body
            return Response(status_code=CLIENT_GONE)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
            raise bad(f"the request body is not valid JSON ({type(e).__name__}: {e})"[:300], None, "invalid_json") from None
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        watcher = asyncio.create_task(until_disconnect(request, queue))  # from here on a disconnect is noticed at once
        try:
            req = await run_in_threadpool(parse_chat_request, body, server.limits)
            inputs, budget = await run_in_threadpool(server.prepare, req)
            if watcher.done():  # the client left while its media were decoded: nothing is submitted
                return Response(status_code=CLIENT_GONE)
            server.counters.admitted(req.messages)
            job = Job(inputs, replace(req.sampling, max_new_tokens=budget), set(eos_ids(None)),
                      lambda kind, value: loop.call_soon_threadsafe(queue.put_nowait, (kind, value)))
            try:
                server.scheduler.submit(job)
            except QueueFull as e:
                raise APIError(429, str(e), None, "queue_full", "rate_limit_error") from None
            n_prompt = job.prompt_tokens
            if req.stream:  # Starlette watches a streaming client itself, and cancels the stream when it leaves
                watcher.cancel()
                return StreamingResponse(sse(server, req, job, queue), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, finish = [], None
            try:
                async for kind, value in server.events(req, job, queue):
                    if kind == "text":
                        text.append(value)
                    else:
                        finish = value
            except (ValueError, RuntimeError) as e:  # the engine refused the prompt after all
                raise bad(str(e), "messages") from None
            if finish is None:  # the client went away
                return Response(status_code=CLIENT_GONE)
            return completion(req, s.model_name, "".join(text), finish, n_prompt, job.produced)
        finally:
            watcher.cancel()

    return app


async def sse(server: Server, req: ChatRequest, job: Job, queue: asyncio.Queue):
    name = server.settings.model_name

    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    yield event(chunk(req, name, {"role": "assistant", "content": ""}))
    try:
        async for kind, value in server.events(req, job, queue):
            if kind == "text":
                yield event(chunk(req, name, {"content": value}))
            else:
                yield event(chunk(req, name, {}, value))
    except (ValueError, RuntimeError) as e:  # headers are sent: report in-band, as OpenAI does
        yield event(bad(str(e), "messages").body())
    if req.include_usage:
        yield event(usage_chunk(req, name, job.prompt_tokens, job.produced))
    yield "data: [DONE]\n\n"
