"""Audio augmentation for training (off by default): speed perturbation and additive noise on the waveform
(Ko et al., 2015), SpecAugment-style time and frequency masks on the log-mel (Park et al., 2019), and time
masks on the encoder's rows.

With waveform or log-mel augmentation on, Whisper cannot be run once and cached: each step re-encodes its
clips (frozen, without gradients; `reencodes`). Row masks act after the encoder, on each sample's kept, pooled
rows `[n, d_audio]`, so the cache stays in use and they cost nothing: a span of up to `row_mask_width` rows
is set to the sample's mean row, `row_masks` times. Every random draw comes from a generator seeded by (seed,
step, micro-batch), so a resumed run draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

from ..audio import SAMPLE_RATE, load_audio
from ..cli_common import comma_floats, opt
from ..resample import resample
from .data import Example, Sample, encode


@dataclass
class AugmentConfig:
    speeds: tuple[float, ...] = opt(tuple, "augment: speed factors, e.g. 0.9,1.0,1.1 (tempo and pitch together)",
                                    flag="--speed-perturb", type=comma_floats)
    noise_snr: tuple[float, float] | None = opt(None, "augment: white noise at an SNR drawn from LO,HI dB", type=comma_floats)
    noise_prob: float = opt(0.5, "augment: probability a clip gets noise")
    time_masks: int = opt(0, "augment: SpecAugment masks over time per window (within the clip's valid frames)")
    time_mask_width: int = opt(40, "augment: each time mask up to this many mel frames (10 ms each)")
    freq_masks: int = opt(0, "augment: SpecAugment masks over mel bins per window")
    freq_mask_width: int = opt(15, "augment: each frequency mask up to this many bins")
    row_masks: int = opt(0, "augment: time masks over each sample's encoder rows (after the cache: no re-encoding)")
    row_mask_width: int = opt(2, "augment: each row mask up to this many rows (audio tokens)")

    def __post_init__(self):
        if self.noise_snr is not None and len(self.noise_snr) != 2:
            raise ValueError(f"--noise-snr takes LO,HI, got {self.noise_snr}")
        if self.row_masks < 0 or self.row_mask_width < 1:
            raise ValueError(f"--row-masks must be >= 0 and --row-mask-width >= 1, got {self.row_masks} and {self.row_mask_width}")

    @property
    def reencodes(self) -> bool:
        """Whether each step must run the encoder again (the waveform or the log-mel changes)."""
        return bool(self.speeds) or self.noise_snr is not None or self.time_masks > 0 or self.freq_masks > 0

    @property
    def on(self) -> bool:
        return self.reencodes or self.row_masks > 0

    @property
    def on_waveform(self) -> bool:
        return bool(self.speeds) or self.noise_snr is not None


def speed_perturb(wave: torch.Tensor, factor: float) -> torch.Tensor:
    """Play `wave` (16 kHz) `factor`× as fast: read it as sampled at factor · 16 kHz, resample to 16 kHz
    (tempo and pitch change together, as sox's `speed`)."""
    if factor == 1.0:
        return wave
    return resample(wave.double(), round(SAMPLE_RATE * factor), SAMPLE_RATE).float()


def add_noise(wave: torch.Tensor, snr_db: float, generator: torch.Generator) -> torch.Tensor:
    """`wave` + white noise whose power is `snr_db` below the clip's."""
    rms = wave.square().mean().sqrt().clamp(min=1e-8)
    noise = torch.randn(wave.shape, generator=generator) * (rms / 10 ** (snr_db / 20))
    return wave + noise


def augment_wave(wave: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    if cfg.speeds:
        wave = speed_perturb(wave, cfg.speeds[int(torch.randint(len(cfg.speeds), (1,), generator=generator))])
    if cfg.noise_snr is not None and float(torch.rand((), generator=generator)) < cfg.noise_prob:
        lo, hi = cfg.noise_snr
        wave = add_noise(wave, lo + (hi - lo) * float(torch.rand((), generator=generator)), generator)
    return wave


def spec_augment(features: torch.Tensor, valid: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Log-mel `[W, mels, 3000]` with time and frequency bands set to each window's mean over its valid
    frames `valid` `[W]` (masks stay within them: the padding is already silence)."""
    out = features.clone()
    for w in range(out.shape[0]):
        n = int(valid[w])
        if n == 0:
            continue
        fill = out[w, :, :n].mean()
        for _ in range(cfg.time_masks):
            out[w, :, _span(n, cfg.time_mask_width, generator)] = fill
        for _ in range(cfg.freq_masks):
            out[w, _span(out.shape[1], cfg.freq_mask_width, generator), :n] = fill
    return out


def row_masked(rows: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Encoder rows `[n, d_audio]` with `row_masks` spans of up to `row_mask_width` rows set to their mean row."""
    out, n = rows.clone(), rows.shape[0]
    if n == 0:
        return out
    fill = rows.mean(0)  # [d_audio]
    for _ in range(cfg.row_masks):
        out[_span(n, cfg.row_mask_width, generator)] = fill
    return out


def _span(n: int, max_width: int, generator: torch.Generator) -> slice:
    """A random span of 0..`max_width` positions (at most `n`) within `n`: the width is drawn first, then the start."""
    width = min(int(torch.randint(max_width + 1, (1,), generator=generator)), n)
    start = int(torch.randint(n - width + 1, (1,), generator=generator))
    return slice(start, start + width)


def _generator(seed: int, step: int, micro: int, what: str) -> torch.Generator:
    """The draws of one micro-batch of one step, for the re-encoding ("encode") or the row masks ("rows")."""
    if what == "encode":
        return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + micro)
    digest = hashlib.sha256(f"{seed}:{step}:{micro}:{what}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def augmented(model, batch: list[Sample], cfg: AugmentConfig, seed: int, step: int, micro: int) -> list[Sample]:
    """The batch's samples with freshly augmented audio: waveform → log-mel → masks → frozen encoder rows →
    row masks. Samples without audio, or with nothing to change, are returned as they are."""
    out = _reencoded(model, batch, cfg, _generator(seed, step, micro, "encode")) if cfg.reencodes else list(batch)
    if cfg.row_masks:
        g = _generator(seed, step, micro, "rows")
        out = [replace(s, audio_rows=row_masked(s.audio_rows, cfg, g)) if s.audio_rows is not None else s for s in out]
    return out


def _reencoded(model, batch: list[Sample], cfg: AugmentConfig, g: torch.Generator) -> list[Sample]:
    out = []
    for s in batch:
        if not s.example.audio_sources:
            out.append(s)
            continue
        messages = []
        for m in s.example.messages:
            if isinstance(m["content"], list):
                content = [{**item, "audio": (augment_wave(load_audio(item["audio"]) if not isinstance(item["audio"], tuple)
                                                           else load_audio(*item["audio"]), cfg, g), SAMPLE_RATE)}
                           if isinstance(item, dict) and "audio" in item else item for item in m["content"]]
                m = {**m, "content": content}
            messages.append(m)
        # a slowed-down clip is longer than the sample that passed --max-seq-len: the model's context bounds it
        new = encode(Example(messages, s.example.where, s.example.meta), model.processor, model.config.text.max_position_embeddings)
        feats = new.media.pop("input_features")
        valid = new.media.pop("audio_valid_frames")
        if cfg.time_masks or cfg.freq_masks:
            feats = spec_augment(feats, valid, cfg, g)
        with torch.no_grad():
            new.audio_rows = model.audio_encoder_rows(feats, valid).float()
        out.append(new)
    return out
