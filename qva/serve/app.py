"""The HTTP side of `qva-serve`: OpenAI's Chat Completions API over FastAPI, answered by the scheduler.

    POST /v1/chat/completions   streaming (server-sent events, `data: [DONE]`) or not
    GET  /v1/models             the one served model
    GET  /health                200 ready; 503 loading, failed, or the engine stuck
    GET  /metrics               Prometheus text: requests, tokens, queue, time to first token, tokens/s

A request is parsed and its media decoded (`protocol.py`), turned into model inputs by the checkpoint's
`Processor` and checked (context length, placeholders) in a worker thread, before any encoder runs;
then it waits for an engine row (`scheduler.py`). Every refusal is a 4xx with OpenAI's error body; a
full queue is a 429 at once. Text is detokenized here (`generate.TextStream`), and `stop` strings are
matched here: a match cancels the job, which frees its row before the next decode step, as a client
disconnecting does.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..audio import AudioError
from ..generate import TextStream, eos_ids
from ..image_processing import ImageError
from .protocol import APIError, ChatRequest, Limits, bad, chunk, completion, parse_chat_request, usage_chunk
from .scheduler import Job, QueueFull, Scheduler


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
    max_body_bytes: int = 64 * 2**20
    stuck_after: float = 120.0  # seconds with work and no progress before /health says 503


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
    requests: dict = field(default_factory=dict)  # HTTP status → chat requests answered

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
        self.limits = Limits(s.model_name, s.limit_media, s.allow_remote_media, defaults)
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

    def health(self) -> tuple[int, dict]:
        if self.load_error:
            return 503, {"status": "failed", "error": self.load_error}
        if self.scheduler is None:
            return 503, {"status": "loading"}
        if self.scheduler.stuck(self.settings.stuck_after):
            return 503, {"status": "stuck", "error": repr(self.scheduler.error) if self.scheduler.error else "no progress"}
        return 200, {"status": "ok"}

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

    async def events(self, req: ChatRequest, job: Job, queue: asyncio.Queue, request: Request | None):
        """("text", piece) as text becomes final, then ("done", finish_reason). With `request` (not streaming)
        the client is polled, and a disconnect cancels the job; streaming responses are cancelled by Starlette."""
        text = TextStream(self.model.processor)
        hold = max((len(s) for s in req.stop), default=1) - 1  # characters that could still start a stop string
        sent = 0
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return  # the finally below cancels the job
                    continue
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
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(server: Server, loader=None) -> FastAPI:
    """The FastAPI app; `loader()` (if given) loads the model in a thread when the app starts."""

    async def lifespan(app):
        if loader is not None:
            server.load_in_background(loader)
        yield
        if server.scheduler is not None:
            server.scheduler.close()

    app = FastAPI(title="qva", lifespan=lifespan)
    s = server.settings

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e, {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown routes, wrong methods
        return error_response(APIError(e.status_code, str(e.detail), None, None, "invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug: still OpenAI's shape
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"[:500], None, None, "server_error"))

    @app.middleware("http")
    async def count_and_authorise(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/") and s.api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {s.api_key}".encode()):
                response = error_response(APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", None,
                                                   "invalid_api_key"), {"WWW-Authenticate": "Bearer"})
                server.requests[401] = server.requests.get(401, 0) + 1
                return response
        response = await call_next(request)
        if path == "/v1/chat/completions":
            server.requests[response.status_code] = server.requests.get(response.status_code, 0) + 1
        return response

    def ready() -> None:
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
        return PlainTextResponse(prometheus(server), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        ready()
        raw = await request.body()
        if len(raw) > s.max_body_bytes:
            raise APIError(413, f"the request body is {len(raw)} bytes, over the server's limit of {s.max_body_bytes}", None,
                           "request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
            raise bad(f"the request body is not valid JSON ({type(e).__name__}: {e})"[:300], None, "invalid_json") from None
        req = await run_in_threadpool(parse_chat_request, body, server.limits)
        inputs, budget = await run_in_threadpool(server.prepare, req)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(inputs, budget, set(eos_ids(None)), lambda kind, value: loop.call_soon_threadsafe(queue.put_nowait, (kind, value)),
                  do_sample=req.temperature > 0, temperature=req.temperature or 1.0, top_k=req.top_k,
                  top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=req.seed)
        try:
            server.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), None, "queue_full", "rate_limit_error") from None
        n_prompt = job.prompt_tokens
        if req.stream:
            return StreamingResponse(sse(server, req, job, queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, finish = [], None
        try:
            async for kind, value in server.events(req, job, queue, request):
                if kind == "text":
                    text.append(value)
                else:
                    finish = value
        except (ValueError, RuntimeError) as e:  # the engine refused the prompt after all
            raise bad(str(e), "messages") from None
        if finish is None:  # the client went away
            return JSONResponse({}, status_code=499)
        return completion(req, s.model_name, "".join(text), finish, n_prompt, job.produced)

    return app


async def sse(server: Server, req: ChatRequest, job: Job, queue: asyncio.Queue):
    name = server.settings.model_name

    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    yield event(chunk(req, name, {"role": "assistant", "content": ""}))
    try:
        async for kind, value in server.events(req, job, queue, None):
            if kind == "text":
                yield event(chunk(req, name, {"content": value}))
            else:
                yield event(chunk(req, name, {}, value))
    except (ValueError, RuntimeError) as e:  # headers are sent: report in-band, as OpenAI does
        yield event(bad(str(e), "messages").body())
    if req.include_usage:
        yield event(usage_chunk(req, name, job.prompt_tokens, job.produced))
    yield "data: [DONE]\n\n"


def prometheus(server: Server) -> str:
    """The /metrics page, in Prometheus' text format."""
    lines = []

    def metric(name, kind, help, samples):
        lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("qva_requests_total", "counter", "Chat completion requests answered, by HTTP status.",
           [(f'{{status="{k}"}}', v) for k, v in sorted(server.requests.items())] or [('{status="200"}', 0)])
    sched = server.scheduler
    if sched is not None:
        st = sched.stats
        metric("qva_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", st.prompt_tokens)])
        metric("qva_generation_tokens_total", "counter", "Tokens generated.", [("", st.generation_tokens)])
        metric("qva_queue_depth", "gauge", "Requests waiting for an engine row.", [("", len(sched.waiting))])
        metric("qva_running_requests", "gauge", "Requests holding an engine row.", [("", len(sched.active))])
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
