"""qva-serve under hostile input: every limit is checked before the memory or time it bounds is spent.

Real server processes on the tiny demo checkpoints; raw sockets and a local HTTP server, all on 127.0.0.1
(no other address is ever contacted: the refusals of private targets are checked with `connect` patched to
fail). Memory is the server process's peak resident set over what it held before the request
(`/proc/PID/clear_refs`, VmHWM)."""

from __future__ import annotations

import io
import json
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import soundfile as sf
from conftest import ServeProcess, http
from PIL import Image
from serve_helpers import (
    PeakRSS,
    audio_part,
    b64,
    connect,
    error_of,
    image_part,
    metric,
    png,
    read_answer,
    request_head,
    status_of,
    until,
    wait_closed,
    wav,
)

from qva.serve.errors import APIError
from qva.serve.fetch import LOOPBACK_ENV
from qva.serve.media import MediaLimits
from qva.serve.protocol import Limits, parse_chat_request

NAME = "tiny"
MiB = 2**20
CHAT = "/v1/chat/completions"


def msg(*parts, max_tokens: int = 4) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": list(parts)}], "max_tokens": max_tokens}


def post(srv, body, timeout: float = 60) -> tuple[int, dict]:
    status, raw = http(srv.base + CHAT, body, timeout=timeout)
    return status, json.loads(raw) if raw else {}


@pytest.fixture(scope="module")
def guarded(demo_dirs):
    """Default media limits, one engine row, a 2 s read timeout and room for 64 connections."""
    qwen, whisper = demo_dirs
    srv = ServeProcess("--model", str(qwen), "--whisper", str(whisper), "--dtype", "fp32", "--served-model-name", NAME,
                       "--max-batch", "1", "--max-queue", "2", "--max-model-len", "4096", "--read-timeout", "2",
                       "--max-connections", "64")
    assert post(srv, msg(image_part(png(0)), audio_part(wav(1.0, 0)), {"type": "text", "text": "warm up"}))[0] == 200
    yield srv
    srv.stop()


# -- media: sizes, counts and durations from headers, before decoding -------------------------------------------------
@pytest.fixture(scope="module")
def long_flacs() -> dict[str, bytes]:
    """Silent FLACs (small: silence compresses well): 2 hours, and 10 minutes (under --max-audio-seconds, over the context)."""
    out = {}
    for name, minutes in (("2 h", 120), ("10 min", 10)):
        buf = io.BytesIO()
        with sf.SoundFile(buf, "w", 16000, 1, format="FLAC") as f:
            for _ in range(minutes):
                f.write(np.zeros(16000 * 60, np.int16))
        out[name] = buf.getvalue()
    return out


def one_hz_wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(20_000, np.float32), 1, format="WAV")  # 20 000 s at 1 Hz: 320 million samples at 16 kHz
    return buf.getvalue()


def test_audio_is_refused_from_its_header(guarded, long_flacs):
    cases = {"2 h": (long_flacs["2 h"], "flac", "audio_too_long", "lasts 7200.0 s"),
             "10 min": (long_flacs["10 min"], "flac", "context_length_exceeded", "(600.0 s, 30000 tokens) does not fit"),
             "1 Hz": (one_hz_wav(), "wav", "invalid_audio", "says 1 Hz, outside the 1000–384000 Hz")}
    for case, (raw, fmt, code, says) in cases.items():
        with PeakRSS(guarded.proc.pid) as peak:
            status, body = post(guarded, msg(audio_part(raw, fmt)))
        assert (status, body["error"]["code"]) == (400, code), (case, body)
        assert says in body["error"]["message"], (case, body)
        assert peak.growth < 64 * MiB, (case, peak.growth / MiB)  # decoded, the 2 h clip alone is 7200 × 16000 float32 samples


def test_images_and_videos_are_refused_from_their_headers(guarded):
    big = io.BytesIO()
    Image.new("RGB", (7072, 7072), (40, 90, 200)).save(big, "PNG")  # 50 megapixels, one colour: a small file
    base = Image.new("P", (320, 240), 0)
    base.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    frames = []
    for i in range(2000):  # each frame one pixel different from the last: a small file, 2000 × 320 × 240 RGB decoded
        frames.append(base.copy())
        frames[-1].putpixel((i % 320, i // 320), 1)
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=40)
    cases = {
        "eight 50-megapixel PNGs": (msg(*[image_part(big.getvalue())] * 8), "media_too_large",
                                    "content[1].image_url: the image is 7072×7072 (50013184 pixels) brings the request's media "
                                    "to 100026368 decoded pixels, over this server's limit of 67108864"),
        "a GIF of 2000 frames": (msg({"type": "video_url", "video_url": {"url": "data:image/gif;base64," + b64(gif.getvalue())}}),
                                 "invalid_video", "the video has 2000 frames, over 256"),
    }
    for case, (body, code, says) in cases.items():
        with PeakRSS(guarded.proc.pid) as peak:
            status, answer = post(guarded, body)
        assert (status, answer["error"]["code"]) == (400, code), (case, answer)
        assert says in answer["error"]["message"], (case, answer)
        assert peak.growth < 64 * MiB, (case, peak.growth / MiB)


def test_pixel_budget_counts_every_part_before_any_is_decoded():
    gif = io.BytesIO()
    frames = [Image.new("RGB", (80, 60), (i * 60, 0, 0)) for i in range(4)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    video = {"type": "video_url", "video_url": {"url": "data:image/gif;base64," + b64(gif.getvalue())}}
    limits = Limits(NAME, media=MediaLimits(max_pixels=4 * 80 * 60 + 112 * 84))
    req = parse_chat_request(msg(video, image_part(png(1))), limits)  # exactly at the limit
    assert len(req.messages[0]["content"][0]["video"]) == 4 and req.messages[0]["content"][1]["image"].size == (112, 84)
    with pytest.raises(APIError, match=r"content\[2\].image_url: the image is 112×84 \(9408 pixels\) brings the request's media to "
                                        r"38016 decoded pixels, over this server's limit of 28608 \(--max-media-pixels\)") as e:
        parse_chat_request(msg(video, image_part(png(1)), image_part(png(2))), limits)
    assert (e.value.status, e.value.code, e.value.param) == (400, "media_too_large", "messages[0].content[2].image_url")
    frames_spec = {"type": "video_url", "video_url": {"frames": ["data:image/png;base64," + b64(png(i)) for i in range(3)]}}
    with pytest.raises(APIError, match=r"frames\[2\]: the image is 112×84"):
        parse_chat_request(msg(frames_spec), Limits(NAME, media=MediaLimits(max_pixels=2 * 112 * 84)))
    with pytest.raises(APIError, match=r"the audio lasts 2.0 s; the request's audio may last 3 s in all") as e:
        parse_chat_request(msg(audio_part(wav(1.5, 0)), audio_part(wav(2.0, 1))), Limits(NAME, media=MediaLimits(max_audio_seconds=3)))
    assert e.value.param == "messages[0].content[1].input_audio"


def interlaced_png(pixels: np.ndarray, keep: int | None = None) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG (Pillow writes none), its filtered rows cut to `keep` bytes if given."""
    import struct
    import zlib

    h, w, _ = pixels.shape
    rows = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        rows += b"".join(b"\0" + row.tobytes() for row in pixels[y0::dy, x0::dx] if row.size)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(rows[:keep])) + chunk(b"IEND", b"")


def test_complete_pngs_of_every_layout_decode_and_cut_ones_do_not():
    from qva.serve.media import decode_image

    rng = np.random.RandomState(0)
    rgba = (rng.rand(37, 53, 4) * 255).astype(np.uint8)
    rgb = Image.fromarray(rgba[..., :3])
    layouts = {"RGB": (rgb, {}), "RGBA": (Image.fromarray(rgba), {}), "L": (rgb.convert("L"), {}), "LA": (rgb.convert("LA"), {}),
               "P": (rgb.convert("P"), {}), "P, 4 bits": (rgb.quantize(16), {"bits": 4}), "P, 2 bits": (rgb.quantize(4), {"bits": 2}),
               "1 bit": (rgb.convert("1"), {}), "16 bits": (Image.fromarray(rgba[..., 0].astype(np.uint16) * 257), {})}
    for name, (im, kw) in layouts.items():
        buf = io.BytesIO()
        im.save(buf, "PNG", **kw)
        assert np.array_equal(np.asarray(decode_image(buf.getvalue(), "x")), np.asarray(im)), name
    for shape in ((37, 53), (1, 1), (8, 8), (3, 9)):
        pixels = (rng.rand(*shape, 3) * 255).astype(np.uint8)
        assert np.array_equal(np.asarray(decode_image(interlaced_png(pixels), "x").convert("RGB")), pixels), shape
        if pixels.size > 3:  # the last pass's last byte missing: refused, not decoded with a black pixel
            with pytest.raises(APIError, match=r"x: cannot decode the image \(OSError\)"):
                decode_image(interlaced_png(pixels, keep=-1), "x")


def test_a_flac_without_its_length_is_refused():
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, np.float32), 16000, format="FLAC")
    raw = bytearray(buf.getvalue())
    info = int.from_bytes(raw[18:26], "big")  # STREAMINFO: rate, channels, bits, then 36 bits of total samples
    raw[18:26] = (info & ~((1 << 36) - 1)).to_bytes(8, "big")  # total samples 0: "unknown", as a streamed encoder leaves it
    with pytest.raises(APIError, match="the audio's header does not give its length"):
        parse_chat_request(msg(audio_part(bytes(raw), "flac")), Limits(NAME))


# -- bodies: Content-Length first, then counted while read; slow bodies and heads time out -------------------------------
def test_bodies_over_the_limit_are_refused_while_small(guarded):
    with PeakRSS(guarded.proc.pid) as peak:
        sock = connect(guarded)
        t0 = time.monotonic()
        sock.sendall(request_head(CHAT, 200_000_000) + b"x" * MiB)  # claims 200 MB, sends 1 MiB
        answer = read_answer(sock, time.monotonic() + 5)
        sock.close()
    assert status_of(answer) == 413 and error_of(answer)["code"] == "request_too_large", answer[:300]
    assert b"200000000 bytes, over the server's limit of 67108864" in answer and time.monotonic() - t0 < 2
    assert peak.growth < 16 * MiB, peak.growth / MiB
    with PeakRSS(guarded.proc.pid) as peak:  # no Content-Length (chunked): counted as it arrives, refused past the limit
        sock = connect(guarded)
        sock.sendall(request_head(CHAT, None, "Transfer-Encoding: chunked\r\n"))
        piece = b"%x\r\n%s\r\n" % (MiB, b"y" * MiB)
        try:
            for _ in range(200):  # 200 MiB offered; the server stops reading after 64
                sock.sendall(piece)
        except OSError:  # the server answered and closed
            pass
        answer = read_answer(sock, time.monotonic() + 5)
        sock.close()
    assert status_of(answer) == 413 and b"over the server's limit of 67108864 bytes" in answer, answer[:300]
    assert peak.growth < 64 * MiB + 48 * MiB, peak.growth / MiB  # the limit itself, and no more than a copy's worth besides


def test_huge_content_length_and_slow_body_do_not_hold_the_connection(guarded):
    sock = connect(guarded)
    t0 = time.monotonic()
    sock.sendall(request_head(CHAT, 10_000_000_000))  # 10 GB announced, nothing sent
    answer = read_answer(sock, t0 + 5)
    assert status_of(answer) == 413 and time.monotonic() - t0 < 1.5, answer[:200]  # answered and closed at once
    sock.close()
    sock = connect(guarded)
    t0 = time.monotonic()
    sock.sendall(request_head(CHAT, 1000) + b'{"model": "tiny", ')  # then nothing more
    answer = read_answer(sock, t0 + 10)
    waited = time.monotonic() - t0
    assert status_of(answer) == 408 and error_of(answer)["code"] == "request_timeout" and 1.9 < waited < 4, (waited, answer[:200])
    sock.close()


def test_silent_and_slow_header_connections_are_closed_and_others_served(guarded):
    """200 connections that send nothing and 50 that drip their headers: closed by the server (evicted when over
    --max-connections, or 408 after --read-timeout), while ordinary requests are answered throughout."""
    socks = []
    silent = [connect(guarded) for _ in range(200)]
    slow = [connect(guarded) for _ in range(50)]
    socks = silent + slow
    head = request_head(CHAT, 10)
    stop = threading.Event()

    def drip():
        for i in range(len(head)):
            for s in slow:
                try:
                    s.send(head[i:i + 1])
                except OSError:
                    pass
            if stop.wait(0.25):
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        t0 = time.monotonic()
        for _ in range(3):
            assert http(guarded.base + "/health", timeout=5)[0] == 200
            assert post(guarded, msg({"type": "text", "text": "still there?"}), timeout=10)[0] == 200
        answers = [wait_closed(s, t0 + 2 + 3) for s in socks]  # each ends when the server closes the connection
        assert time.monotonic() - t0 < 2 + 3.5
    finally:
        stop.set()
        dripper.join()
        for s in socks:
            s.close()
    assert sum(a is None for a in answers) == 0  # none still open
    assert all(a == b"" or status_of(a) == 408 for a in answers), [a[:80] for a in answers if a and status_of(a) != 408][:3]
    assert sum(status_of(a) == 408 for a in answers if a) >= 50  # the survivors of eviction timed out, with an answer
    assert http(guarded.base + "/health")[0] == 200


# -- disconnects free the row at once, streaming or not -------------------------------------------------------------
def test_disconnected_clients_stop_their_work(guarded):
    before = metric(guarded, "qva_generation_tokens_total")
    sock = connect(guarded)
    body = json.dumps(msg({"type": "text", "text": "go on and on"}, max_tokens=3000)).encode()  # not streamed
    sock.sendall(request_head(CHAT, len(body)) + body)
    until(lambda: metric(guarded, "qva_running_requests") == 1, 10, "the request never started")
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    until(lambda: metric(guarded, "qva_running_requests") == 0, 2, "the abandoned request still holds its row")
    used = metric(guarded, "qva_generation_tokens_total") - before
    time.sleep(0.3)
    assert metric(guarded, "qva_generation_tokens_total") - before == used < 1000  # stopped, far short of 3000
    gone = f'qva_http_requests_total{{route="{CHAT}",status="499"}}'
    for case in ("half a body", "a whole body, then gone during decoding and prefill"):
        before, left = metric(guarded, "qva_generation_tokens_total"), metric(guarded, gone)
        sock = connect(guarded)
        if case == "half a body":
            sock.sendall(request_head(CHAT, len(body)) + body[:40])
        else:
            big = json.dumps(msg(image_part(png(3, size=(1200, 900))), {"type": "text", "text": "x"}, max_tokens=3000)).encode()
            sock.sendall(request_head(CHAT, len(big)) + big)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        until(lambda: metric(guarded, gone) == left + 1, 10, f"{case}: not recorded as a client gone (499)")
        time.sleep(0.3)
        assert metric(guarded, "qva_running_requests") == 0 and metric(guarded, "qva_generation_tokens_total") - before < 50, case
    assert metric(guarded, f'qva_http_requests_total{{route="{CHAT}",status="500"}}') == 0
    assert post(guarded, msg({"type": "text", "text": "next"}))[0] == 200


# -- shutdown: a bounded grace, every stream ended cleanly; a second signal ends it at once ------------------------------
def open_stream(srv):
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("POST", CHAT, json.dumps({"model": NAME, "messages": [{"role": "user", "content": "tell me"}], "stream": True}),
                 {"Content-Type": "application/json"})  # no max_tokens: the rest of the context
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # the role chunk: the stream is running
    return conn, resp


def test_sigterm_ends_streams_cleanly_within_the_grace(demo_dirs):
    srv = ServeProcess("--model", str(demo_dirs[0]), "--dtype", "fp32", "--served-model-name", NAME, "--max-batch", "4",
                       "--max-model-len", "4096", "--shutdown-timeout", "2")
    try:
        streams = [open_stream(srv) for _ in range(4)]
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        events: list[list[str]] = [[] for _ in streams]

        def drain(i):
            for line in streams[i][1]:
                if line.startswith(b"data: "):
                    events[i].append(line[6:].decode().strip())

        readers = [threading.Thread(target=drain, args=(i,)) for i in range(4)]
        for r in readers:
            r.start()
        srv.proc.wait(timeout=2 + 8)
        exited = time.monotonic() - t0
        for r in readers:
            r.join(timeout=5)
    finally:
        srv.stop()
    assert exited < 2 + 5, exited
    for i, got in enumerate(events):
        assert got[-1] == "[DONE]", (i, got[-3:])
        last = json.loads(got[-2])
        assert last["choices"][0]["finish_reason"] == "length", (i, last)  # cut by the shutdown, as by max_tokens


def test_a_second_signal_exits_at_once(demo_dirs):
    srv = ServeProcess("--model", str(demo_dirs[0]), "--dtype", "fp32", "--served-model-name", NAME, "--max-batch", "2",
                       "--max-model-len", "4096", "--shutdown-timeout", "60")
    try:
        stream = open_stream(srv)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert srv.proc.poll() is None  # the first signal waits for the stream
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGINT)
        srv.proc.wait(timeout=5)
        assert time.monotonic() - t0 < 2 and srv.proc.returncode == 128 + signal.SIGINT
        stream[0].close()
    finally:
        srv.stop()


# -- remote media: public addresses only, checked before connecting; one deadline; a size cap; our own words -------------
REFUSED = {
    "http://127.0.0.1:9/cat.png": "a loopback address",
    "http://localhost:9/cat.png": "a loopback address",
    "http://[::1]:9/cat.png": "a loopback address",
    "http://10.1.2.3/cat.png": "a private address",
    "http://192.168.7.7/cat.png": "a private address",
    "http://[::ffff:10.1.2.3]/cat.png": "a private address",
    "http://169.254.1.1/latest/meta-data": "a link-local address",
    "http://[fe80::1]/cat.png": "a link-local address",
    "http://224.0.0.1/cat.png": "a multicast address",
    "http://0.0.0.0:9/cat.png": "an unspecified address",
    "http://240.1.2.3/cat.png": "a reserved address",
    "http://100.64.1.1/cat.png": "an address that is not publicly routable",
}


@pytest.mark.parametrize("url", list(REFUSED))
def test_private_targets_are_refused_before_any_connection(url, monkeypatch):
    monkeypatch.delenv(LOOPBACK_ENV, raising=False)
    attempts = []

    def no_connect(*args, **kw):
        attempts.append(args)
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connect)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", no_connect)
    body = msg({"type": "image_url", "image_url": {"url": url}})
    with pytest.raises(APIError) as e:
        parse_chat_request(body, Limits(NAME, allow_remote_media=True))  # the server's own path to the fetch
    assert attempts == []
    assert e.value.code == "remote_media_forbidden" and e.value.status == 400
    assert e.value.message == (f"messages[0].content[0].image_url.url: could not fetch {url} (its host is {REFUSED[url]}, "
                               "which this server does not fetch from)")


class Target(BaseHTTPRequestHandler):
    """What the fetching server is pointed at: a picture, redirects, drips, a 500 and a body over the cap."""

    def log_message(self, *args):
        pass

    def send(self, status: int, body: bytes = b"", **headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        port = self.server.server_address[1]
        if self.path == "/cat.png":
            return self.send(200, png(5), Content_Type="image/png")
        if self.path == "/to-cat":
            return self.send(302, Location="/cat.png")
        if self.path == "/to-ftp":
            return self.send(302, Location=f"ftp://127.0.0.1:{port}/cat.png")
        if self.path == "/to-private":
            return self.send(307, Location="http://10.1.2.3/cat.png")
        if self.path == "/loop":
            return self.send(302, Location="/loop")
        if self.path == "/secret-500":
            return self.send(500, b"SECRET internal page: db=10.0.0.5", Content_Type="text/plain")
        if self.path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * MiB))
            self.end_headers()
            return self.wfile.write(b"SECRET" * 10)
        if self.path == "/endless":  # no Content-Length: the cap is counted while reading
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            return None
        if self.path in ("/drip", "/drip-head"):  # a byte every 0.1 s, for at most 20 s
            if self.path == "/drip":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
            data = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"S" * 1000 if self.path == "/drip-head" else b"\x89PNG" + b"SECRET" * 200
            try:
                for b in data[:200]:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            return None
        return self.send(404)


@pytest.fixture(scope="module")
def target():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Target)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def fetching(demo_dirs):
    """Remote media allowed, loopback let through for these tests only, a 2 s fetch deadline, 2 MB of media per request."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(LOOPBACK_ENV, "1")  # the server process inherits it
        srv = ServeProcess("--model", str(demo_dirs[0]), "--dtype", "fp32", "--served-model-name", NAME, "--max-model-len", "512",
                           "--allow-remote-media", "--fetch-timeout", "2", "--max-body-bytes", "2000000")
    yield srv
    srv.stop()


def fetch_image(srv, url: str) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    status, body = post(srv, msg({"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}))
    return status, body, time.monotonic() - t0


def test_remote_fetches_are_bounded_and_say_only_our_words(fetching, target):
    for path in ("/cat.png", "/to-cat"):
        status, body, _ = fetch_image(fetching, target + path)
        assert status == 200 and body["usage"]["prompt_tokens"] > 10, body
    cases = {
        "/to-ftp": (400, "remote_media_forbidden", "it redirects to a URL that is not http(s)"),
        "/to-private": (400, "remote_media_forbidden", "its host is a private address, which this server does not fetch from"),
        "/loop": (400, "remote_media_failed", "it redirects more than 5 times"),
        "/secret-500": (400, "remote_media_failed", "the answer was not 200 OK"),
        "/huge": (400, "remote_media_too_large", "it is over the 2000000 bytes left for this request's media"),
        "/endless": (400, "remote_media_too_large", "it is over the 2000000 bytes left for this request's media"),
        "/drip-head": (400, "remote_media_failed", "no complete answer within 2 s"),
    }
    for path, (status, code, says) in cases.items():
        got, body, took = fetch_image(fetching, target + path)
        err = body["error"]
        assert (got, err["code"]) == (status, code), (path, err)
        assert err["message"] == f"messages[0].content[0].image_url.url: could not fetch {target + path} ({says})", path
        assert "SECRET" not in err["message"] and "10.0.0.5" not in err["message"] and took < 2 + 2, (path, took)


def test_a_dripping_url_holds_nothing_else(fetching, target):
    result = {}
    slow = threading.Thread(target=lambda: result.update(drip=fetch_image(fetching, target + "/drip")))
    slow.start()
    time.sleep(0.3)  # the drip is being fetched
    t0 = time.monotonic()
    assert post(fetching, msg({"type": "text", "text": "and me?"}))[0] == 200
    assert time.monotonic() - t0 < 1.5 and slow.is_alive()  # answered while the drip was still being read
    slow.join(timeout=10)
    status, body, took = result["drip"]
    assert status == 400 and body["error"]["message"].endswith(f"could not fetch {target}/drip (no complete answer within 2 s)")
    assert 1.9 < took < 2 + 1.5, took
