"""Whisper's audio front end: load any audio as 16 kHz mono, and turn it into log-mel windows.

`log_mel` reproduces `transformers.WhisperFeatureExtractor` (and OpenAI's `log_mel_spectrogram`):
the waveform is cut into 30 s windows, each zero-padded to 480 000 samples, then
STFT (n_fft 400, hop 160, periodic Hann, centred with reflect padding) → |X|² without the last frame
→ Slaney mel filters → log10(max(·, 1e-10)) → floor at (window max − 8) → (x + 4) / 4.

Valid frames. The reference extractor's attention mask marks ceil(n / 160) frames of a clip of n
samples as real, while only n // 160 hops fit entirely inside it: the two differ by one whenever n is
not a multiple of 160. We report ceil(n / 160), deliberately: frame i is centred on sample 160·i, so
every frame whose centre lies on real audio counts, the last partial hop is not dropped, and the count
agrees with the mask models trained on the reference extractor have seen.

`qva-generate audio-info FILE [--whisper DIR]` prints the encoder output shape and timings.
"""

from __future__ import annotations

import io
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .resample import resample

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480 000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
BLOCK_FRAMES = 1 << 16  # frames decoded at a time from a file


class AudioError(ValueError):
    """Audio that cannot be used: the message says which input and why."""


# -- loading ----------------------------------------------------------------------------------------
ACCEPTED = "a path, an array or tensor with sampling_rate=, an (array, sampling_rate) tuple, or an audio file's bytes"


def load_audio(source, sampling_rate: int | None = None) -> torch.Tensor:
    """1-D float32 mono waveform at 16 kHz from a path, an array sampled at `sampling_rate`, an
    `(array, sampling_rate)` pair (tuple or two-item list), or the bytes of an audio file.

    Arrays may be numpy or torch, `[samples]`, `[samples, channels]` or `[channels, samples]` (the
    shorter axis, if at most 8 long, is taken as channels); integer PCM is scaled to [-1, 1).
    Bytes are read as an encoded file (any soundfile format), which says its own rate; anything else
    is an `AudioError` naming the accepted forms.
    """
    if source is None:
        raise AudioError(f"load_audio: got None; expected {ACCEPTED}")
    if _is_pair(source):
        samples, rate = source
        if sampling_rate is not None and sampling_rate != rate:
            raise AudioError(f"load_audio: two sample rates given: {rate!r} in the (array, sampling_rate) pair and "
                             f"sampling_rate={sampling_rate!r}")
        source, sampling_rate = samples, rate
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        if not Path(source).is_file():
            raise AudioError(f"{name}: no such audio file")
        wave, rate = decode_file(name, name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if sampling_rate is not None:
            raise AudioError("load_audio: bytes are read as an encoded audio file, which gives its own rate; leave out "
                             "sampling_rate (raw PCM samples: pass np.frombuffer(data, np.int16) with sampling_rate=)")
        name = "audio bytes"
        wave, rate = decode_file(io.BytesIO(bytes(source)), name)
    else:
        if not isinstance(source, (np.ndarray, torch.Tensor, list, tuple)) and not hasattr(source, "__array__"):
            raise AudioError(f"load_audio: cannot read a {type(source).__name__} as audio; expected {ACCEPTED}")
        if sampling_rate is None:
            raise AudioError("load_audio: an array needs its sampling_rate (e.g. load_audio(x, sampling_rate=44100))")
        data, rate, name = source, _sample_rate(sampling_rate), "audio array"
        wave = _to_mono_float(data, name)
    if wave.numel() == 0:
        raise AudioError(f"{name}: audio is empty (0 samples)")
    if not torch.isfinite(wave).all():
        bad = int((~torch.isfinite(wave)).sum())
        raise AudioError(f"{name}: audio has {bad} NaN/inf sample(s)")
    if rate != SAMPLE_RATE:
        wave = resample(wave.double(), rate, SAMPLE_RATE).float()
    return wave.contiguous()


def _is_pair(source) -> bool:
    """`(samples, rate)`, or a two-item list `[array, rate]`: an array then a scalar (`[[l], [r]]` is a stereo
    waveform, `[0.1, 0.2]` a two-sample one)."""
    if not isinstance(source, (tuple, list)) or len(source) != 2:
        return False
    if isinstance(source, tuple):
        return True
    samples, rate = source
    tensor = (np.ndarray, torch.Tensor)
    array = isinstance(samples, (list, tuple)) or (isinstance(samples, tensor) and samples.ndim > 0)
    scalar = not isinstance(rate, (list, tuple)) and not (isinstance(rate, tensor) and rate.ndim > 0)
    return array and scalar


def clip_tokens(num_samples: int, frames: str = "valid", pool: int = 1) -> int:
    """LLM tokens for a clip of `num_samples` at 16 kHz: its 30 s windows' `audio_token_count`, summed."""
    full, rest = divmod(num_samples, N_SAMPLES)
    tokens = full * audio_token_count(N_FRAMES, frames, pool)
    if rest or not full:
        tokens += audio_token_count(math.ceil(rest / HOP_LENGTH), frames, pool)
    return tokens


def decode_file(file, name: str, max_frames: int | None = None) -> tuple[torch.Tensor, int]:
    """An encoded audio file (a path or a file object, any soundfile format) → (mono float32 `[frames]`, its rate),
    decoded block by block. More than `max_frames` frames is an AudioError, raised before they are held.
    (Every reader of files goes through here: MP3 decoding depends, in the last bit, on the read sizes.)"""
    import soundfile as sf

    pieces, n = [], 0
    try:
        with sf.SoundFile(file) as f:
            rate = f.samplerate
            while len(block := f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)):  # [frames, channels]
                n += len(block)
                if max_frames is not None and n > max_frames:
                    raise AudioError(f"{name}: the audio is longer than its header says ({max_frames} frames)")
                pieces.append(_to_mono_float(block, name, channels_last=True))
    except AudioError:
        raise
    except Exception as e:  # libsndfile reports unreadable, truncated and non-audio files alike
        raise AudioError(f"{name}: cannot read as audio ({type(e).__name__}: {getattr(e, 'error_string', e)})") from None
    return (torch.cat(pieces) if pieces else torch.zeros(0)), rate


def _sample_rate(rate) -> int:
    """A positive whole number of samples per second (16000 or 16000.0; not 16000.5, NaN or 0)."""
    ok = not isinstance(rate, bool) and isinstance(rate, (int, float, np.integer, np.floating))
    if not ok or not math.isfinite(rate) or rate != int(rate) or rate <= 0:
        raise AudioError(f"load_audio: sampling_rate must be a positive whole number of Hz, got {rate!r}")
    return int(rate)


def _to_mono_float(data, name: str, channels_last: bool = False) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        try:
            data = np.asarray(data)
        except (ValueError, TypeError) as e:  # ragged lists, mixed types
            raise AudioError(f"{name}: cannot read as audio samples ({type(e).__name__}: {e}); expected {ACCEPTED}"[:400]) from None
        if data.dtype.kind not in "biufc":
            raise AudioError(f"{name}: expected numbers as audio samples, got dtype {data.dtype}; expected {ACCEPTED}")
    x = torch.as_tensor(data)
    if x.is_complex() or x.dtype == torch.bool:
        raise AudioError(f"{name}: expected real audio samples, got dtype {x.dtype}")
    if not x.is_floating_point():
        info = torch.iinfo(x.dtype)
        x = x.double() / (-info.min if info.min < 0 else (info.max + 1) / 2)
        if info.min == 0:  # unsigned PCM is centred on half range
            x = x - 1.0
    x = x.float()
    if x.dim() == 2:  # an array's layout is guessed from its shape; a file's is known
        channel_axis = 1 if channels_last else 0 if x.shape[0] <= 8 and x.shape[0] < x.shape[1] else 1
        if x.shape[channel_axis] > 8:
            raise AudioError(f"{name}: cannot tell channels from samples in shape {tuple(x.shape)}")
        x = x.mean(dim=channel_axis)
    elif x.dim() != 1:
        raise AudioError(f"{name}: expected a 1-D or 2-D waveform, got shape {tuple(x.shape)}")
    return x


# -- mel filters ------------------------------------------------------------------------------------
def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mels / 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = f * 3.0 / 200.0
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), m * 200.0 / 3.0)


@lru_cache(maxsize=8)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sampling_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Slaney-scale, Slaney-normalised triangular filters `[n_mels, n_fft // 2 + 1]` over 0 – sr/2 Hz."""
    fft_freqs = np.linspace(0.0, sampling_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sampling_rate / 2), n_mels + 2))  # [n_mels + 2]
    widths = np.diff(edges)  # [n_mels + 1]
    offsets = edges[:, None] - fft_freqs[None, :]  # [n_mels + 2, n_freqs]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))  # [n_mels, n_freqs]
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]  # Slaney area normalisation
    return torch.from_numpy(weights).float()


# -- log-mel ------------------------------------------------------------------------------------------
def num_windows(num_samples: int) -> int:
    """How many 30 s windows a clip of `num_samples` (16 kHz) needs; at least one."""
    return max(1, math.ceil(num_samples / N_SAMPLES))


def audio_token_count(valid_frames: int, frames: str = "valid", pool: int = 1) -> int:
    """LLM tokens for one 30 s window with `valid_frames` real mel frames.

    The encoder maps 3000 mel frames to 1500 (conv2 has stride 2, so encoder frame i sees mel frames
    2i-1..2i+1: ceil(valid / 2) of them touch real audio). `"valid"` keeps those, `"full"` keeps all 1500;
    then every `pool` frames are averaged into one token (a last partial group still makes a token).
    """
    kept = N_FRAMES // 2 if frames == "full" else (valid_frames + 1) // 2
    return -(-kept // pool)


def log_mel(waveform, n_mels: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of one clip (1-D tensor) or several (a list): `[windows, n_mels, 3000]`, valid frames.

    Each clip is split into consecutive 30 s windows (the last zero-padded); windows of all clips are
    stacked in order. `valid_frames[w]` is the number of mel frames of window w that cover real audio.
    """
    clips = list(waveform) if isinstance(waveform, (list, tuple)) else [waveform]
    windows, valid = [], []
    for i, clip in enumerate(clips):
        clip = torch.as_tensor(clip, dtype=torch.float32)
        if clip.dim() != 1:
            raise AudioError(f"log_mel: clip {i} must be a 1-D 16 kHz waveform, got shape {tuple(clip.shape)}")
        n = clip.shape[0]
        if n == 0:
            raise AudioError(f"log_mel: clip {i} is empty")
        if not torch.isfinite(clip).all():
            raise AudioError(f"log_mel: clip {i} has {int((~torch.isfinite(clip)).sum())} NaN/inf sample(s)")
        for w in range(num_windows(n)):
            piece = clip[w * N_SAMPLES : (w + 1) * N_SAMPLES]
            windows.append(torch.nn.functional.pad(piece, (0, N_SAMPLES - piece.shape[0])))
            valid.append(math.ceil(piece.shape[0] / HOP_LENGTH))
    batch = torch.stack(windows)  # [windows, 480000]
    return _log_mel_windows(batch, n_mels), torch.tensor(valid, dtype=torch.long)


def _log_mel_windows(batch: torch.Tensor, n_mels: int) -> torch.Tensor:
    """`[windows, 480000]` → `[windows, n_mels, 3000]`, the max-8 floor taken per window."""
    window = torch.hann_window(N_FFT, device=batch.device)  # periodic
    stft = torch.stft(batch, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = stft[..., :-1].abs().square()  # [windows, 201, 3000]: last frame dropped
    mel = mel_filters(n_mels).to(batch.device) @ power  # [windows, n_mels, 3000]
    log_spec = mel.clamp(min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


# -- long audio: pieces of at most 30 s, cut where it is quiet -----------------------------------------
PAUSE_HOP = 160  # samples per energy frame (10 ms at 16 kHz)
SILENCE_DB = -80.0  # dBFS: a frame this quiet is silence whatever the clip (16-bit dither is ~ -100)
SPEECH_OVER_FLOOR_DB = 12.0  # a frame this far over the clip's noise floor is speech ...
MIN_RANGE_DB = 10.0  # ... unless the clip's loudest frame is within this of its floor: then it has no pauses to find


def split_at_pauses(wave, max_seconds: float = CHUNK_SECONDS, min_pause: float = 0.3, max_gap: float = 2.0,
                    pad: float = 0.2) -> list[tuple[int, int]]:
    """The speech of a 16 kHz clip as pieces `(start, end)` in samples, in order, none overlapping, each at
    most `max_seconds` long, cut where the clip is quietest.

    Frames of 10 ms are speech when their energy is `SPEECH_OVER_FLOOR_DB` over the clip's noise floor (the
    10th percentile of the frames above `SILENCE_DB`; at most half way from the floor to the loudest frame),
    or, in a clip whose loudness hardly varies, whenever they are not silence. Quiet runs shorter than
    `min_pause` seconds are inside speech (between words); each speech run gets `pad` seconds either side.
    Runs closer than `max_gap` seconds are one piece while it stays within `max_seconds`; longer silences
    are left out (a clip with no speech at all gives no pieces). A piece still longer than `max_seconds` is
    cut at the quietest 10 ms in the second half of each `max_seconds` (the middle of the quietest stretch),
    so a word is cut only where no pause is near. Every speech frame lies in exactly one piece.
    """
    x = torch.as_tensor(wave, dtype=torch.float32).flatten()
    n = x.shape[0]
    if n == 0:
        return []
    hop, limit = PAUSE_HOP, int(max_seconds * SAMPLE_RATE)
    if limit < hop:
        raise ValueError(f"split_at_pauses: max_seconds must be at least {hop / SAMPLE_RATE} s, got {max_seconds}")
    m = -(-n // hop)
    frames = torch.nn.functional.pad(x, (0, m * hop - n)).view(m, hop)  # [frames, 160]
    energy = frames.double().square().mean(1)
    db = (10 * torch.log10(energy + 1e-30)).numpy()  # [frames] dBFS
    audible = db > SILENCE_DB
    if not audible.any():
        return []
    floor, peak = float(np.percentile(db[audible], 10)), float(db.max())
    if peak - floor < MIN_RANGE_DB:
        speech = audible
    else:
        speech = db > floor + min(SPEECH_OVER_FLOOR_DB, (peak - floor) / 2)
    runs = _runs(speech)  # [(first, end)] frames of speech
    closed = []  # quiet runs shorter than min_pause joined into the speech around them
    for a, b in runs:
        if closed and a - closed[-1][1] < min_pause * SAMPLE_RATE / hop:
            closed[-1] = (closed[-1][0], b)
        else:
            closed.append((a, b))
    p = int(pad * SAMPLE_RATE)
    regions = [(max(0, a * hop - p), min(n, b * hop + p)) for a, b in closed]  # samples
    pieces: list[list[int]] = []
    for a, b in regions:
        if pieces and (a <= pieces[-1][1] or (a - pieces[-1][1] <= max_gap * SAMPLE_RATE and b - pieces[-1][0] <= limit)):
            pieces[-1][1] = max(pieces[-1][1], b)
        else:
            pieces.append([a, b])
    smooth = torch.nn.functional.avg_pool1d(torch.from_numpy(db)[None, None], 5, 1, 2, count_include_pad=False)[0, 0].numpy()
    out = []
    for a, b in pieces:
        while b - a > limit:
            cut = _quietest(smooth, (a + limit // 2) // hop + 1, (a + limit) // hop) * hop  # a frame boundary in (a + limit/2, a + limit]
            out.append((a, cut))
            a = cut
        out.append((a, b))
    return out


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) of each run of True in a 1-D mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _quietest(db: np.ndarray, lo: int, hi: int) -> int:
    """The frame in [lo, hi] to cut before: the middle of the quietest stretch (within 1 dB of the minimum) there."""
    hi = min(hi, len(db) - 1)
    lo = min(lo, hi)
    span = db[lo : hi + 1]
    quiet = _runs(span <= span.min() + 1.0)
    a, b = max(quiet, key=lambda r: (r[1] - r[0], r[0]))  # the longest such stretch; the latest of equals
    return lo + (a + b) // 2
