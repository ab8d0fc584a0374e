"""qva-serve end to end: a real server process on the tiny demo checkpoints (fp32), driven by the official
`openai` client and by raw HTTP. Greedy answers are compared token for token with offline `generate`."""

from __future__ import annotations

import io
import json
import random
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ServeProcess, demo_server, http
from PIL import Image
from serve_helpers import audio_part, b64, image_part, metric, png, wav

import qva
from qva.generate import eos_ids
from qva.serve.protocol import Limits, decode_audio, decode_image, parse_chat_request

openai = pytest.importorskip("openai")
KEY = "sk-test"
NAME = "tiny"


@pytest.fixture(scope="module")
def server(demo_dirs):
    srv = demo_server(demo_dirs, KEY, NAME, "--max-batch", "4", "--max-model-len", "320", "--limit-media", "3")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(demo_fp32):
    return demo_fp32


def offline_answer(model, messages: list[dict], max_tokens: int) -> str:
    """Greedy `generate` on the OpenAI messages (decoded as the server decodes them), up to the first EOS."""
    body = {"model": NAME, "messages": messages}
    req = parse_chat_request(body, Limits(NAME))
    inputs = model.processor.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True)
    out = model.generate(**inputs, max_new_tokens=max_tokens)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(eos_ids(None))
    out = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
    return model.processor.decode(out)


def post(server, body, key=KEY, **kw):
    return http(server.base + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"} if key else {}, **kw)


# -- the happy paths ------------------------------------------------------------------------------------------------
def test_streamed_image_and_audio_answer_equals_generate(server, client, offline):
    content = [image_part(png(0)), audio_part(wav(2.0, 1)), {"type": "text", "text": "What do you see and hear?"}]
    messages = [{"role": "user", "content": content}]
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens > 100  # the image and audio placeholders are in the prompt
    assert len(text) == 16 and text == offline_answer(offline, messages, 16)


def test_eight_concurrent_clients_get_offline_greedy_answers(server, client, offline):
    prompts = []
    for i in range(8):
        content = [{"type": "text", "text": f"Question {i}: " + "why " * (i * 3)}]
        if i % 3 == 1:
            content.insert(0, image_part(png(i)))
        if i % 3 == 2:
            content.insert(0, audio_part(wav(0.5 + i / 4, i)))
        prompts.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}])
    lengths = [6 + 3 * i for i in range(8)]  # rows finish at different steps, so rows leave and waiting ones join
    answers: dict[int, str] = {}

    def ask(i):
        r = client.chat.completions.create(model=NAME, messages=prompts[i], max_tokens=lengths[i], temperature=0)
        answers[i] = (r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert answers[i] == (offline_answer(offline, prompts[i], lengths[i]), lengths[i], "length"), i


def test_multi_turn_stop_seed_and_models(server, client, offline):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."},
                {"role": "developer", "content": "Answer in one word."}, {"role": "user", "content": "Again?"}]
    full = offline_answer(offline, messages, 20)
    stop = full[5:7]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stop=[stop, "never"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == full[: full.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=20, temperature=0, stop=stop, stream=True))
    assert streamed == full[: full.index(stop)]
    sampled = [client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=1.5, top_p=0.9, seed=s)
               .choices[0].message.content for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert [m.id for m in client.models.list().data] == [NAME]


@pytest.fixture(scope="module")
def one_row(demo_dirs):
    """A server with one engine row and room for one waiting request."""
    srv = ServeProcess("--model", str(demo_dirs[0]), "--dtype", "fp32", "--served-model-name", NAME, "--max-batch", "1", "--max-queue", "1")
    yield srv
    srv.stop()


def test_disconnect_frees_the_row(one_row):
    before = metric(one_row, "qva_generation_tokens_total")
    conn = stream_open(one_row, 3000)
    resp = conn.getresponse()
    for _ in range(3 * 2):  # three events (and their blank lines): the row is decoding
        resp.fp.readline()
    assert metric(one_row, "qva_running_requests") == 1
    conn.sock.shutdown(2)  # the client goes away mid-answer
    conn.close()
    deadline = time.monotonic() + 5
    while metric(one_row, "qva_running_requests") != 0:
        assert time.monotonic() < deadline, "the disconnected request still holds its row"
        time.sleep(0.01)
    assert metric(one_row, "qva_generation_tokens_total") - before < 1000  # stopped early: it asked for 3000
    assert post(one_row, msg({"type": "text", "text": "next"}), key=None)[0] == 200  # the row serves the next request


def test_health_metrics_and_auth(server):
    assert http(server.base + "/health") == (200, b'{"status":"ok"}')
    status, body = post(server, {"model": NAME, "messages": [{"role": "user", "content": "x"}]}, key=None)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert post(server, {"model": NAME, "messages": [{"role": "user", "content": "x"}]}, key="wrong")[0] == 401
    assert http(server.base + "/v1/models")[0] == 401
    status, body = http(server.base + "/metrics")
    text = body.decode()
    for name in ("qva_requests_total{status=\"200\"}", "qva_requests_total{status=\"401\"}", "qva_prompt_tokens_total",
                 "qva_generation_tokens_total", "qva_queue_depth", "qva_time_to_first_token_seconds_bucket",
                 "qva_generation_tokens_per_second"):
        assert name in text, name
    assert metric(server, "qva_generation_tokens_total") > 0


# -- bad input: a 4xx naming the problem, and the server keeps serving --------------------------------------------------
def msg(*parts):
    return {"model": NAME, "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}


NAN_WAV = io.BytesIO()
sf.write(NAN_WAV, np.array([0.1, float("nan"), 0.2] * 800, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
ONE_HZ_WAV = io.BytesIO()  # a header claiming 1 Hz: 20 000 samples would resample to 320 million
sf.write(ONE_HZ_WAV, np.zeros(20_000, np.float32), 1, format="WAV")


def png_missing_rows() -> bytes:
    """A PNG whose (valid, complete) compressed stream holds only the top half of its rows: Pillow decodes it without
    complaint and leaves the bottom half black."""
    import struct
    import zlib

    rows = 40
    raw = b"".join(b"\0" + bytes([(7 * y + x) % 256 for x in range(3 * 50)]) for y in range(rows // 2))  # filter 0, RGB, 50 wide

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = struct.pack(">IIBBBBB", 50, rows, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def gif_cut_short() -> bytes:
    """An animated GIF cut inside its second frame (Pillow raises IndexError counting or decoding its frames)."""
    rng = np.random.RandomState(0)
    frames = [Image.fromarray((rng.rand(60, 80, 3) * 255).astype(np.uint8)) for _ in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()[: len(buf.getvalue()) // 4]


def text_body(**extra) -> dict:
    return {**msg({"type": "text", "text": "x"}), **extra}


BAD = {
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, "invalid_json"),
    "not an object": ([1, 2], 400, "invalid_type"),
    "unknown model": ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
    "no messages": ({"model": NAME}, 400, "invalid_type"),
    "bad role": ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value"),
    "bad base64 image": (msg({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}), 400, "invalid_base64"),
    "undecodable image": (msg(image_part(b"not a png")), 400, "invalid_image"),
    "remote image": (msg({"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}), 400, "remote_media_disabled"),
    "bad base64 audio": (msg({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}), 400, "invalid_base64"),
    "undecodable audio": (msg(audio_part(b"RIFF....WAVEjunk")), 400, "invalid_audio"),
    "unsupported audio format": (msg({"type": "input_audio", "input_audio": {"data": b64(b"x"), "format": "aac"}}), 400,
                                 "unsupported_audio_format"),
    "NaN audio samples": (msg(audio_part(NAN_WAV.getvalue())), 400, "invalid_audio"),
    "too much media": (msg(*[image_part(png(i)) for i in range(4)]), 400, "too_many_media"),
    "prompt + max_tokens over the context": ({**msg({"type": "text", "text": "x"}), "max_tokens": 300}, 400, "context_length_exceeded"),
    "prompt alone over the context": (msg({"type": "text", "text": "word " * 400}), 400, "context_length_exceeded"),
    "negative max_tokens": ({**msg({"type": "text", "text": "x"}), "max_tokens": -1}, 400, "invalid_value"),
    "string temperature": ({**msg({"type": "text", "text": "x"}), "temperature": "hot"}, 400, "invalid_type"),
    "n = 2": ({**msg({"type": "text", "text": "x"}), "n": 2}, 400, "invalid_value"),
    "unknown part type": (msg({"type": "file", "file": {}}), 400, "invalid_value"),
    "video as mp4": (msg({"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(b"\0\0\0 ftypisom")}}), 400,
                     "invalid_video"),
    "PNG missing its bottom rows": (msg(image_part(png_missing_rows())), 400, "invalid_image"),
    "GIF video cut short": (msg({"type": "video_url", "video_url": {"url": "data:image/gif;base64," + b64(gif_cut_short())}}), 400,
                            "invalid_video"),
    "audio header claiming 1 Hz": (msg(audio_part(ONE_HZ_WAV.getvalue())), 400, "invalid_audio"),
    "response_format json_schema": (text_body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
                                    "unsupported_value"),
    "response_format json_object": (text_body(response_format={"type": "json_object"}), 400, "unsupported_value"),
    "response_format not an object": (text_body(response_format="text"), 400, "invalid_type"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_a_named_4xx(server, case):
    body, status, code = BAD[case]
    got, raw = post(server, body)
    err = json.loads(raw)["error"]
    assert (got, err["code"]) == (status, code), err
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_audio_to_a_model_without_an_audio_encoder(demo_dirs):
    srv = ServeProcess("--model", str(demo_dirs[0]), "--dtype", "fp32", "--served-model-name", NAME, "--max-model-len", "256")
    try:
        status, raw = post(srv, msg(audio_part(wav(0.5, 0))), key=None)
        assert status == 400 and "no audio encoder" in json.loads(raw)["error"]["message"]
        assert post(srv, msg({"type": "text", "text": "still serving?"}), key=None)[0] == 200
    finally:
        srv.stop()


def test_refusals_name_what_is_wrong(server):
    err = json.loads(post(server, BAD["audio header claiming 1 Hz"][0])[1])["error"]
    assert "1 Hz" in err["message"] and "1000" in err["message"] and err["param"].endswith("input_audio.data")
    err = json.loads(post(server, BAD["response_format json_schema"][0])[1])["error"]
    assert err["param"] == "response_format.type" and "'json_schema'" in err["message"] and "'text'" in err["message"]


def test_openai_defaults_and_any_case_are_accepted(server, offline):
    """OpenAI's default response_format, an upper-case audio format and a lower-case auth scheme are all fine."""
    clip = wav(0.5, 4)
    answers = []
    for fmt, scheme in (("wav", "Bearer"), ("WAV", "bearer"), ("Wav", "BEARER")):
        body = {**msg(audio_part(clip, fmt), {"type": "text", "text": "hi"}), "response_format": {"type": "text"}, "temperature": 0}
        status, raw = http(server.base + "/v1/chat/completions", body, {"Authorization": f"{scheme} {KEY}"})
        assert status == 200, raw
        answers.append(json.loads(raw)["choices"][0]["message"]["content"])
    assert answers[0] == answers[1] == answers[2] == offline_answer(offline, msg(audio_part(clip), {"type": "text", "text": "hi"})["messages"], 4)
    assert http(server.base + "/v1/models", headers={"Authorization": f"bearer {KEY}"})[0] == 200
    assert http(server.base + "/v1/models", headers={"Authorization": f"Basic {KEY}"})[0] == 401


def test_docs_need_the_key_and_answers_are_counted_by_route(server):
    for path in ("/docs", "/openapi.json", "/redoc"):
        status, raw = http(server.base + path)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key", path
        assert http(server.base + path, headers={"Authorization": f"Bearer {KEY}"})[0] == 200, path
    route = 'qva_http_requests_total{route="/v1/models",status="401"}'
    before, chat_401 = metric(server, route), metric(server, 'qva_requests_total{status="401"}')
    for _ in range(3):
        assert http(server.base + "/v1/models")[0] == 401
    assert metric(server, route) == before + 3
    assert metric(server, 'qva_requests_total{status="401"}') == chat_401  # /v1/models is not a chat request


def test_internal_errors_are_openai_shaped_and_counted(demo_dirs, offline, monkeypatch):
    """A bug's 500 (here: prepare raising) is answered in OpenAI's shape and counted in /metrics, by route."""
    import asyncio

    from qva.serve.app import Server, Settings, create_app

    srv = Server(Settings(model_name=NAME, max_batch=1, max_model_len=64))
    srv.attach(offline)
    try:
        monkeypatch.setattr(srv, "prepare", lambda req: 1 / 0)
        app = create_app(srv)

        async def call(method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
            sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                return messages.pop(0) if messages else await asyncio.sleep(3600)

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
                     "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
                     "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                     "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
            await app(scope, receive, send)
            return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

        status, raw = asyncio.run(call("POST", "/v1/chat/completions", json.dumps(text_body()).encode()))
        err = json.loads(raw)["error"]
        assert status == 500 and err["type"] == "server_error" and "ZeroDivisionError" in err["message"]
        page = asyncio.run(call("GET", "/metrics"))[1].decode()
        assert 'qva_requests_total{status="500"} 1' in page
        assert 'qva_http_requests_total{route="/v1/chat/completions",status="500"} 1' in page
    finally:
        srv.scheduler.close()


def random_body(rng: random.Random, depth: int = 0):
    leaves = [None, True, 0, -1, 1.5, float("inf"), "", "x" * rng.randrange(50), "data:image/png;base64,AAAA", NAME, "user", 10**20]
    if depth > 3 or rng.random() < 0.4:
        return rng.choice(leaves)
    if rng.random() < 0.5:
        return [random_body(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["model", "messages", "role", "content", "type", "text", "image_url", "url", "input_audio", "data", "format", "max_tokens",
            "temperature", "top_p", "stream", "stop", "seed", "n", "stream_options", "video_url", "frames", "x"]
    return {rng.choice(keys): random_body(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_fuzzed_bodies_never_5xx(server):
    rng = random.Random(0)
    statuses = []
    for i in range(300):
        body = random_body(rng)
        if i % 3 == 0:  # mostly well-formed envelopes with random insides
            message = {"role": rng.choice(["user", "assistant", "system", 3]), "content": random_body(rng, 1)}
            body = {"model": NAME, "max_tokens": 2, "messages": [message], **(body if isinstance(body, dict) else {})}
        raw = json.dumps(body).encode() if rng.random() < 0.9 else json.dumps(body).encode()[: rng.randrange(1, 20)]
        statuses.append(post(server, raw)[0])
    assert max(statuses) < 500 and statuses.count(200) < len(statuses)
    assert http(server.base + "/health")[0] == 200
    assert post(server, msg({"type": "text", "text": "alive?"}))[0] == 200


def stream_open(srv, max_tokens: int):
    """A streaming request left open (its row or queue place held until the connection is closed)."""
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", srv.port, timeout=30)
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "go on"}], "max_tokens": max_tokens, "stream": True})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    return conn


def test_full_queue_answers_429_at_once(one_row):
    running = stream_open(one_row, 3000)
    running.getresponse().fp.readline()
    waiting = stream_open(one_row, 3000)  # one row, so this one queues
    deadline = time.monotonic() + 10
    while metric(one_row, "qva_queue_depth") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.perf_counter()
    status, raw = post(one_row, msg({"type": "text", "text": "me too"}), key=None)
    assert status == 429 and json.loads(raw)["error"]["code"] == "queue_full" and time.perf_counter() - t0 < 2
    for conn in (waiting, running):  # both clients leave: the row and the queue place are freed
        conn.sock.shutdown(2)
        conn.close()
    while metric(one_row, "qva_running_requests") + metric(one_row, "qva_queue_depth") > 0:
        assert time.monotonic() < deadline + 10
        time.sleep(0.01)
    assert post(one_row, msg({"type": "text", "text": "now?"}), key=None)[0] == 200


# -- media decoding equals the files' ---------------------------------------------------------------------------------
def test_media_decoding_matches_files(tmp_path):
    for fmt, subtype in (("WAV", "PCM_16"), ("FLAC", None), ("MP3", None)):
        raw = wav(1.0, 3, fmt, subtype)
        path = tmp_path / f"a.{fmt.lower()}"
        path.write_bytes(raw)
        got = decode_audio({"data": b64(raw), "format": fmt.lower()}, "x")
        assert torch.equal(got, qva.load_audio(path)), fmt
    im = decode_image(png(1), "x")
    assert np.array_equal(np.asarray(im), np.asarray(Image.open(io.BytesIO(png(1)))))


def test_video_as_frames_and_as_gif(server, client, offline):
    frames = [png(10 + i, size=(84, 56)) for i in range(4)]
    gif = io.BytesIO()
    images = [Image.open(io.BytesIO(f)).convert("RGB") for f in frames]
    images[0].save(gif, "GIF", save_all=True, append_images=images[1:], duration=100)
    for video in ({"frames": ["data:image/png;base64," + b64(f) for f in frames]}, {"url": "data:image/gif;base64," + b64(gif.getvalue())}):
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": video}, {"type": "text", "text": "What happens?"}]}]
        r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
        assert r.usage.prompt_tokens > 20 and r.choices[0].message.content == offline_answer(offline, messages, 8)


def test_remote_media_only_when_allowed():
    body = msg({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})
    with pytest.raises(Exception, match="remote URLs are not fetched"):
        parse_chat_request(body, Limits(NAME))
    fetched = []
    req = parse_chat_request(body, Limits(NAME, allow_remote_media=True), fetch=lambda url, where: fetched.append(url) or png(0))
    assert fetched == ["https://example.com/cat.png"] and req.messages[0]["content"][0]["image"].size == (112, 84)


def test_cli_errors_are_one_line(tmp_path, demo_dirs):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "qva.serve.cli", *args], capture_output=True, text=True, timeout=120)

    out = run("--model", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and out.stderr.strip() == f"qva-serve: error: {tmp_path / 'nowhere'}: no such model folder"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((demo_dirs[0] / "config.json").read_text())
    out = run("--model", str(broken), "--port", "0")
    assert out.returncode == 2 and "qva-serve: error:" in out.stderr and "Traceback" not in out.stderr
    out = run("--model", str(demo_dirs[0]), "--api-key", "")  # a server no client could use
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("qva-serve: error: --api-key")
    from qva.cli import UserError
    from qva.serve.cli import parse_args, settings_and_loader

    for flag, value, says in (("--read-timeout", "0", "--read-timeout must be a positive number of seconds, got 0.0"),
                              ("--shutdown-timeout", "nan", "--shutdown-timeout must be a positive number of seconds, got nan"),
                              ("--max-media-pixels", "0", "--max-media-pixels must be ≥ 1, got 0")):
        with pytest.raises(UserError, match=f"^{says}$"):
            settings_and_loader(parse_args(["--model", str(demo_dirs[0]), flag, value]))
    settings, _ = settings_and_loader(parse_args(["--model", str(demo_dirs[0])]))
    assert (settings.max_body_bytes, settings.max_media_pixels, settings.max_audio_seconds, settings.read_timeout,
            settings.max_connections, settings.shutdown_timeout, settings.fetch_timeout) == (64 * 2**20, 2**26, 3600, 30, 512, 10, 10)
