"""Serving throughput, in one run: `qva-serve` at concurrency 1, 4 and 8 against sequential offline `generate`.

    python tests/benchmarks/bench_serve.py [--size 2b|tiny] [--layers 4] [--requests 8] [--max-tokens 64]
                                           [--rounds 3] [--dtype bf16|fp32] [--compile] [--transformers-serve]

The same `--requests` chat requests (different text prompts of 30–150 tokens, greedy, `--max-tokens` each)
are answered (a) one after another by `model.generate` in this process, and (b) by a `qva-serve` process
(`--max-batch 8`) driven over HTTP by 1, 4 or 8 concurrent streaming clients. The four phases are
interleaved, `--rounds` times; tokens/s is completion tokens ÷ wall time of the phase (median [min–max]
over rounds), time to first token is submission → first streamed text (p50/p95 over every request of the
phase). Also reported: how many server answers equal offline `generate`'s (greedy; exact in fp32, bf16
may differ by rounding). `--transformers-serve` also tries `transformers serve` on the same checkpoint
(it needs torchvision for Qwen2-VL's processor; when it cannot start, the reason is printed). Not a test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qwen2vl import cached_2b  # noqa: E402
from common import ROOT, Timing, cpu_header, run_threads  # noqa: E402

import qva  # noqa: E402
from qva.generate import eos_ids, generate_tokens  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json")
WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing about rivers mountains and distant cities".split()


def checkpoint(args) -> Path:
    """A servable folder: the random 2B-shaped weights (linked) + the real Qwen2-VL tokenizer if ../shared has it,
    else the demo's byte-level one."""
    if args.size == "tiny":
        from qva.demo import demo_checkpoints

        return demo_checkpoints()[0]
    weights = cached_2b(args.workdir, args.layers, 2)
    folder = weights.parent / f"{weights.name}-servable"
    if not (folder / "tokenizer.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for f in weights.iterdir():
            if not (folder / f.name).exists():
                os.symlink(f.resolve(), folder / f.name)
        shared = ROOT.parent / "shared" / "data" / "qwen2-vl-tokenizer"
        if (shared / "tokenizer.json").is_file():
            for name in TOKENIZER_FILES:
                if (shared / name).is_file():
                    shutil.copy(shared / name, folder / name)
        else:
            from qva.demo import demo_tokenizer

            (folder / "tokenizer.json").write_text(demo_tokenizer().to_str())
    return folder


def prompts(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(20 + 15 * i % 110)]
        out.append([{"role": "user", "content": f"Request {i}: " + " ".join(words)}])
    return out


class Server:
    def __init__(self, cmd: list[str], port: int, health: str = "/health", timeout: float = 600):
        self.port = port
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serve-{port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                lines = Path(self.log.name).read_text().strip().splitlines()
                errors = [line for line in lines if "Error" in line or "error:" in line]  # the exception, not the traceback's tail
                reason = " ".join(lines[lines.index(errors[-1]):][:3]) if errors else f"exited with status {self.proc.returncode}"
                raise RuntimeError(reason)
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", health)
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"not healthy after {timeout} s")
            time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def ask(port: int, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed request: text, completion tokens, time to first text."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    text, ttft, tokens = [], None, 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        for ch in event.get("choices", []):
            piece = ch["delta"].get("content")
            if piece:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(piece)
    return {"text": "".join(text), "tokens": tokens, "ttft": ttft if ttft is not None else time.perf_counter() - t0}


def served(port: int, model: str, requests: list, max_tokens: int, concurrency: int) -> tuple[float, list[dict]]:
    """Wall seconds to answer all requests with `concurrency` clients, and each answer (in request order)."""
    answers: list = [None] * len(requests)
    todo = list(range(len(requests)))
    lock = threading.Lock()

    errors = []

    def client():
        while True:
            with lock:
                if not todo or errors:
                    return
                i = todo.pop(0)
            try:
                answers[i] = ask(port, model, requests[i], max_tokens)
            except Exception as e:  # reported by the caller
                errors.append(e)

    seconds = run_threads(client, concurrency)
    if errors:
        raise errors[0]
    return seconds, answers


def offline(model, requests: list, max_tokens: int) -> tuple[float, list[dict]]:
    eos = set(eos_ids(None))
    answers = []
    t0 = time.perf_counter()
    for messages in requests:
        t1 = time.perf_counter()
        inputs = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids, first = [], None
        for tok in generate_tokens(model, **inputs, max_new_tokens=max_tokens):
            first = first if first is not None else time.perf_counter() - t1
            ids.append(int(tok[0]))
            if ids[-1] in eos:
                break
        text_ids = [t for t in ids if t not in eos]
        answers.append({"text": model.processor.decode(text_ids), "tokens": len(ids), "ttft": first})
    return time.perf_counter() - t0, answers


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("2b", "tiny"), default="2b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--transformers-serve", action="store_true")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--port", type=int, default=8431)
    p.add_argument("--json", type=Path, default=Path("bench_results_serve.json"))
    args = p.parse_args()

    folder = checkpoint(args)
    requests = prompts(args.requests)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(cpu_header(), flush=True)
    print(f"checkpoint {folder} ({args.size}, {args.layers} layers), {args.dtype}, {args.requests} requests × ≤{args.max_tokens} tokens",
          flush=True)
    model = qva.load(folder, dtype=dtype)
    cmd = [sys.executable, "-m", "qva.serve.cli", "--model", str(folder), "--dtype", args.dtype, "--max-batch", "8",
           "--max-model-len", "1024", "--served-model-name", "bench", "--port", str(args.port)] + (["--compile"] if args.compile else [])
    server = Server(cmd, args.port)
    phases = {"sequential generate": None, "qva-serve, 1 client": 1, "qva-serve, 4 clients": 4, "qva-serve, 8 clients": 8}
    results: dict[str, dict] = {name: {"seconds": [], "tokens": [], "ttft": [], "same": 0, "answers": 0} for name in phases}
    try:
        served(args.port, "bench", requests[:2], 4, 2)  # warm-up (and, with --compile, the compiled buckets)
        offline(model, requests[:2], 4)
        reference = None
        for r in range(args.rounds):
            for name, conc in phases.items():
                seconds, answers = offline(model, requests, args.max_tokens) if conc is None else \
                    served(args.port, "bench", requests, args.max_tokens, conc)
                if reference is None:  # the first sequential answers: what every other phase is compared with
                    reference = [a["text"] for a in answers]
                res = results[name]
                res["seconds"].append(seconds)
                res["tokens"].append(sum(a["tokens"] for a in answers))
                res["ttft"] += [a["ttft"] for a in answers]
                res["same"] += sum(a["text"] == ref for a, ref in zip(answers, reference))
                res["answers"] += len(answers)
                print(f"round {r + 1} {name}: {res['tokens'][-1]} tokens in {seconds:.2f} s", flush=True)
    finally:
        server.stop()

    base = statistics.median(t / s for t, s in zip(results["sequential generate"]["tokens"], results["sequential generate"]["seconds"]))
    print(f"\n{cpu_header()}")
    print(f"| {'phase':24s} | {'tokens/s median [min–max]':>28s} | {'vs sequential':>13s} | {'TTFT p50':>9s} | {'TTFT p95':>9s} | "
          f"{'= offline greedy':>16s} |")
    print(f"|{'-' * 26}|{'-' * 30}|{'-' * 15}|{'-' * 11}|{'-' * 11}|{'-' * 18}|")
    table = []
    for name, res in results.items():
        rates = [t / s for t, s in zip(res["tokens"], res["seconds"])]
        rate = Timing(rates)
        row = {"phase": name, "tokens_per_s": float(rate), "min": rate.min, "max": rate.max, "ratio": float(rate) / base,
               "ttft_p50": pct(res["ttft"], 0.5), "ttft_p95": pct(res["ttft"], 0.95), "same": res["same"], "answers": res["answers"]}
        table.append(row)
        print(f"| {name:24s} | {float(rate):9.1f} [{rate.min:7.1f}–{rate.max:7.1f}] | {row['ratio']:12.2f}× | {row['ttft_p50']:7.3f} s | "
              f"{row['ttft_p95']:7.3f} s | {res['same']:>7d} / {res['answers']:<6d} |")
    if args.transformers_serve:  # the peer, where it runs: the same requests at the same concurrencies, one round
        try:
            peer = Server(["transformers", "serve", str(folder), "--port", str(args.port + 1), "--device", "cpu", "--dtype", "bfloat16",
                           "--continuous-batching"], args.port + 1, timeout=300)
        except (RuntimeError, TimeoutError, FileNotFoundError) as e:
            print(f"transformers serve: not run: {e}")
        else:
            try:
                for conc in (1, 4, 8):
                    seconds, answers = served(args.port + 1, str(folder), requests, args.max_tokens, conc)
                    rate = sum(a["tokens"] for a in answers) / seconds
                    print(f"transformers serve, {conc} clients: {rate:.1f} tokens/s ({rate / base:.2f}× sequential qva generate), "
                          f"TTFT p50 {pct([a['ttft'] for a in answers], 0.5):.3f} s")
                    table.append({"phase": f"transformers serve, {conc} clients", "tokens_per_s": rate, "ratio": rate / base})
            finally:
                peer.stop()
    args.json.write_text(json.dumps({"size": args.size, "layers": args.layers, "dtype": args.dtype, "compile": args.compile,
                                     "cpu": cpu_header(), "rows": table}, indent=2))


if __name__ == "__main__":
    main()
