"""Audio loading, resampling and log-mel features against analytic signals and the transformers extractor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import JFK, WHISPER_ASSETS, need_shared

from qva.audio import N_FRAMES, N_SAMPLES, AudioError, clip_tokens, decode_file, load_audio, log_mel, mel_filters
from qva.resample import resample

SR = 16_000


def tone(freq: float, seconds: float, rate: int = SR, phase: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    return torch.sin(2 * math.pi * freq * t + phase)


def reference_features(clips, n_mels):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    arrays = [c.numpy() for c in clips] if isinstance(clips, list) else clips.numpy()
    out = fe(arrays, sampling_rate=SR, return_tensors="pt", return_attention_mask=True)
    return out.input_features, out.attention_mask.sum(-1)


# -- mel filters ------------------------------------------------------------------------------------
@need_shared(WHISPER_ASSETS)
@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_openai_assets(n_mels):
    ref = np.load(WHISPER_ASSETS / "mel_filters.npz")[f"mel_{n_mels}"]
    ours = mel_filters(n_mels).numpy()
    assert ours.shape == ref.shape == (n_mels, 201)
    assert np.abs(ours - ref).max() < 1e-7  # measured 4e-9; values up to 0.04


# -- log-mel ----------------------------------------------------------------------------------------
SIGNALS = {
    "tone_440": lambda: 0.5 * tone(440, 3.0).float(),
    "chirp_mix": lambda: (0.3 * tone(1000, 7.3) + 0.2 * tone(5555, 7.3)).float(),
    "noise": lambda: 0.1 * torch.randn(SR * 5 + 37, generator=torch.Generator().manual_seed(1)),
    "silence": lambda: torch.zeros(SR * 2),
    "short_161": lambda: 0.2 * torch.randn(161, generator=torch.Generator().manual_seed(2)),
}


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("name", list(SIGNALS))
def test_log_mel_matches_reference_unbatched(name, n_mels):
    wave = SIGNALS[name]()
    ours, valid = log_mel(wave, n_mels)
    ref, ref_valid = reference_features(wave, n_mels)
    assert ours.shape == ref.shape == (1, n_mels, N_FRAMES)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert valid.tolist() == ref_valid.tolist() == [math.ceil(wave.shape[0] / 160)]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_reference_batched(n_mels):
    clips = [SIGNALS[n]() for n in SIGNALS]
    ours, valid = log_mel(clips, n_mels)
    ref, ref_valid = reference_features(clips, n_mels)
    assert ours.shape == ref.shape == (len(clips), n_mels, N_FRAMES)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert valid.tolist() == ref_valid.tolist()
    # the max-8 floor is per example: a loud clip does not change a quiet one's features
    alone, _ = log_mel(clips[3], n_mels)
    assert torch.equal(ours[3], alone[0])


@need_shared(JFK)
@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_real_speech(n_mels):
    wave = load_audio(JFK)
    ours, valid = log_mel(wave, n_mels)
    ref, ref_valid = reference_features(wave, n_mels)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert valid.tolist() == ref_valid.tolist() == [1100]  # 11.0 s
    assert ours.std() > 0.3  # real speech, not a constant


def test_valid_frames_ceil_not_floor():
    # 64 001 samples: ceil(n/160) = 401 frames have their centre on real audio; n // 160 = 400
    _, valid = log_mel(torch.randn(64_001), 80)
    assert valid.tolist() == [401]
    _, valid = log_mel(torch.randn(64_000), 80)
    assert valid.tolist() == [400]


def test_long_audio_split_into_windows_nothing_dropped():
    wave = 0.1 * torch.randn(45 * SR, generator=torch.Generator().manual_seed(3))
    feats, valid = log_mel(wave, 80)
    assert feats.shape == (2, 80, N_FRAMES)
    assert valid.tolist() == [3000, 1500]
    first, _ = log_mel(wave[:N_SAMPLES], 80)
    second, _ = log_mel(wave[N_SAMPLES:], 80)
    assert torch.equal(feats[0], first[0]) and torch.equal(feats[1], second[0])
    # exactly 60 s → two full windows, no empty third one
    assert log_mel(torch.randn(2 * N_SAMPLES), 80)[1].tolist() == [3000, 3000]


def test_log_mel_rejects_bad_input():
    with pytest.raises(AudioError, match="empty"):
        log_mel(torch.zeros(0))
    with pytest.raises(AudioError, match="1-D"):
        log_mel(torch.zeros(2, 100))


# -- resampling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("orig", [44_100, 48_000, 22_050, 8_000, 32_000])
def test_resampler_reproduces_tones(orig):
    """A resampled tone equals the analytic tone at 16 kHz (edges excluded: zero padding there)."""
    for freq in (100, 440, 1000, 3000, 3900, 6000, 7000):
        if freq >= 0.48 * min(orig, SR):
            continue
        y = resample(tone(freq, 1.0, orig), orig, SR)
        assert y.shape[-1] == SR
        ref = tone(freq, 1.0, SR)
        err = (y - ref)[400:-400].abs().max().item()
        assert err < 1e-5, (orig, freq, err)  # measured ≤ 8.4e-7 (7 kHz from 44.1 kHz)


def test_resampler_removes_frequencies_above_nyquist():
    y = resample(tone(9000, 1.0, 44_100), 44_100, SR)  # 9 kHz cannot exist at 16 kHz: must vanish, not alias
    assert y[400:-400].abs().max().item() < 1e-5


def test_resampler_batched_and_identity():
    x = torch.randn(3, 4410, dtype=torch.float64)
    y = resample(x, 44_100, SR)
    assert y.shape == (3, 1600)
    assert torch.allclose(y[1], resample(x[1], 44_100, SR))
    assert resample(x, SR, SR) is x


# -- load_audio -------------------------------------------------------------------------------------
@need_shared(JFK)
def test_load_audio_file_stereo_44k():
    import soundfile as sf

    raw, rate = sf.read(str(JFK), dtype="float32", always_2d=True)
    assert rate == 44_100 and raw.shape[1] == 2
    wave = load_audio(JFK)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert wave.shape[0] == math.ceil(raw.shape[0] * 16_000 / 44_100) == 176_000
    direct = resample(torch.from_numpy(raw.mean(1)).double(), 44_100, SR).float()
    assert torch.allclose(wave, direct, atol=1e-6)


def test_load_audio_arrays():
    left, right = tone(440, 0.5), tone(880, 0.5)
    both = torch.stack([left, right], 1).numpy()  # [samples, channels] as soundfile gives it
    mono = load_audio(both, sampling_rate=SR)
    assert torch.allclose(mono.double(), (left + right) / 2, atol=1e-6)
    assert torch.equal(load_audio(both.T, sampling_rate=SR), mono)  # [channels, samples]
    pcm = (left.numpy() * 32767).astype(np.int16)
    assert torch.allclose(load_audio(pcm, sampling_rate=SR).double(), left, atol=1e-4)
    assert load_audio(torch.randn(4410), sampling_rate=44_100).shape == (1600,)


def test_load_audio_errors(tmp_path):
    with pytest.raises(AudioError, match="empty"):
        load_audio(np.zeros(0, np.float32), sampling_rate=SR)
    bad = np.ones(100, np.float32)
    bad[7] = np.nan
    with pytest.raises(AudioError, match="NaN/inf"):
        load_audio(bad, sampling_rate=SR)
    with pytest.raises(AudioError, match="sampling_rate"):
        load_audio(np.ones(100, np.float32))
    with pytest.raises(AudioError, match="no such audio file"):
        load_audio(tmp_path / "missing.wav")
    fake = tmp_path / "notes.wav"
    fake.write_text("this is not audio")
    with pytest.raises(AudioError, match="notes.wav: cannot read as audio"):
        load_audio(fake)
    truncated = tmp_path / "cut.wav"
    import soundfile as sf

    sf.write(str(truncated), np.zeros(1000, np.float32), SR)
    truncated.write_bytes(truncated.read_bytes()[:20])
    with pytest.raises(AudioError, match="cut.wav"):
        load_audio(truncated)
    with pytest.raises(AudioError, match="shape"):
        load_audio(np.zeros((2, 3, 4), np.float32), sampling_rate=SR)


# -- bad audio: (input, what the message must say) ---------------------------------------------------------
def test_zero_frame_wav_is_empty_and_channels_come_from_the_file(tmp_path):
    import soundfile as sf

    sf.write(str(tmp_path / "empty.wav"), np.zeros((0, 2), np.float32), SR)
    with pytest.raises(AudioError, match=r"empty.wav: audio is empty \(0 samples\)"):
        load_audio(tmp_path / "empty.wav")
    sf.write(str(tmp_path / "mono0.wav"), np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match=r"mono0.wav: audio is empty"):
        load_audio(tmp_path / "mono0.wav")
    sf.write(str(tmp_path / "one.wav"), np.array([[0.5, -0.25]], np.float32), SR)  # 1 frame, 2 channels
    assert load_audio(tmp_path / "one.wav").tolist() == [0.125]  # one sample: the channels' mean
    frames = np.stack([np.linspace(-0.5, 0.5, 5), np.zeros(5)], 1).astype(np.float32)  # 5 frames × 2 channels
    sf.write(str(tmp_path / "five.wav"), frames, SR)
    assert torch.allclose(load_audio(tmp_path / "five.wav"), torch.from_numpy(frames.mean(1)), atol=1e-4)


@pytest.mark.parametrize("rate", [float("nan"), 16000.5, 0, -8000, "16000", True, float("inf")])
def test_bad_sample_rate_is_refused(rate):
    with pytest.raises(AudioError, match=r"sampling_rate must be a positive whole number of Hz, got"):
        load_audio(np.zeros(100, np.float32), sampling_rate=rate)


def test_whole_float_and_numpy_sample_rates_accepted():
    assert load_audio(np.zeros(100, np.float32), sampling_rate=16000.0).shape == (100,)
    assert load_audio(np.zeros(100, np.float32), sampling_rate=np.int64(16000)).shape == (100,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_log_mel_refuses_non_finite_samples(bad):
    clip = torch.zeros(1000)
    clip[10] = bad
    with pytest.raises(AudioError, match=r"log_mel: clip 1 has 1 NaN/inf sample\(s\)"):
        log_mel([torch.zeros(500), clip])


# -- load_audio's accepted forms, and clear refusals of the rest ---------------------------------------------------
def test_load_audio_bytes_pairs_and_lists(tmp_path):
    import io

    import soundfile as sf

    stereo = np.stack([tone(440, 0.4, 44_100), tone(660, 0.4, 44_100)], 1).astype(np.float32)  # [frames, 2]
    path = tmp_path / "clip.flac"
    sf.write(str(path), stereo, 44_100)
    from_path = load_audio(path)
    assert from_path.shape == (math.ceil(stereo.shape[0] * SR / 44_100),) == (6400,)
    assert torch.equal(load_audio(path.read_bytes()), from_path)  # an encoded file's bytes
    assert torch.equal(load_audio(bytearray(path.read_bytes())), from_path)
    buf = io.BytesIO()
    sf.write(buf, stereo, 44_100, format="WAV", subtype="FLOAT")
    as_array = load_audio(stereo, sampling_rate=44_100)
    assert torch.equal(load_audio(buf.getvalue()), as_array)
    assert torch.equal(load_audio((stereo, 44_100)), as_array)
    assert torch.equal(load_audio([stereo, 44_100]), as_array)  # [array, rate] is the same pair
    assert torch.equal(load_audio([torch.from_numpy(stereo), 44_100]), as_array)
    assert torch.equal(load_audio((stereo, 44_100), sampling_rate=44_100), as_array)  # the same rate twice is fine
    assert load_audio([0.25, -0.5], sampling_rate=SR).tolist() == [0.25, -0.5]  # two numbers: a two-sample waveform
    assert load_audio([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]], sampling_rate=SR).tolist() == [0.25] * 3  # [channels, samples]


@pytest.mark.parametrize("source, kw, message", [
    (None, {}, r"load_audio: got None; expected a path, an array or tensor with sampling_rate=, an \(array, sampling_rate\) tuple, "
               r"or an audio file's bytes"),
    ({"array": [0.1], "sampling_rate": 16000}, {}, r"cannot read a dict as audio; expected a path"),
    (16000, {}, r"cannot read a int as audio; expected a path"),
    (b"not audio at all", {}, r"audio bytes: cannot read as audio \(LibsndfileError"),
    (b"RIFF", {"sampling_rate": SR}, r"bytes are read as an encoded audio file.*leave out sampling_rate"),
    ([np.zeros(10), "44100"], {}, r"sampling_rate must be a positive whole number of Hz, got '44100'"),
    ((np.zeros(10), 44_100), {"sampling_rate": SR}, r"two sample rates given: 44100 in the \(array, sampling_rate\) pair and "
                                                   r"sampling_rate=16000"),
    ([[0.1, 0.2], [0.3]], {"sampling_rate": SR}, r"audio array: cannot read as audio samples \(ValueError"),
    (["a", "b", "c"], {"sampling_rate": SR}, r"audio array: expected numbers as audio samples, got dtype <U1"),
    (np.array([{"x": 1}]), {"sampling_rate": SR}, r"expected numbers as audio samples, got dtype object"),
])
def test_load_audio_refuses_other_forms_clearly(source, kw, message):
    with pytest.raises(AudioError, match=message):
        load_audio(source, **kw)


def test_decode_file_stops_at_its_frame_cap():
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(200_000, np.float32), SR, format="FLAC")
    wave, rate = decode_file(io.BytesIO(buf.getvalue()), "clip")
    assert (wave.shape, rate) == ((200_000,), SR)
    with pytest.raises(AudioError, match=r"clip: the audio is longer than its header says \(70000 frames\)"):
        decode_file(io.BytesIO(buf.getvalue()), "clip", max_frames=70_000)  # refused after 2 blocks, before the rest is read


@pytest.mark.parametrize("seconds", [0.01, 1.0, 29.99, 30.0, 30.01, 61.3])
@pytest.mark.parametrize("frames, pool", [("valid", 1), ("valid", 2), ("full", 1), ("full", 3)])
def test_clip_tokens_counts_what_the_processor_counts(seconds, frames, pool):
    from qva.audio import audio_token_count

    n = round(seconds * SR)
    _, valid = log_mel(torch.zeros(n), 80)
    assert clip_tokens(n, frames, pool) == sum(audio_token_count(v, frames, pool) for v in valid.tolist())
