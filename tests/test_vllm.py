"""A qva graft served by vLLM (CPU build) through qva's plugin: greedy tokens equal qva's `generate`, fp32.

vLLM runs in its own venv (`bash tests/vllm_env.sh`; `QVA_VLLM_VENV` names another), never in this one: it
pins its own torch. This module builds a tiny graft here (head_dim 32; LLM, vision, Whisper and projector
drawn large so the logits are not flat; a stage-2-like LoRA adapter merged by `qva-train merge`, which is the
folder served), computes qva's answers here, then starts vLLM twice, one after the other: the offline
`vllm.LLM` (this file run as a script in the vLLM venv: `python tests/test_vllm.py offline SPEC OUT`) and the
OpenAI server (`python -m vllm.entrypoints.openai.api_server`, on 127.0.0.1). Each engine serves every case
of the module (module-scoped fixtures); one takes ~1-2.5 min to start and ~6 GiB.

Cases: text, image, 3 s audio (16 kHz), 45 s audio (44.1 kHz stereo: resampled, two 30 s windows), image +
audio, and a batch of 4 sent together. Checked: the prompt token ids vLLM built (so every `<|audio_pad|>` /
`<|image_pad|>` expansion) and the greedy tokens equal qva's; vLLM's raw logits at the top-5 tokens of every
step are within `LOGIT_TOL` of qva's (the max-abs differences are printed). Controls: the same comparison
against qva with a transposed projector, or with audio_frames "full" (another audio token count), fails.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("QVA_VLLM_VENV", ""))  # opt-in: these tests start vLLM engines (minutes, ~6 GiB each)
VLLM_PYTHON = VENV / "bin" / "python"
N_TOKENS = 24  # greedy tokens per answer
TOP = 5  # raw logits compared per step (vLLM's top-5 and the chosen token)
LOGIT_TOL = 1e-3  # fp32: vLLM's CPU kernels vs qva's
STOP = [151645, 151643]  # <|im_end|>, <|endoftext|>: qva's generate stops at these
MAX_LEN = 4096
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=MAX_LEN, max_num_batched_tokens=MAX_LEN,
                   limit_mm_per_prompt={"image": 2, "video": 0, "audio": 2})


def vllm_env(work: Path) -> dict[str, str]:
    """vLLM's environment for a run whose files stay in `work` (caches, temporary files)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(work / "vllm-cache"),
               TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"), TMPDIR=str(work), VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    (work / "vllm-cache").mkdir(parents=True, exist_ok=True)
    return env


def have_vllm() -> str | None:
    """Why vLLM cannot run here (None: it can)."""
    if not os.environ.get("QVA_VLLM_VENV") or not VLLM_PYTHON.exists():
        return "no vLLM venv given (bash tests/vllm_env.sh creates ../vllm-venv; set QVA_VLLM_VENV to it to run these)"
    probe = ("from importlib.metadata import entry_points; import vllm, qva.vllm; "
             "assert any(e.value == 'qva.vllm:register' for e in entry_points(group='vllm.general_plugins'))")
    r = subprocess.run([str(VLLM_PYTHON), "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    if r.returncode:
        return f"{VENV}: vLLM or qva's vllm.general_plugins entry point is missing ({r.stderr.strip()[-300:]})"
    return None


# -- the tiny graft (built here, with qva) -----------------------------------------------------------------
def tiny_config() -> dict:
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_act": "silu",
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": MAX_LEN,
        "tie_word_embeddings": True, "torch_dtype": "float32", "vocab_size": 151936, "use_sliding_window": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},  # head_dim 32: vLLM-CPU's smallest
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_config": {"depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 4, "in_chans": 3, "hidden_size": 128,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    }


def build_graft(root: Path, audio_pool: int = 2) -> dict[str, Path]:
    """A tiny Qwen2-VL + Whisper (d_model 128 = the LLM's width, so a transposed projector still loads), grafted,
    a projector drawn N(0, 0.1²) (stage 1), LoRA r8 on q/k/v/o/gate/up/down with random factors (stage 2, saved
    as a run folder), and `qva-train merge` of that run: {"stage1", "run", "merged"}."""
    import qva
    from qva.adapters import save_adapter
    from qva.demo import _byte_alphabet, demo_tokenizer, randomize_, write_tiny_whisper
    from qva.linear import LORA_TARGETS, add_lora
    from qva.model import QVAModel
    from qva.qwen2vl_config import Qwen2VLConfig
    from qva.whisper_encoder import WhisperEncoderConfig
    from weights_loader.writer import save_checkpoint

    config = tiny_config()
    model = randomize_(QVAModel(Qwen2VLConfig.from_dict(config)), 0, std=0.1, gain_std=0.1)
    with torch.no_grad():  # as the demo: only printable ASCII rows of the tied embedding are non-zero
        keep = torch.zeros(model.model.embed_tokens.weight.shape[0], dtype=torch.bool)
        keep[[i for i, c in enumerate(_byte_alphabet()) if 32 <= ord(c) < 127]] = True
        model.model.embed_tokens.weight[~keep] = 0
    files = {"tokenizer.json": demo_tokenizer().to_str(),
             "preprocessor_config.json": json.dumps({"min_pixels": 3136, "max_pixels": 28 * 28 * 64, "patch_size": 14,
                                                     "temporal_patch_size": 2, "merge_size": 2})}
    save_checkpoint(root / "qwen", {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}, config, files)
    whisper = WhisperEncoderConfig(num_mel_bins=80, d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256)
    write_tiny_whisper(root / "whisper", whisper, dtype=torch.float32)
    graft = qva.load(root / "qwen", whisper=root / "whisper", audio_pool=audio_pool, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        graft.audio_projector.weight.copy_(0.1 * torch.randn(graft.audio_projector.weight.shape, generator=g))
    qva.save(graft, root / "stage1")
    stage1 = qva.load(root / "stage1", dtype=torch.float32)
    torch.manual_seed(0)  # add_lora draws lora_A from the global generator
    for layer in stage1.model.layers:
        for name, linear in [*layer.self_attn.named_children(), *layer.mlp.named_children()]:
            if name in LORA_TARGETS:
                add_lora(linear, 8, 16.0)
                with torch.no_grad():
                    linear.lora_B.weight.copy_(0.05 * torch.randn(linear.lora_B.weight.shape, generator=g))
    with torch.no_grad():  # stage 2 trains the projector too
        stage1.audio_projector.weight.add_(0.02 * torch.randn(stage1.audio_projector.weight.shape, generator=g))
    save_adapter(stage1, root / "run", base=root / "stage1")
    subprocess.run([sys.executable, "-m", "qva.train", "merge", str(root / "run"), "--out", str(root / "merged")],
                   check=True, cwd=ROOT, capture_output=True)
    return {"stage1": root / "stage1", "run": root / "run", "merged": root / "merged"}


# -- media and cases -------------------------------------------------------------------------------------
def speechlike(seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    """A voiced, wobbling tone with noise: `[samples]` (mono) or `[samples, channels]`, float32 in [-1, 1)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    waves = [0.3 * np.sin(2 * np.pi * (150 + 40 * c) * t * (1 + 0.3 * np.sin((3 + c) * t))) * (0.6 + 0.4 * np.sin(5 * t))
             + 0.05 * rng.standard_normal(t.shape) for c in range(channels)]
    x = np.stack(waves, axis=1) if channels > 1 else waves[0]
    return x.astype(np.float32)


def write_media(root: Path) -> dict[str, Path]:
    import soundfile as sf
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:150, 0:200]
    picture = np.stack([xx * 255 / 200, yy * 255 / 150, 128 + 60 * np.sin(xx / 9.0)], axis=-1) + rng.normal(0, 20, (150, 200, 3))
    Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(root / "picture.png")
    sf.write(root / "audio3.wav", speechlike(3.0, 16000, seed=1), 16000, subtype="PCM_16")
    sf.write(root / "audio45.wav", speechlike(45.0, 44100, seed=2, channels=2), 44100, subtype="PCM_16")
    sf.write(root / "audio7.wav", speechlike(7.3, 22050, seed=4), 22050, subtype="PCM_16")
    (root / "bad.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64)))  # a malformed header
    (root / "noise.wav").write_bytes(bytes(rng.integers(0, 256, 4096, dtype=np.uint8)))  # not audio at all
    sf.write(root / "empty.wav", np.zeros(0, dtype=np.float32), 16000)  # decodes to no samples
    return {p.stem: p for p in root.iterdir()}


def user(*parts) -> list[dict]:
    """One user turn; parts are ("text", str) / ("image", path) / ("audio", path)."""
    return [{"role": "user", "content": [{"type": k, k: v} for k, v in parts]}]


def cases(media: dict[str, Path]) -> dict[str, list[dict]]:
    return {
        "text": user(("text", "Hello there, say something.")),
        "image": user(("image", media["picture"]), ("text", "What is in the picture?")),
        "audio3": user(("audio", media["audio3"]), ("text", "Transcribe it.")),
        "audio45": user(("text", "A long one:"), ("audio", media["audio45"]), ("text", "What was said?")),
        "image_audio": user(("image", media["picture"]), ("audio", media["audio3"]), ("text", "Answer the question.")),
    }


BATCH = ("text", "audio3", "image_audio", "audio7")  # sent together


def batch_cases(media: dict[str, Path]) -> dict[str, list[dict]]:
    out = cases(media)
    out["audio7"] = user(("audio", media["audio7"]), ("text", "Again, shorter."))
    return out


# -- qva's answers (here) ----------------------------------------------------------------------------------
def qva_answer(model, messages) -> dict:
    """Prompt ids, greedy tokens (up to and with the stop token) and each step's logits, in fp32."""
    inputs = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=N_TOKENS)[0, inputs["input_ids"].shape[1]:].tolist()
        tokens = []
        for t in out:
            tokens.append(t)
            if t in STOP:
                break
        full = torch.cat([inputs["input_ids"], torch.tensor([tokens[:-1]], dtype=torch.long)], dim=1)
        logits = model(**{**inputs, "input_ids": full, "attention_mask": torch.ones_like(full)},
                       logits_to_keep=len(tokens)).logits[0].float()  # [len(tokens), V]: the steps' logits
    top2 = logits.topk(2, dim=-1).values
    return {"prompt": inputs["input_ids"][0].tolist(), "tokens": tokens, "logits": logits,
            "margin": float((top2[:, 0] - top2[:, 1]).min())}


def qva_answers(model, all_cases: dict) -> dict[str, dict]:
    return {name: qva_answer(model, messages) for name, messages in all_cases.items()}


def qva_batch(model, all_cases: dict) -> list[list[int]]:
    """The BATCH prompts in one left-padded `generate` call (what 4 concurrent requests should match)."""
    texts = [model.processor.apply_chat_template(all_cases[n], add_generation_prompt=True) for n in BATCH]
    from qva.chat_template import media_items

    images, audio = [], []
    for n in BATCH:
        m = media_items(all_cases[n])
        images += m["image"]
        audio += m["audio"]
    inputs = model.processor(text=texts, images=images or None, audio=audio or None)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=N_TOKENS)[:, inputs["input_ids"].shape[1]:].tolist()
    rows = []
    for row in out:
        tokens = []
        for t in row:
            tokens.append(t)
            if t in STOP:
                break
        rows.append(tokens)
    return rows


# -- what qva.save writes for vLLM (here, no vLLM needed) ------------------------------------------------------
def test_saved_config_names_the_plugin(tmp_path, demo_dirs):
    """A graft's config.json names QVAForConditionalGeneration and carries the audio side; a plain Qwen2-VL keeps
    Qwen2VLForConditionalGeneration; both load back in qva."""
    import qva

    qwen, whisper = demo_dirs
    plain, graft = tmp_path / "plain", tmp_path / "graft"
    qva.save(qva.load(qwen, dtype=torch.float32), plain)
    qva.save(qva.load(qwen, whisper=whisper, audio_pool=2, dtype=torch.float32), graft)
    p, g = (json.loads((f / "config.json").read_text()) for f in (plain, graft))
    assert p["architectures"] == ["Qwen2VLForConditionalGeneration"] and not p["has_audio_encoder"]
    assert g["architectures"] == ["QVAForConditionalGeneration"] and g["has_audio_encoder"]
    assert g["audio_config"]["d_model"] == g["audio_hidden_size"] and (g["audio_pool"], g["audio_frames"]) == (2, "valid")
    assert (g["audio_start_token_id"], g["audio_end_token_id"], g["audio_token_id"]) == (151657, 151658, 151659)
    assert qva.load(graft).config.audio_pool == 2 and qva.load(plain).config.audio is None


def test_saved_tokenizer_config_keeps_the_audio_tokens(tmp_path, demo_dirs):
    """A source checkpoint's tokenizer_config.json (kept on save) lists its added tokens, and transformers (so vLLM)
    lets that list override tokenizer.json's: the saved one must list the audio tokens, or `<|audio_pad|>` is split
    into text pieces and vLLM finds no placeholder."""
    from transformers import AutoTokenizer

    import qva
    from qva.demo import QWEN_SPECIAL_TOKENS

    qwen, whisper = demo_dirs
    source = tmp_path / "qwen"
    shutil.copytree(qwen, source)
    special = {str(151643 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                                 "special": True} for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": special,
                                                              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    graft = qva.load(source, whisper=whisper, dtype=torch.float32)
    qva.save(graft, tmp_path / "graft")
    text = "<|audio_start|><|audio_pad|><|audio_end|>hi<|image_pad|>"
    assert AutoTokenizer.from_pretrained(tmp_path / "graft").encode(text, add_special_tokens=False) == [151657, 151659, 151658, 104, 105, 151655]
    unfixed = tmp_path / "unfixed"  # what save wrote before: the source's tokenizer_config.json as it was
    shutil.copytree(tmp_path / "graft", unfixed)
    shutil.copy(source / "tokenizer_config.json", unfixed / "tokenizer_config.json")
    assert 151659 not in AutoTokenizer.from_pretrained(unfixed).encode(text, add_special_tokens=False)


# -- the offline engine (this file as a script, in the vLLM venv) ------------------------------------------
def offline_main(spec_file: str, out_file: str) -> None:
    """Serve every case of SPEC with one `vllm.LLM`: one at a time, then BATCH together; write OUT."""
    import soundfile as sf
    from PIL import Image
    from vllm import LLM, SamplingParams

    from qva.chat_template import media_items

    spec = json.loads(Path(spec_file).read_text())
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], logprobs_mode="raw_logits", max_logprobs=TOP, seed=0, **ENGINE_ARGS)
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, logprobs=TOP, stop_token_ids=STOP)

    def request(name: str) -> dict:
        messages = spec["cases"][name]
        found = media_items(messages)
        data = {}
        if found["image"]:
            data["image"] = [Image.open(p) for p in found["image"]]
        if found["audio"]:
            data["audio"] = [tuple(sf.read(p, dtype="float32")) for p in found["audio"]]  # (samples, rate)
        return {"prompt": spec["prompts"][name], "multi_modal_data": data}

    def result(output) -> dict:
        o = output.outputs[0]
        return {"prompt": list(output.prompt_token_ids), "tokens": list(o.token_ids),
                "logits": [{str(k): v.logprob for k, v in step.items()} for step in (o.logprobs or [])]}

    out = {"startup_s": startup, "single": {}, "batch": None}
    for name in spec["cases"]:
        out["single"][name] = result(llm.generate([request(name)], params, use_tqdm=False)[0])
    out["batch"] = [result(o) for o in llm.generate([request(n) for n in BATCH], params, use_tqdm=False)]
    Path(out_file).write_text(json.dumps(out))


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    reason = have_vllm()
    if reason:
        pytest.skip(reason)
    import qva

    root = tmp_path_factory.mktemp("vllm")
    folders = build_graft(root / "models")
    media = write_media(root / "media")
    all_cases = batch_cases(media)
    reference = qva.load(folders["run"], dtype=torch.float32)  # the stage-2 run, LoRA applied unmerged
    return {"root": root, "folders": folders, "media": media, "cases": all_cases, "model": reference,
            "qva": qva_answers(reference, all_cases), "qva_batch": qva_batch(reference, all_cases)}


def jsonable(messages):
    return [{**m, "content": [{k: str(v) for k, v in part.items()} for part in m["content"]]} for m in messages]


@pytest.fixture(scope="module")
def offline(setup):
    root, model = setup["root"], setup["model"]
    spec = {"model": str(setup["folders"]["merged"]),
            "cases": {n: jsonable(m) for n, m in setup["cases"].items()},
            "prompts": {n: model.processor.apply_chat_template(m, add_generation_prompt=True) for n, m in setup["cases"].items()}}
    (root / "spec.json").write_text(json.dumps(spec))
    log = root / "offline.log"
    with open(log, "w") as f:
        r = subprocess.run([str(VLLM_PYTHON), str(Path(__file__).resolve()), "offline", str(root / "spec.json"), str(root / "offline.json")],
                           cwd=root, env=vllm_env(root), stdout=f, stderr=subprocess.STDOUT, timeout=1500)
    assert r.returncode == 0, f"vLLM offline run failed (rc {r.returncode}):\n{log.read_text()[-4000:]}"
    return json.loads((root / "offline.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(setup, offline):  # after the offline engine has exited: one engine at a time
    root, port = setup["root"], free_port()
    template = root / "chat_template.jinja"
    from qva.vllm.chat_template import CHAT_TEMPLATE

    template.write_text(CHAT_TEMPLATE)
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(setup["folders"]["merged"]),
           "--served-model-name", "qva-tiny", "--host", "127.0.0.1", "--port", str(port), "--chat-template", str(template),
           "--chat-template-content-format", "openai", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", str(MAX_LEN), "--max-num-batched-tokens", str(MAX_LEN),
           "--limit-mm-per-prompt", json.dumps(ENGINE_ARGS["limit_mm_per_prompt"]), "--max-logprobs", str(TOP),
           "--logprobs-mode", "raw_logits", "--seed", "0"]
    log = open(root / "server.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=vllm_env(root), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited (rc {proc.returncode}):\n{(root / 'server.log').read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() - t0 > 900:
                pytest.fail("vLLM server did not come up in 900 s")
            time.sleep(2)
        yield {"url": url, "startup_s": time.perf_counter() - t0}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


# -- comparisons --------------------------------------------------------------------------------------------
def logit_diff(vllm_steps: list[dict], logits: torch.Tensor) -> float:
    """max |vLLM raw logit − qva logit| over the tokens vLLM reported at every step."""
    worst = 0.0
    for step, row in zip(vllm_steps, logits):
        for tok, value in step.items():
            worst = max(worst, abs(value - float(row[int(tok)])))
    return worst


DIFFS: dict[str, float] = {}


@pytest.mark.parametrize("name", list(cases({k: Path(k) for k in ("picture", "audio3", "audio45")})))
def test_offline_equals_qva(setup, offline, name):
    ours, theirs = setup["qva"][name], offline["single"][name]
    assert theirs["prompt"] == ours["prompt"], "vLLM built another prompt (placeholder expansion differs)"
    assert theirs["tokens"] == ours["tokens"]
    diff = logit_diff(theirs["logits"], ours["logits"])
    DIFFS[name] = diff
    print(f"{name}: {len(ours['prompt'])} prompt tokens, {len(ours['tokens'])} new, logit max-abs diff {diff:.2e}, "
          f"qva's smallest top-2 margin {ours['margin']:.3f}")
    assert diff < LOGIT_TOL


def test_offline_batch_of_4(setup, offline):
    got = [r["tokens"] for r in offline["batch"]]
    assert got == setup["qva_batch"]
    assert got == [setup["qva"][n]["tokens"] for n in BATCH]  # batched = alone, in fp32


def test_audio_token_count_is_qvas(setup, offline):
    """45 s at 44.1 kHz stereo: windows of 30 s and 15 s, valid frames, pool 2 → 750 + 375 pads."""
    from qva.audio import clip_tokens

    prompt = offline["single"]["audio45"]["prompt"]
    n = sum(1 for t in prompt if t == 151659)
    assert n == clip_tokens(45 * 16000, "valid", 2) == 750 + 375


def test_controls_are_caught(setup, offline):
    """The comparisons can fail: qva with a transposed projector, or with another audio token count
    (audio_frames "full"), does not give vLLM's answers."""
    import qva

    transposed = qva.load(setup["folders"]["run"], dtype=torch.float32)
    with torch.no_grad():
        transposed.audio_projector.weight.copy_(transposed.audio_projector.weight.T.clone())
    full = qva.load(setup["folders"]["run"], dtype=torch.float32)
    full.config = full.config.with_audio(full.config.audio, "full", full.config.audio_pool)
    full.processor.config = full.config
    for name in ("audio3", "image_audio"):
        theirs = offline["single"][name]
        assert qva_answer(transposed, setup["cases"][name])["tokens"] != theirs["tokens"]
        assert qva_answer(full, setup["cases"][name])["prompt"] != theirs["prompt"]


# -- over HTTP ----------------------------------------------------------------------------------------------
def part(kind: str, value) -> dict:
    if kind == "text":
        return {"type": "text", "text": value}
    data = base64.b64encode(Path(value).read_bytes()).decode()
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def post(url: str, messages: list[dict], timeout: float = 600) -> tuple[int, dict]:
    body = {"model": "qva-tiny", "temperature": 0, "max_tokens": N_TOKENS, "stop_token_ids": STOP,
            "return_token_ids": True, "skip_special_tokens": False,
            "messages": [{"role": m["role"], "content": [part(p["type"], p[p["type"]]) for p in m["content"]]} for m in messages]}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.parametrize("name", list(cases({k: Path(k) for k in ("picture", "audio3", "audio45")})))
def test_http_equals_qva(setup, server, name):
    status, body = post(server["url"], setup["cases"][name])
    assert status == 200, body
    ours = setup["qva"][name]
    assert body["prompt_token_ids"] == ours["prompt"]
    assert body["choices"][0]["token_ids"] == ours["tokens"]


def test_http_4_concurrent(setup, server):
    results: dict[int, tuple[int, dict]] = {}
    threads = [threading.Thread(target=lambda i=i, n=n: results.__setitem__(i, post(server["url"], setup["cases"][n])))
               for i, n in enumerate(BATCH)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, n in enumerate(BATCH):
        status, body = results[i]
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == setup["qva"][n]["tokens"], n


@pytest.mark.parametrize("bad", ["bad", "noise", "empty"])
def test_http_bad_audio_is_4xx(setup, server, bad):
    status, body = post(server["url"], user(("audio", setup["media"][bad]), ("text", "?")))
    assert 400 <= status < 500, (status, body)
    assert body["error"]["message"]
    status, _ = post(server["url"], user(("text", "still alive?")))
    assert status == 200


def test_print_startup(offline, server):
    print(f"vLLM start-up: offline LLM {offline['startup_s']:.1f} s, server {server['startup_s']:.1f} s; "
          f"logit max-abs diffs {DIFFS}")


if __name__ == "__main__":  # in the vLLM venv: vLLM spawns processes, so the entry is guarded
    if sys.argv[1:2] == ["offline"]:
        offline_main(*sys.argv[2:4])
    else:
        sys.exit("usage: python tests/test_vllm.py offline SPEC OUT")
