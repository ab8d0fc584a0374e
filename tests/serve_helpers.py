"""Helpers for the qva-serve tests: media bytes, content parts, /metrics reads, raw sockets to 127.0.0.1,
and the peak resident memory of a server process (Linux: /proc/PID/clear_refs, VmHWM)."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import time

import numpy as np
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


def _receive(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection or `deadline` (monotonic) passes; and whether it closed."""
    out = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            return out, False
        except OSError:  # reset by the server
            return out, True
        if not piece:
            return out, True
        out += piece
    return out, False


def read_answer(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (or `deadline`, monotonic, passes)."""
    return _receive(sock, deadline)[0]


def wait_closed(sock: socket.socket, deadline: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it is still open at `deadline` (monotonic)."""
    out, closed = _receive(sock, deadline)
    return out if closed else None


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


# -- form uploads (the audio endpoints) ------------------------------------------------------------------------------
def form(fields, file: tuple[str, bytes, str] | None = None, boundary: str = "qva-test-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type: `fields` as (name, value) pairs (or a dict), then `file`
    (filename, bytes, content type) as the part named "file"."""
    items = list(fields.items()) if isinstance(fields, dict) else list(fields)
    out = b""
    for name, value in items:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + str(value).encode() + b"\r\n"
    if file is not None:
        name, data, ctype = file
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\nContent-Type: {ctype}\r\n\r\n'
                .encode() + data + b"\r\n")
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_form(srv, path: str, body: bytes, content_type: str, key: str | None = None, timeout: float = 120) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {key}"} if key else {})}
    return http(srv.base + path, body, headers, timeout=timeout)


def wav_bytes(wave, rate: int = 16000, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.asarray(wave, dtype=np.float32), rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def digits_clip(shared_digits, seconds: float = 95.0):
    """Three spoken-digit clips of ../shared/data/spoken-digits in `seconds` of silence and noise: (16 kHz float32
    waveform, [(onset, offset) seconds of each clip's speech (|x| > 0.02)]). Noise (white, -45 dBFS) covers 9–30 s,
    35–60 s (under the second clip) and 70–95 s (under the third); the rest is digital silence."""
    import qva

    lines = [json.loads(x) for x in (shared_digits / "dev.jsonl").read_text().splitlines()[1:4]]
    rate = 16000
    wave = np.zeros(int(seconds * rate), np.float32)
    g = np.random.default_rng(0)
    for a, b in ((9, 30), (35, 60), (70, 95)):
        wave[a * rate : b * rate] += (10 ** (-45 / 20) * g.standard_normal((b - a) * rate)).astype(np.float32)
    spans = []
    for at, line in zip((6.0, 40.0, 80.0), lines):
        clip = qva.load_audio(shared_digits / line["audio"]).numpy()
        start = int(at * rate)
        wave[start : start + len(clip)] += clip
        loud = np.flatnonzero(np.abs(clip) > 0.02)
        spans.append((at + loud[0] / rate, at + loud[-1] / rate))
    return wave, spans


def bursts(spans: list[tuple[float, float]], seconds: float, seed: int = 0):
    """`seconds` of digital silence with speech-like sound (`speechlike`) over each (start, end) span in seconds."""
    rate = 16000
    wave = np.zeros(int(seconds * rate), np.float32)
    for i, (a, b) in enumerate(spans):
        wave[int(a * rate) : int(b * rate)] = speechlike(b - a, seed + i).numpy()[: int(b * rate) - int(a * rate)]
    return wave


def long_context_graft(root, demo_dirs, context: int = 16384, pool: int = 8):
    """A saved graft of the demo checkpoints with a `context`-token window and `audio_pool` `pool` (the demo's own
    4096 tokens hold 81 s of audio at 50 tokens a second): long clips fit whole, for the long-audio tests."""
    import shutil

    import torch

    import qva

    qwen, whisper = demo_dirs
    wide = root / "qwen-wide"
    shutil.copytree(qwen, wide)
    cfg = json.loads((wide / "config.json").read_text())
    cfg["max_position_embeddings"] = context
    (wide / "config.json").write_text(json.dumps(cfg))
    (wide / ".qva.json").unlink(missing_ok=True)  # the copy is a plain checkpoint folder, not the writer's
    model = qva.load(wide, whisper=whisper, audio_pool=pool, dtype=torch.float32)
    return qva.save(model, root / "graft-wide")
