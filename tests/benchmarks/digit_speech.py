"""Synthetic connected-digit speech for the digits recipe: espeak-ng speaks, sox resamples and degrades. Not a test.

Two sets, both written as `{"audio", "text", "spoken", "voice", "rate", "pitch", "condition", "seconds"}` manifests
(the shared corpus's fields plus the recording condition), 16 kHz mono 16-bit FLAC, fully determined by a seed:

  extra   more training speech: the corpus's own seen voices and ranges (rate 135–195 wpm, pitch 30–70, word gap
          0–4), fresh strings, and the training-side augmentation — sox `speed` 0.9 or 1.1 (tempo and pitch; `speed`
          0.25: 0.75 or 1.25) on two
          clips in three, white noise at 20–40 dB SNR on one in two; `broad`: instead one recording condition of
          TRAIN_CONDITIONS a clip (clean on two in eight): white noise at 20–40 dB SNR, brown noise (1/f²) at
          15–30 dB, a low-pass at 4–6.5 kHz, a high-pass at 80–200 Hz, one discrete echo (40–120 ms), a ±6 dB
          equaliser band — none of them the hard set's; `wide` voices: besides the seen voices, the corpus's four
          accents with WIDE_VARIANTS, espeak-ng variants neither the corpus nor the hard set uses
  hard    the unseen set no stage trains or selects on: accents the corpus never uses (en-gb-x-rp, en-gb-x-gbclan,
          en-gb-x-gbcwmd, en-us-nyc) × voice variants it never uses, rates and pitches outside its ranges
          (100–130 or 200–240 wpm; pitch 10–28 or 72–90), and a recording condition no training clip has:
          reverberation, an 8 kHz telephone band (300–3400 Hz), pink noise at 10–20 dB SNR, or reverberation with
          pink noise; each at a random level (−12 to 0 dB)

Strings are the caller's (it keeps them out of every other set). `espeak-ng` and `sox` are Debian packages;
`missing_tools()` names the absent ones.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weights_loader.writer import atomic_file  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
HARD_ACCENTS = ("en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
HARD_VARIANTS = ("f4", "f5", "m5", "m6", "m7", "m8", "Alex", "Annie", "Andrea", "edward", "grandma", "grandpa", "iven",
                 "steph2", "travis", "zac", "aunty", "shelby", "norbert", "quincy")
HARD_CONDITIONS = ("reverb", "telephone", "pink-noise", "reverb+pink-noise")
TRAIN_CONDITIONS = ("clean", "clean", "white-noise", "brown-noise", "lowpass", "highpass", "echo", "eq")
# variants for more diverse training voices: none of the corpus's or HARD_VARIANTS, none a near copy of one (iven2–4,
# edward2, steph3 left out; caleb speaks exactly as klatt), no robot, whisper or croak voices
WIDE_VARIANTS = ("Alicia", "AnxiousAndy", "Denis", "Diogo", "Gene", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Mike",
                 "Nguyen", "RicishayMax", "Storm", "anika", "announcer", "antonio", "benjamin", "boris", "ed", "gustave",
                 "kaukovalta", "klatt", "klatt2", "klatt3", "marcelo", "michel", "miguel", "pablo", "pedro", "rob", "sandro", "victor")
NOISE_EXPONENT = {"pink-noise": 1.0, "brown-noise": 2.0}  # coloured noises: power ∝ 1/f^exponent


def espeak_voice(voice: str) -> str:
    """The `-v` argument that speaks `voice`: espeak-ng 1.51 drops the variant of "en-gb+VARIANT" (every such voice
    is the base en-gb voice, byte for byte; the shared corpus's 18 en-gb voices are that one voice), while
    "en+VARIANT" (en is en-gb) applies it."""
    language, plus, variant = voice.partition("+")
    return f"en+{variant}" if language == "en-gb" and plus else voice


def wide_voices(seen: list[str]) -> list[str]:
    """The seen voices plus each of their accents with every WIDE_VARIANTS variant."""
    accents = sorted({v.partition("+")[0] for v in seen})
    return sorted(seen) + [f"{a}+{v}" for a in accents for v in WIDE_VARIANTS]


def missing_tools() -> list[str]:
    return [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]


def spoken(digits: str) -> str:
    return " ".join(WORDS[int(d)] for d in digits)


def coloured_noise(n: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Noise with power ∝ 1/f^exponent (1: pink, 2: brown): white noise shaped in the frequency domain, unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.maximum(np.arange(len(spectrum)), 1.0) ** (exponent / 2)
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.sqrt(np.mean(noise ** 2)) + 1e-12)


def at_snr(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`wave` + `noise` (unit RMS) at `snr_db` below the speech's RMS (over its non-silent samples)."""
    voiced = wave[np.abs(wave) > 0.01 * np.abs(wave).max()] if np.any(wave) else wave
    rms = np.sqrt(np.mean(voiced ** 2)) if voiced.size else 0.0
    return wave + noise * rms / 10 ** (snr_db / 20)


def render(out: Path, row: dict, tmp: Path) -> float:
    """One clip: espeak-ng → sox (resample, speed, reverb or telephone band) → numpy noise and level → FLAC."""
    raw, mid = tmp / f"{out.stem}.wav", tmp / f"{out.stem}.16k.wav"
    subprocess.run(["espeak-ng", "-v", espeak_voice(row["voice"]), "-s", str(row["rate"]), "-p", str(row["pitch"]), "-g", str(row["gap"]),
                    "-w", str(raw), row["spoken"]], check=True, capture_output=True)
    effects = []
    if row.get("speed", 1.0) != 1.0:
        effects += ["speed", str(row["speed"])]
    if "reverb" in row["condition"]:
        effects += ["reverb", str(row["reverb"]), "50", "100", "pad", "0", "0.3"]
    if row["condition"] == "telephone":
        effects += ["sinc", "300-3400", "rate", "8k"]
    if row["condition"] in ("lowpass", "highpass"):
        effects += [row["condition"], str(row["cutoff"])]
    if row["condition"] == "echo":
        effects += ["echo", "0.8", "0.9", str(row["delay_ms"]), str(row["decay"])]
    if row["condition"] == "eq":
        effects += ["equalizer", str(row["band_hz"]), "1o", str(row["band_db"])]
    subprocess.run(["sox", str(raw), "-c", "1", "-b", "16", str(mid), *effects, "rate", "16k"], check=True, capture_output=True)
    wave, rate = sf.read(mid, dtype="float64")
    rng = np.random.default_rng(row["seed"])
    if (exponent := NOISE_EXPONENT.get(row["condition"].removeprefix("reverb+"))) is not None:
        wave = at_snr(wave, coloured_noise(len(wave), rng, exponent), row["snr"])
    elif row["condition"] == "white-noise":
        wave = at_snr(wave, rng.standard_normal(len(wave)), row["snr"])
    wave = wave * 10 ** (row.get("gain_db", 0.0) / 20)
    peak = np.abs(wave).max()
    if peak > 0.99:
        wave = wave * (0.99 / peak)
    sf.write(out, wave.astype(np.float32), rate, subtype="PCM_16", format="FLAC")
    raw.unlink()
    mid.unlink()
    return len(wave) / rate


def extra_rows(strings: list[str], voices: list[str], seed: int, broad: bool = False, *, speed: float) -> list[dict]:
    """Training rows; `broad`: a condition of TRAIN_CONDITIONS each, else clean or white noise (one in two); sox
    `speed` 1 − `speed`, 1 or 1 + `speed` (one in three each)."""
    rng = random.Random(seed)
    rows = []
    for i, digits in enumerate(strings):
        condition = rng.choice(TRAIN_CONDITIONS if broad else ("clean", "white-noise"))
        row = {"text": digits, "spoken": spoken(digits), "voice": rng.choice(voices), "rate": rng.randint(135, 195),
               "pitch": rng.randint(30, 70), "gap": rng.randint(0, 4), "speed": rng.choice((round(1 - speed, 3), 1.0, round(1 + speed, 3))),
               "condition": condition, "seed": seed * 100003 + i}
        if condition.endswith("noise"):
            row["snr"] = round(rng.uniform(20, 40) if condition == "white-noise" else rng.uniform(15, 30), 1)
        elif condition in ("lowpass", "highpass"):
            row["cutoff"] = rng.randint(4000, 6500) if condition == "lowpass" else rng.randint(80, 200)
        elif condition == "echo":
            row.update(delay_ms=rng.randint(40, 120), decay=round(rng.uniform(0.2, 0.4), 2))
        elif condition == "eq":
            row.update(band_hz=rng.randint(300, 3000), band_db=round(rng.uniform(-6, 6), 1))
        rows.append(row)
    return rows


def hard_rows(strings: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i, digits in enumerate(strings):
        rate = rng.randint(100, 130) if rng.random() < 0.5 else rng.randint(200, 240)
        pitch = rng.randint(10, 28) if rng.random() < 0.5 else rng.randint(72, 90)
        rows.append({"text": digits, "spoken": spoken(digits), "voice": f"{rng.choice(HARD_ACCENTS)}+{rng.choice(HARD_VARIANTS)}",
                     "rate": rate, "pitch": pitch, "gap": rng.randint(0, 6), "condition": rng.choice(HARD_CONDITIONS),
                     "reverb": rng.randint(40, 90), "snr": round(rng.uniform(10, 20), 1), "gain_db": round(rng.uniform(-12, 0), 1),
                     "seed": seed * 100003 + i})
    return rows


def write_set(folder: Path, rows: list[dict], workers: int = 2) -> Path:
    """Render `rows` into `folder` (clips + manifest.jsonl); a folder whose manifest already lists exactly these rows
    is reused as it is."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    fingerprint = folder / "rows.json"
    if manifest.is_file() and fingerprint.is_file() and json.loads(fingerprint.read_text()) == rows:
        return manifest
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(workers) as pool:
        seconds = list(pool.map(lambda ir: render(folder / f"{ir[0]:05d}.flac", ir[1], Path(tmp)), enumerate(rows)))
    lines = [json.dumps({"audio": str(folder / f"{i:05d}.flac"), **{k: row[k] for k in ("text", "spoken", "voice", "rate", "pitch", "condition")},
                         "seconds": round(s, 3)}) for i, (row, s) in enumerate(zip(rows, seconds))]
    atomic_file(manifest, "".join(line + "\n" for line in lines))
    atomic_file(fingerprint, json.dumps(rows))  # last: a set cut short is rendered again
    return manifest
