"""Transcription throughput: `qva-serve`'s /v1/audio/transcriptions at 1 and 8 concurrent uploads, and one long
upload, against the same windows transcribed one after another by `model.generate` in one process.

    python tests/benchmarks/bench_transcribe.py [--model DIR [--whisper DIR]] [--clips 8] [--seconds 20] [--long 150]
                                                [--max-tokens 32] [--rounds 3] [--dtype fp32] [--data dev.jsonl [--limit 200]]

Default model: the tiny random-weight demo graft (its text is noise: the figures are the serving machinery's). A trained
graft (a qva-train run folder) is asked what it was trained with (`train_config.json`'s prompt). Each phase
transcribes the same audio, greedy, at most `--max-tokens` per window:

    sequential   in this process (in a worker thread, as the server's engine runs): decode, split into windows
                 exactly as the server does, `generate` each window
    1 client     the `--clips` uploads one after another (each clip of ≤ 30 s is one window: nothing to batch)
    8 clients    the same uploads all at once (their windows share the engine's rows)
    long         one `--long` s upload (its windows are decoded together, `--max-batch` at a time), against
                 `generate` over its windows one after another

Throughput is audio seconds ÷ wall seconds (median [min–max] over `--rounds`, phases interleaved). Also reported:
how many windows' server text equals offline `generate`'s (exact in fp32). With `--data MANIFEST` (JSONL of
{"audio", "text"}, e.g. the spoken-digits dev set) the clips come from it, and the endpoint's exact match and WER
over them are printed beside `qva-train eval`'s on the same clips and prompt (greedy, the same `--max-tokens`).
Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from common import cpu_header, run_threads  # noqa: E402

import qva  # noqa: E402
from qva.audio import SAMPLE_RATE, split_at_pauses  # noqa: E402
from qva.generate import eos_ids  # noqa: E402
from qva.serve.transcribe import DEFAULT_TRANSCRIBE_PROMPT, WINDOW_SECONDS, trained_prompt  # noqa: E402


def speech(seconds: float, seed: int) -> np.ndarray:
    """Speech-like bursts of 2–6 s with 0.4–1.5 s pauses (a tone gliding around 180 Hz, a little noise)."""
    rng = np.random.default_rng(seed)
    out, t = np.zeros(int(seconds * SAMPLE_RATE), np.float32), 0.0
    while t < seconds:
        n = int(min(rng.uniform(2, 6), seconds - t) * SAMPLE_RATE)
        x = np.arange(n) / SAMPLE_RATE
        a = int(t * SAMPLE_RATE)
        out[a : a + n] = 0.3 * np.sin(2 * np.pi * 180 * x * (1 + 0.3 * np.sin(3 * x))) + 0.05 * rng.standard_normal(n)
        t += n / SAMPLE_RATE + rng.uniform(0.4, 1.5)
    return out


def wav(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def windows_of(wave: torch.Tensor) -> list[tuple[int, int]]:
    """The server's windows (transcribe.run): a clip of ≤ 30 s whole, else its speech split at pauses."""
    pieces = split_at_pauses(wave, WINDOW_SECONDS)
    return [(0, wave.shape[0])] if pieces and wave.shape[0] <= WINDOW_SECONDS * SAMPLE_RATE else pieces


def offline(model, raw: bytes, instruction: str, max_tokens: int) -> list[str]:
    """Each window's greedy text, one `generate` after another (what the server's windows are compared with)."""
    wave = qva.load_audio(raw)
    texts = []
    for a, b in windows_of(wave):
        messages = [{"role": "user", "content": [{"type": "audio", "audio": wave[a:b]}, {"type": "text", "text": instruction}]}]
        inputs = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out = model.generate(**inputs, max_new_tokens=max_tokens)[0, inputs["input_ids"].shape[1]:].tolist()
        out = out[: next((i for i, t in enumerate(out) if t in eos_ids(None)), len(out))]
        texts.append(model.processor.decode(out).strip())
    return texts


def in_thread(fn, *args):
    """`fn(*args)` in a worker thread, as the server's engine thread runs the model (on a loaded machine PyTorch ran
    small models several times slower from the main thread than from a worker, with the same intra-op threads)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join()
    return out[0]


def upload(port: int, name: str, raw: bytes) -> dict:
    """One verbose_json transcription over HTTP (a plain form upload)."""
    import http.client

    boundary = "qva-bench"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{name}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="response_format"\r\n\r\nverbose_json\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
            ).encode() + raw + f"\r\n--{boundary}--\r\n".encode()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    c.request("POST", "/v1/audio/transcriptions", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    r = c.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data[:300]!r}")
    return json.loads(data)


def served(port: int, name: str, clips: list[bytes], concurrency: int) -> tuple[float, list[dict]]:
    out: list = [None] * len(clips)
    todo, lock = list(range(len(clips))), threading.Lock()

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            out[i] = upload(port, name, clips[i])

    return run_threads(worker, concurrency), out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a Qwen2-VL folder with --whisper, a saved graft, or a qva-train run folder (default: the demo)")
    p.add_argument("--whisper", type=Path)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0, help="length of each synthetic clip")
    p.add_argument("--long", type=float, default=150.0, help="length of the long upload (0: skip)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per window (--transcribe-max-tokens)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", type=Path, help="a JSONL manifest of {'audio', 'text'}: clips (and references) from it")
    p.add_argument("--limit", type=int, default=None, help="clips of --data (default: all)")
    p.add_argument("--json", type=Path, default=Path("bench_results_transcribe.json"))
    args = p.parse_args()

    if args.model is None:
        from qva.demo import demo_checkpoints

        args.model, args.whisper = demo_checkpoints()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    instruction = trained_prompt(args.model) or DEFAULT_TRANSCRIBE_PROMPT
    model = qva.load(args.model, whisper=args.whisper, dtype=dtype)
    refs = None
    if args.data:
        lines = [json.loads(x) for x in args.data.read_text().splitlines() if x.strip()][: args.limit]
        clips = [(args.data.parent / x["audio"]).read_bytes() for x in lines]
        clips = [wav(qva.load_audio(c).numpy()) for c in clips]  # as 16 kHz PCM WAV, whatever they were stored in
        refs = [x["text"] for x in lines]
    else:
        clips = [wav(speech(args.seconds, i)) for i in range(args.clips)]
    long_clip = wav(speech(args.long, 99)) if args.long else None
    seconds = sum(qva.load_audio(c).shape[0] for c in clips) / SAMPLE_RATE
    long_seconds = args.long

    port = free_port()
    cmd = [sys.executable, "-m", "qva.serve.cli", "--model", str(args.model), "--port", str(port), "--dtype", args.dtype,
           "--served-model-name", "bench", "--max-batch", str(args.max_batch), "--transcribe-max-tokens", str(args.max_tokens),
           "--max-queue", "256"]
    if args.whisper:
        cmd += ["--whisper", str(args.whisper)]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-transcribe-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        import urllib.request

        deadline = time.monotonic() + 600
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qva-serve did not start: see {log.name}")
            time.sleep(0.5)
        served(port, "bench", clips[:2], 2)  # warm-up (first prefills, allocator)
        offline(model, clips[0], instruction, args.max_tokens)
        times = {k: [] for k in ("sequential", "1 client", "8 clients", "long, sequential", "long, served")}
        answers, reference = {}, {}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            reference["clips"] = in_thread(lambda: [offline(model, c, instruction, args.max_tokens) for c in clips])
            times["sequential"].append(time.perf_counter() - t0)
            for label, k in (("1 client", 1), ("8 clients", 8)):
                wall, out = served(port, "bench", clips, k)
                times[label].append(wall)
                answers[label] = out
            if long_clip is not None:
                t0 = time.perf_counter()
                reference["long"] = [in_thread(offline, model, long_clip, instruction, args.max_tokens)]
                times["long, sequential"].append(time.perf_counter() - t0)
                wall, out = served(port, "bench", [long_clip], 1)
                times["long, served"].append(wall)
                answers["long"] = out
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()

    def rate(label):
        audio = long_seconds if label.startswith("long") else seconds
        runs = [audio / t for t in times[label]]
        return statistics.median(runs), min(runs), max(runs)

    def agree(out, ref):
        got = [[s["text"] for s in o["segments"]] for o in out]
        return sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r)), sum(len(r) for r in ref)

    print(f"\n{cpu_header()}\nmodel {args.model} ({args.dtype}), instruction {instruction!r}, {len(clips)} clips, {seconds:.0f} s of audio, "
          f"≤ {args.max_tokens} tokens a window, --max-batch {args.max_batch}, {args.rounds} rounds")
    print("| phase | audio s / wall s, median [min–max] | vs sequential | windows equal to offline `generate` |")
    print("|---|---|---|---|")
    base = rate("sequential")[0]
    rows = {}
    for label in times:
        if not times[label]:
            continue
        med, lo, hi = rate(label)
        ref_base = rate("long, sequential")[0] if label.startswith("long") else base
        key = "long" if label == "long, served" else label
        equal = "(the reference)" if "sequential" in label else "%d / %d" % agree(answers[key], reference["long" if key == "long" else "clips"])
        print(f"| {label} | {med:.2f} [{lo:.2f}–{hi:.2f}] | {med / ref_base:.2f}× | {equal} |")
        rows[label] = {"median": med, "min": lo, "max": hi, "vs_sequential": med / ref_base}
    result = {"rows": rows, "seconds": seconds, "long_seconds": long_seconds, "clips": len(clips), "max_tokens": args.max_tokens}
    if refs is not None:
        from qva.train.data import encode_all, read_manifest
        from qva.train.evaluate import evaluate, score

        endpoint = [" ".join(s["text"] for s in o["segments"]) for o in answers["8 clients"]]
        examples, _ = read_manifest(args.data, instruction)
        samples, bad = encode_all(examples[: args.limit], model.processor, max_seq_len=model.config.text.max_position_embeddings)
        ev = evaluate(model, model.processor, samples, max_new_tokens=args.max_tokens)
        same = sum(a.strip() == b.strip() for a, b in zip(endpoint, ev["answers"]))
        print(f"\n--data {args.data}: endpoint {score(endpoint, refs)}; qva-train eval {({k: ev[k] for k in ('exact_match', 'wer', 'n')})}; "
              f"answers equal on {same} / {len(endpoint)} clips ({len(bad)} skipped by eval)")
        result["data"] = {"endpoint": score(endpoint, refs), "eval": {k: ev[k] for k in ("exact_match", "wer", "n")}, "equal": same}
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
