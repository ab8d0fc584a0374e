"""Helpers for the qva-serve tests: media bytes, content parts, /metrics reads, raw sockets to 127.0.0.1,
and the peak resident memory of a server process (Linux: /proc/PID/clear_refs, VmHWM)."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import time

import soundfile as sf
from conftest import http, speechlike
from PIL import Image, ImageDraw


def png(seed: int, size=(112, 84)) -> bytes:
    rng = random.Random(seed)
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    ImageDraw.Draw(im).ellipse((10, 10, 10 + rng.randrange(20, 60), 10 + rng.randrange(20, 60)), fill=(250, 200, 30))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def wav(seconds: float, seed: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, speechlike(seconds, seed).numpy(), 16000, format=fmt, subtype=subtype)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def image_part(raw: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(raw)}}


def audio_part(raw: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(raw), "format": fmt}}


def metrics(srv) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    text = http(srv.base + "/metrics")[1].decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


def metric(srv, name: str) -> float:
    return metrics(srv).get(name, 0.0)


def connect(srv, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)


def request_head(path: str, length: int | None, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + extra + "\r\n").encode()


def read_answer(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (or `deadline`, monotonic, passes)."""
    out = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:  # reset by the server
            break
        if not piece:
            break
        out += piece
    return out


def wait_closed(sock: socket.socket, deadline: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it is still open at `deadline` (monotonic)."""
    out = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            return None
        except OSError:  # reset by the server
            return out
        if not piece:
            return out
        out += piece
    return None


def status_of(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def error_of(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


def until(condition, seconds: float, what: str, step: float = 0.02) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(step)


# -- peak memory of another process ------------------------------------------------------------------------------
def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


class PeakRSS:
    """`with PeakRSS(pid) as m: ...` then `m.growth`: the process's peak resident memory over what it held at the start."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self):
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        self.start = _status(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc):
        self.growth = _status(self.pid, "VmHWM") - self.start
        return False
