"""Weight-only int8 / int4 (and NF4) models through the one door to files (`qva/pretrained.py`): quantized at
load from a bf16 checkpoint, saved with a `quantization_config`, loaded back without the original weights,
LoRA adapters on top, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rel_l2

import qva
from qva import linear as L
from qva.linear import measure
from weights_loader import CheckpointError


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QVA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(measure, "_choices", None)
    yield
    measure._choices = None


def prompt_ids() -> torch.Tensor:
    return torch.randint(0, 151000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt,bound", [("int8", 0.05), ("int4", 0.5), ("nf4", 0.5), ("w8a8", 0.08)])
def test_quantized_at_load_close_to_bf16_and_round_trips(demo_dirs, tmp_path, fmt, bound):
    qwen, whisper = demo_dirs
    ref = qva.load(qwen, whisper=whisper, dtype=torch.float32)
    model = qva.load(qwen, whisper=whisper, dtype=torch.float32, quantize=fmt, quantize_modules=("llm", "whisper"))
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.startswith(("model.layers.", "audio_encoder.layers."))}
    assert L.QUANTIZED_LINEARS[fmt].__name__ in kinds
    assert all(type(m) is not L.QUANTIZED_LINEARS[fmt] for n, m in model.named_modules() if n.startswith("visual."))
    ids = prompt_ids()
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    rel = rel_l2(got, want)
    print(f"{fmt}: logits relative L2 against fp32 {rel:.4f}")
    assert 0 < rel < bound

    qva.save(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == fmt and cfg["quantization_config"]["modules"] == ["llm", "whisper"]
    back = qva.load(tmp_path / "q")  # no original weights needed
    with torch.no_grad():
        assert torch.equal(back(ids).logits, got)
    with pytest.raises(ValueError, match="already quantized"):
        qva.load(tmp_path / "q", quantize="int8")
    # loaded in another dtype: the parameters follow it, the quantized buffers (codes, scales) stay as stored
    other = qva.load(tmp_path / "q", dtype=torch.bfloat16)
    stored, loaded = back.state_dict(), other.state_dict()
    buffers = {n for n, _ in back.named_buffers()}
    assert buffers and all(torch.equal(loaded[n], stored[n]) for n in buffers)
    assert other.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt,bound", [("int8", 0.02), ("int4", 0.3), ("w8a8", 0.04)])
def test_quantized_head_of_tied_embeddings(demo_dirs, tmp_path, fmt, bound):
    """quantize_modules "head": the tied head becomes a quantized copy while the embedding keeps the load dtype;
    the logits move (the head really is quantized) but stay close; generation and save → load keep it."""
    qwen, _ = demo_dirs
    ref = qva.load(qwen, dtype=torch.float32)
    body = qva.load(qwen, dtype=torch.float32, quantize=fmt)
    model = qva.load(qwen, dtype=torch.float32, quantize=fmt, quantize_modules=("llm", "head"))
    assert ref.config.tie_word_embeddings and type(model.lm_head) is L.QUANTIZED_LINEARS[fmt] and type(body.lm_head) is L.Linear
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight) and model.dtype == torch.float32
    ids = prompt_ids()
    with torch.no_grad():
        want, plain, got = ref(ids).logits, body(ids).logits, model(ids).logits
    head_err = rel_l2(got, plain)  # the head's own error: the same quantized body on both sides
    print(f"{fmt} head: logits relative L2 against the bf16 head {head_err:.4f}, against fp32 {rel_l2(got, want):.4f}")
    assert 0 < head_err < bound and rel_l2(got, want) < 2 * bound
    with torch.inference_mode():
        assert model.generate(input_ids=ids[:1], max_new_tokens=4, eos_token_id=[]).shape == (1, 28)
    qva.save(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["modules"] == ["head", "llm"]
    back = qva.load(tmp_path / "q")
    assert type(back.lm_head) is L.QUANTIZED_LINEARS[fmt]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, got)


def test_w8a8_stores_int8_weights_and_rounds_one_row_activations(demo_dirs):
    """w8a8 holds int8's very buffers; a prompt (many rows) gives int8's logits exactly, a one-token step (one row
    at every linear, as decoding at batch 1) differs from int8's by the activations' rounding alone."""
    qwen, _ = demo_dirs
    ref = qva.load(qwen, dtype=torch.float32)
    int8, w8a8 = (qva.load(qwen, dtype=torch.float32, quantize=f, quantize_modules=("llm", "head")) for f in ("int8", "w8a8"))
    a, b = int8.state_dict(), w8a8.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = prompt_ids()
    step = ids[:1, :1]
    with torch.no_grad():
        assert torch.equal(int8(ids).logits, w8a8(ids).logits)
        want, got8, got = ref(step).logits, int8(step).logits, w8a8(step).logits
    print(f"one-row logits relative L2 against fp32: int8 {rel_l2(got8, want):.4f}, w8a8 {rel_l2(got, want):.4f}")
    assert rel_l2(got8, want) < rel_l2(got, want) < 0.08 and rel_l2(got, got8) > 1e-3


@pytest.mark.parametrize("fmt,kernel", [("w8a8", "fbgemm"), ("w8a8", "dequant"), ("int8", "aten"), ("int4", "aten")])
def test_compiled_decode_runs_the_measured_kernel(fmt, kernel, demo_dirs, fresh_dynamo, kernel_cache, monkeypatch):
    """The compiled step runs the kernel chosen before tracing (here forced): w8a8's fbgemm custom op (each weight
    packed once, not once a step) or `dequant` (the same rounding in floating point), int8's aten kernel (no weight
    dequantized in the graph), int4's aten kernel as the custom op `qva::int4_rows` (every int4 linear, every
    step); the greedy tokens equal eager's."""
    from qva.linear import int8_activations, weight_only

    if kernel == "fbgemm" and not int8_activations.fbgemm_available():
        pytest.skip("this PyTorch build has no fbgemm dynamic linear")
    if fmt == "int4" and not L.int4_kernel_available():
        pytest.skip("this PyTorch build has no CPU int4 kernel: int4 dequantizes, compiled or not")
    monkeypatch.setenv(L.KERNEL_OVERRIDE, kernel)
    qwen, _ = demo_dirs
    model = qva.load(qwen, dtype=torch.float32, quantize=fmt, quantize_modules=("llm", "head"), group_size=32)
    int4_calls = []
    eager_int4 = weight_only.int4_rows_eager
    monkeypatch.setattr(weight_only, "int4_rows_eager", lambda *a: int4_calls.append(1) or eager_int4(*a))
    ids = prompt_ids()[:1, :12]
    packs, calls, dequantized = [], [], []
    pack, row = int8_activations.fbgemm_pack, int8_activations.packed_weight
    monkeypatch.setattr(int8_activations, "fbgemm_pack", lambda *a: packs.append(1) or pack(*a))
    monkeypatch.setattr(int8_activations, "packed_weight", lambda *a: calls.append(1) or row(*a))
    cast = weight_only.cast_weight  # int8's dequantizing form's weight, traced into a graph that takes it
    monkeypatch.setattr(weight_only, "cast_weight", lambda *a: dequantized.append(1) or cast(*a))
    with torch.inference_mode():
        eager = model.generate(input_ids=ids, max_new_tokens=8, eos_token_id=[])
        eager_calls, eager_int4_calls = len(calls), len(int4_calls)
        compiled = model.generate(input_ids=ids, max_new_tokens=8, eos_token_id=[], compile=True)
    assert compiled.tolist() == eager.tolist()
    linears = sum(isinstance(m, L.Int8Linear | L.Int4Linear) for m in model.modules())
    if fmt == "int4":  # every int4 linear on the kernel: 8 steps eagerly (the prompt included), 7 compiled ones
        assert linears and eager_int4_calls >= 8 * linears and len(int4_calls) - eager_int4_calls >= 7 * linears, (
            linears, eager_int4_calls, len(int4_calls))
    if kernel == "fbgemm":  # 7 one-row steps through every linear, eager and then in the graph; one packing a weight
        assert eager_calls >= 7 * linears and len(calls) - eager_calls >= 7 * linears and len(packs) == linears, (eager_calls, len(calls), len(packs))
    else:
        assert not calls and not packs
    if kernel == "aten":
        assert not dequantized


def test_resident_bytes_of_the_llm_linears(demo_dirs):
    """bf16 → int8 0.5× (+ a bf16 scale a row: 3% at these 64-wide rows, 0.1% at the 2B's 1536), int4 (g64) 0.28×."""
    qwen, _ = demo_dirs
    sizes = {}
    for fmt in (None, "int8", "int4"):
        model = qva.load(qwen, dtype=torch.bfloat16, quantize=fmt, group_size=64)
        linears = [m for n, m in model.named_modules()
                   if n.startswith("model.layers.") and n.endswith(("gate_proj", "up_proj", "down_proj", "o_proj", "q_proj"))]
        sizes[fmt] = sum(t.numel() * t.element_size() for m in linears for n, t in m.state_dict().items() if "bias" not in n)
    print({k: v / sizes[None] for k, v in sizes.items()})
    assert sizes["int8"] / sizes[None] <= 0.5 + 1 / 64 and sizes["int4"] / sizes[None] <= 0.29


def test_adapter_applies_over_an_int8_base(demo_dirs, tmp_path):
    from qva.adapters import save_adapter
    from qva.linear import add_lora, lora_linears

    qwen, _ = demo_dirs
    model = qva.load(qwen, dtype=torch.float32)
    for name, m in model.model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            add_lora(m, 4, 8.0)
    with torch.no_grad():
        for lin in lora_linears(model).values():
            lin.lora_B.weight.normal_(std=0.5)
    save_adapter(model, tmp_path / "adapter", str(qwen), projector=False)
    ids = prompt_ids()
    plain = qva.load(qwen, dtype=torch.float32, quantize="int8")
    adapted = qva.load(qwen, dtype=torch.float32, quantize="int8", adapter=tmp_path / "adapter")
    assert len(lora_linears(adapted)) == len(lora_linears(model)) > 0
    with torch.no_grad():
        a, b, want = plain(ids).logits, adapted(ids).logits, model(ids).logits
    assert rel_l2(b, want) < 0.05 < rel_l2(a, want)  # the adapter moved the int8 model to the adapted one


@pytest.mark.parametrize("kwargs,match", [
    (dict(quantize="int3"), "quantize must be one of"),
    (dict(quantize="int4", group_size=48), "group_size must be one of"),
    (dict(quantize="int8", quantize_modules=("llm", "eyes")), "quantize_modules takes"),
])
def test_bad_quantize_arguments(demo_dirs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        qva.load(demo_dirs[0], **kwargs)


def test_bad_quantization_config_names_the_file(demo_dirs, tmp_path):
    from conftest import broken_copy

    cfg = json.loads((demo_dirs[0] / "config.json").read_text())
    bad = broken_copy(demo_dirs[0], tmp_path / "bad", config__json=cfg | {"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(CheckpointError, match=r"config.json: quantization_config"):
        qva.load(bad)
