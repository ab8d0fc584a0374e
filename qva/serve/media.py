"""A chat request's media, decoded only after the limits that bound the decoding have been checked.

    a content part ─► its bytes: a data: URL's base64, or an http(s) URL fetched by `fetch.py`
                   ─► a probe of the header alone: Pillow opens lazily (size, frame count), soundfile
                      reads the frame count and rate; the request's `Budget` is charged (pixels, audio
                      seconds and the audio's tokens against the context, bytes), and a refusal names the
                      part that goes over
    every part probed and the request fits ─► each part decoded: an image fully (a truncated file is
                      refused, never half-decoded), a video frame by frame, audio block by block with a
                      cap, so a header that lies cannot make the server read more than the budget

Budgets are per request (`MediaLimits`, the server's options); a probe returns the function that decodes
its part, so nothing is decoded until the whole request is known to fit. An uploaded audio file (the
transcription endpoints) goes through the same probe (`probe_audio_bytes`), its format found from its bytes. Every problem is an `APIError`
(a 4xx naming the field), whatever the decoder raised.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

from ..audio import SAMPLE_RATE, AudioError, decode_file, load_audio
from ..image_processing import ImageError, frame_count, video_frames
from . import fetch as remote
from .errors import bad

AUDIO_FORMATS = {"wav": "WAV", "mp3": "MP3", "flac": "FLAC"}  # chat's `input_audio.format`
READABLE_AUDIO = "wav, flac, mp3, ogg (vorbis, opus)"  # what libsndfile finds from the bytes alone (an upload has no format field)
AUDIO_RATES = (1_000, 384_000)  # Hz: the sample rates audio may have (a header saying 1 Hz is a broken or hostile file)
UNKNOWN_LENGTH = 1 << 62  # libsndfile's frame count for a stream whose header does not say its length


@dataclass
class MediaLimits:
    """What one request's media may cost (the server's options), and the context its audio must fit."""

    max_pixels: int = 2**26  # decoded image and video-frame pixels, all parts together
    max_audio_seconds: float = 3600.0  # audio, all clips together
    max_bytes: int = 64 * 2**20  # media bytes, inline and fetched together
    max_frames: int = 256  # frames of one video
    fetch_timeout: float = 10.0  # seconds for one remote URL, redirects and body included
    context: int | None = None  # the server's context in tokens, when the model hears audio
    audio_tokens: Callable[[int], int] | None = None  # 16 kHz samples of one clip → its LLM tokens


class Budget:
    """What a request's media have used so far; each charge refuses (APIError) what goes over a limit."""

    def __init__(self, limits: MediaLimits):
        self.limits = limits
        self.pixels = self.bytes = self.audio_tokens = 0
        self.seconds = 0.0

    def charge_bytes(self, n: int, where: str) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_bytes:
            raise bad(f"{where}: the request's media are over this server's limit of {self.limits.max_bytes} bytes "
                      "(--max-body-bytes)", where, "media_too_large")

    def charge_pixels(self, n: int, what: str, where: str) -> None:
        self.pixels += n
        if self.pixels > self.limits.max_pixels:
            raise bad(f"{where}: {what} ({n} pixels) brings the request's media to {self.pixels} decoded pixels, over this "
                      f"server's limit of {self.limits.max_pixels} (--max-media-pixels); send smaller images or fewer frames",
                      where, "media_too_large")

    def audio_left(self) -> float:
        return self.limits.max_audio_seconds - self.seconds

    def charge_audio(self, frames: int, rate: int, where: str) -> None:
        """Charge a clip of `frames` at `rate` Hz: seconds against the limit, tokens against the context."""
        lim, seconds = self.limits, frames / rate
        if seconds > self.audio_left():
            raise bad(f"{where}: the audio lasts {seconds:.1f} s; the request's audio may last {lim.max_audio_seconds:g} s in all "
                      "(--max-audio-seconds)", where, "audio_too_long")
        if lim.audio_tokens is not None and lim.context is not None:
            tokens = lim.audio_tokens(math.ceil(frames * SAMPLE_RATE / rate))
            if self.audio_tokens + tokens >= lim.context:
                others = f" and the request's other audio ({self.audio_tokens} tokens)" if self.audio_tokens else ""
                raise bad(f"{where}: the audio ({seconds:.1f} s, {tokens} tokens){others} does not fit this server's context "
                          f"of {lim.context} tokens", where, "context_length_exceeded")
            self.audio_tokens += tokens
        self.seconds += seconds


# -- bytes ------------------------------------------------------------------------------------------------------
def b64(data, where: str) -> bytes:
    if not isinstance(data, str):
        raise bad(f"{where} must be a base64 string", where, "invalid_type")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{where} is not valid base64", where, "invalid_base64") from None


def url_bytes(spec: dict, where: str, allow_remote: bool, budget: Budget, fetch=None) -> bytes:
    """The bytes behind `spec["url"]`: a `data:` URL, or (if allowed) a remote http(s) one; charged to the budget."""
    url = spec.get("url")
    if not isinstance(url, str) or not url:
        raise bad(f"{where}.url must be a string (a data: URL)", f"{where}.url", "invalid_type")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise bad(f"{where}.url must be a base64 data URL (data:<mime>;base64,<data>)", f"{where}.url", "invalid_url")
        raw = b64(data, f"{where}.url")
    elif url.startswith(("http://", "https://")):
        if not allow_remote:
            raise bad(f"{where}.url: remote URLs are not fetched by this server (start it with --allow-remote-media); "
                      "send the media inline as a data: URL", f"{where}.url", "remote_media_disabled")
        left = budget.limits.max_bytes - budget.bytes
        raw = fetch(url, f"{where}.url") if fetch else remote.fetch_url(url, f"{where}.url", left, budget.limits.fetch_timeout)
    else:
        allowed = "a data: URL" + (" or an http(s) URL" if allow_remote else "")
        raise bad(f"{where}.url must be {allowed}", f"{where}.url", "invalid_url")
    budget.charge_bytes(len(raw), f"{where}.url")
    return raw


# -- images and video ----------------------------------------------------------------------------------------------
def _open(raw: bytes, where: str, code: str, message: str | None = None):
    """Pillow's lazy open: the header is parsed, nothing is decoded."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(raw))
    except Exception as e:  # Pillow raises many kinds for a file it cannot read (and DecompressionBombError)
        raise bad(f"{where}: {message or f'cannot decode the image ({type(e).__name__})'}", where, code) from None


def probe_image(raw: bytes, where: str, budget: Budget) -> Callable[[], object]:
    """Open an image, charge its pixels, and return what decodes it (fully: a truncated file is refused)."""
    im = _open(raw, where, "invalid_image")
    w, h = im.size
    budget.charge_pixels(w * h, f"the image is {w}×{h}", where)

    def decode():
        try:
            im.load()  # with Pillow's LOAD_TRUNCATED_IMAGES off (its default), a cut file raises here
            if im.format == "PNG" and not _png_rows_complete(raw):
                raise OSError("the image data ends before its last row")
        except Exception as e:
            raise bad(f"{where}: cannot decode the image ({type(e).__name__})", where, "invalid_image") from None
        return im

    return decode


def probe_video(spec: dict, where: str, allow_remote: bool, budget: Budget, fetch=None) -> Callable[[], list]:
    """Frames of a video: `frames` (image data URLs) or `url` (an animated GIF/WebP); counted and charged first."""
    lim = budget.limits
    frames = spec.get("frames")
    if frames is not None:
        if not isinstance(frames, list) or not frames or len(frames) > lim.max_frames:
            raise bad(f"{where}.frames must be a list of 1 to {lim.max_frames} image data URLs", f"{where}.frames", "invalid_type")
        decoders = [probe_image(url_bytes({"url": f}, f"{where}.frames[{i}]", allow_remote, budget, fetch), f"{where}.frames[{i}]", budget)
                    for i, f in enumerate(frames)]
        return lambda: [d() for d in decoders]
    raw = url_bytes(spec, where, allow_remote, budget, fetch)
    im = _open(raw, where, "invalid_video", 'cannot decode the video: send an animated GIF/WebP, or its frames as "frames": '
               "[image data URLs] (e.g. ffmpeg -i in.mp4 -vf fps=2 frames/%04d.png)")
    try:
        n = frame_count(im)  # from the headers alone
    except ImageError as e:
        raise bad(f"{where}: cannot decode the video frames ({type(e.__cause__).__name__})", where, "invalid_video") from None
    if n > lim.max_frames:
        raise bad(f"{where}: the video has {n} frames, over {lim.max_frames} (send sampled frames instead)", where, "invalid_video")
    w, h = im.size
    budget.charge_pixels(n * w * h, f"the video's {n} frames of {w}×{h}", where)

    def decode():
        try:
            out = video_frames(im)
        except ImageError as e:
            raise bad(f"{where}: cannot decode the video frames ({type(e.__cause__).__name__})", where, "invalid_video") from None
        if len(out) > lim.max_frames:  # the count read first and the frames decoded cannot differ; kept as the rule's guard
            raise bad(f"{where}: the video has {len(out)} frames, over {lim.max_frames} (send sampled frames instead)", where,
                      "invalid_video")
        return out

    return decode


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type → samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_rows_complete(raw: bytes) -> bool:
    """Whether a PNG's image data inflates to every row its header promises: Pillow accepts a compressed
    stream that ends early and leaves the missing rows black, so the byte count is checked here."""
    if len(raw) < 33:
        return False
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", raw[16:29])
    bits = depth * _PNG_CHANNELS.get(colour, 4)
    want = 0
    for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
        w, h = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if w and h:
            want += h * (1 + (w * bits + 7) // 8)  # a filter byte, then the packed samples of each row
    inflate, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(raw) and got < want:
        size, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        if kind == b"IDAT":
            data = raw[pos + 8:pos + 8 + size]
            while data and got < want:
                try:
                    got += len(inflate.decompress(data, 1 << 20))  # output in bounded pieces, counted and dropped
                except zlib.error:
                    return False
                data = inflate.unconsumed_tail
        elif kind == b"IEND":
            break
        pos += 12 + size
    return got >= want


# -- audio ---------------------------------------------------------------------------------------------------
def probe_audio(spec: dict, where: str, budget: Budget) -> Callable[[], object]:
    """`{"data": base64, "format": "wav"|"mp3"|"flac"}`: rate and length from the header, checked and charged;
    returns what decodes it to a 16 kHz mono float32 waveform."""
    fmt = spec.get("format")
    if not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS:
        raise bad(f"{where}.format must be one of {sorted(AUDIO_FORMATS)}, got {str(fmt)[:40]!r}", f"{where}.format",
                  "unsupported_audio_format")
    raw = b64(spec.get("data"), f"{where}.data")
    budget.charge_bytes(len(raw), f"{where}.data")
    return probe_audio_bytes(raw, where, f"{where}.data", budget, fmt.lower())


def probe_audio_bytes(raw: bytes, where: str, param: str, budget: Budget, fmt: str | None = None) -> Callable[[], object]:
    """An audio file's bytes (any format libsndfile reads, told by `fmt` or found from the bytes): rate and
    length from the header, checked and charged to `budget`; returns what decodes it (16 kHz mono float32).
    Refusals name `where` and carry `param`."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(raw))  # the header: nothing decoded
    except Exception as e:  # libsndfile reports every unreadable stream the same way
        what = f"as {fmt}" if fmt else f"(readable: {READABLE_AUDIO})"
        raise bad(f"{where}: cannot decode the audio {what} ({type(e).__name__})", param, "invalid_audio") from None
    rate, frames = int(info.samplerate), int(info.frames)
    lo, hi = AUDIO_RATES
    if not lo <= rate <= hi:
        raise bad(f"{where}: the audio's header says {rate} Hz, outside the {lo}–{hi} Hz this server decodes", param, "invalid_audio")
    if frames >= UNKNOWN_LENGTH:
        raise bad(f"{where}: the audio's header does not give its length; send a file written whole (not a stream)", param,
                  "invalid_audio")
    budget.charge_audio(frames, rate, where)
    return lambda: _read_audio(raw, fmt or str(info.format).lower(), rate, frames, where, param)


def _read_audio(raw: bytes, fmt: str, rate: int, frames: int, where: str, param: str):
    """Decode block by block, never past the `frames` the header claimed (and the budget was charged for)."""
    try:
        wave, _ = decode_file(io.BytesIO(raw), f"{where} ({fmt})", max_frames=frames)
    except AudioError as e:
        raise bad(str(e), param, "invalid_audio") from None
    try:
        return load_audio(wave, rate)  # [samples] at 16 kHz; NaN/inf refused
    except AudioError as e:
        raise bad(f"{where}: {e}", param, "invalid_audio") from None


# -- one part, probed and decoded at once (the library's entry points; requests probe every part first) -------------
def decode_image(raw: bytes, where: str, limits: MediaLimits | None = None):
    return probe_image(raw, where, Budget(limits or MediaLimits()))()


def decode_video(spec: dict, where: str, allow_remote: bool = False, limits: MediaLimits | None = None, fetch=None) -> list:
    return probe_video(spec, where, allow_remote, Budget(limits or MediaLimits()), fetch)()


def decode_audio(spec: dict, where: str, limits: MediaLimits | None = None):
    return probe_audio(spec, where, Budget(limits or MediaLimits()))()
