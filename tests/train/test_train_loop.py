"""Training (`qva/train/loop.py`): gradient parity with transformers + PEFT, what each stage moves,
accumulation, bit-exact resume, corrupted checkpoints, the trainable-set check, NaN stops, outputs, the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import Reference, max_rel_err, rel_l2, train_config

import qva
import qva.train.loop as loop
import qva.train.stages as stages
from qva.audio import load_audio, log_mel
from qva.linear import LORA_TARGETS, add_lora, lora_linears, set_policy
from qva.train.cli import main as train_cli
from qva.train.loop import TrainError, train
from weights_loader import Checkpoint

config = train_config


def tensors(folder) -> dict[str, torch.Tensor]:
    with Checkpoint(folder) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


@pytest.fixture(scope="module")
def stage1(train_dirs, tmp_path_factory):
    """A short stage-1 run: its config and output folder."""
    cfg = config(train_dirs, tmp_path_factory.mktemp("s1"), "1", steps=4)
    train(cfg, quiet=True)
    return cfg


# -- gradient parity ------------------------------------------------------------------------------------------
def test_gradient_parity_with_transformers_and_peft(family_train_dirs):
    """One step's loss and the projector + LoRA gradients equal transformers' Qwen2-VL (and Qwen2.5-VL) + WhisperEncoder +
    nn.Linear + masked_scatter with PEFT LoRA on the same targets and the same factors (fp32): the loss and
    the whole gradient (all 29 tensors as one vector) within 1e-5 relative. Single tensors are held to 3e-5
    relative L2: fp32 summation order alone moves the deepest ones by 1–2e-5 on AVX-512 kernels (measured),
    against ~1e-3 or more for any real mismatch (a wrong LoRA scale, a dropped projector row)."""
    import copy

    from peft import LoraConfig, get_peft_model

    train_dirs = family_train_dirs
    ref_qwen, qwen, ref_whisper, whisper, _ = train_dirs
    model = qva.load(qwen, whisper=whisper, seed=0).train()
    g = torch.Generator().manual_seed(5)
    for lin in lora_linears_after(model, rank=4, alpha=8.0).values():
        with torch.no_grad():  # B ≠ 0 so that A's gradient is not trivially zero
            lin.lora_A.weight.copy_(0.3 * torch.randn(lin.lora_A.weight.shape, generator=g))
            lin.lora_B.weight.copy_(0.3 * torch.randn(lin.lora_B.weight.shape, generator=g))
    ref_llm = copy.deepcopy(ref_qwen)
    peft = get_peft_model(ref_llm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LORA_TARGETS)))
    ref_params = dict(peft.named_parameters())
    for name, lin in lora_linears(model).items():
        hf = "base_model.model." + name.replace("model.layers.", "model.language_model.layers.", 1)
        with torch.no_grad():
            ref_params[f"{hf}.lora_A.default.weight"].copy_(lin.lora_A.weight)
            ref_params[f"{hf}.lora_B.default.weight"].copy_(lin.lora_B.weight)
    ref = Reference(ref_llm, ref_whisper, model.audio_projector.weight.detach())
    ref.proj.weight.requires_grad_(True)

    feats, valid = log_mel([load_audio(train_dirs[4].parent / "clips" / "3.wav")], 80)
    n_audio = (int(valid[0]) + 1) // 2
    ids = torch.tensor([[151644, 872, 198, 151657] + [151659] * n_audio + [151658, 87, 151645, 198, 151644, 77091, 198, 52, 54, 151645]])
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]

    out = model(ids, input_features=feats, audio_valid_frames=valid, labels=labels)
    out.loss.backward()
    want = ref.loss(labels, ids, feats=feats, valid=valid.tolist())
    want.backward()
    assert out.n_labels == 3 and abs(out.loss.item() - want.item()) <= 1e-5 * abs(want.item())
    grads = {"audio_projector.weight": (model.audio_projector.weight.grad, ref.proj.weight.grad)}
    for name, lin in lora_linears(model).items():
        hf = "base_model.model." + name.replace("model.layers.", "model.language_model.layers.", 1)
        for part in ("A", "B"):
            grads[f"{name}.lora_{part}"] = (getattr(lin, f"lora_{part}").weight.grad, ref_params[f"{hf}.lora_{part}.default.weight"].grad)
    assert len(grads) == 1 + 2 * 7 * 2
    for name, (ours, theirs) in grads.items():
        assert theirs.abs().max() > 0, name
        assert rel_l2(ours, theirs) <= 3e-5, name
    ours, theirs = (torch.cat([g[i].flatten() for g in grads.values()]) for i in (0, 1))
    print(f"{model.config.family}: whole-gradient relative L2 {rel_l2(ours, theirs):.2e}, loss {abs(out.loss.item() - want.item()):.1e} apart")
    # the tiny Qwen2.5-VL's fp32 gradient is itself 1.6e-5 from a float64 reference's (measured; Qwen2-VL's 0.9e-5);
    # Qwen3-VL's is held to the same bound as Qwen2.5-VL's
    assert rel_l2(ours, theirs) <= (1e-5 if model.config.family == "qwen2_vl" else 2e-5)


def lora_linears_after(model, rank, alpha):
    for name, module in model.model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS:
            add_lora(module, rank, alpha)
    return lora_linears(model)


# -- what each stage moves -------------------------------------------------------------------------------------
def test_stage1_moves_only_the_projector(stage1, train_dirs):
    _, qwen, _, whisper, _ = train_dirs
    before = qva.load(qwen, whisper=whisper, seed=0)
    after = tensors(stage1.out)
    start = {n: t for n, t in before.state_dict().items() if n != "lm_head.weight"}
    assert set(after) == set(start)
    moved = [n for n in start if not torch.equal(after[n].to(start[n].dtype), start[n])]
    assert moved == ["audio_projector.weight"]
    assert after["audio_projector.weight"].dtype == torch.float32
    assert qva.load(stage1.out).audio_projector.weight.shape == start["audio_projector.weight"].shape  # qva.load restores it


def test_stage2_moves_only_projector_and_lora(stage1, train_dirs, tmp_path):
    cfg = config(train_dirs, tmp_path, "2", model=stage1.out, steps=3)
    train(cfg, quiet=True)
    base, trained = qva.load(stage1.out), qva.load(cfg.out)  # the run folder: base + projector + adapter
    lora = lora_linears(trained)
    assert len(lora) == 7 * trained.config.text.num_hidden_layers
    moved = []
    base_sd = base.state_dict()
    for name, t in trained.state_dict().items():
        if ".lora_" in name:
            continue
        if not torch.equal(t, base_sd[name]):
            moved.append(name)
    assert moved == ["audio_projector.weight"]
    assert all(lin.lora_B.weight.abs().sum() > 0 for lin in lora.values())  # B left zero: they trained
    files = sorted(p.name for p in (tmp_path / "run2").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "audio_projector.safetensors", "train_config.json"} <= set(files)


def test_stage_lm_trains_the_llm_with_frozen_embeddings(train_dirs, tmp_path):
    cfg = config(train_dirs, tmp_path, "lm", steps=2, freeze=("embeddings",), whisper=None,
                 train_data=str(text_manifest(tmp_path)))
    train(cfg, quiet=True)
    before, after = tensors(train_dirs[1]), tensors(cfg.out)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    moved = [n for n in after if n.startswith("model.layers.") and not torch.equal(after[n], before[n])]
    assert len(moved) == len([n for n in after if n.startswith("model.layers.")]) > 0
    assert all(torch.equal(after[n], before[n]) for n in after if n.startswith("visual."))


def text_manifest(tmp_path):
    path = tmp_path / "text.jsonl"
    with open(path, "w") as f:
        for words, digits in (("four two", "42"), ("seven", "7"), ("three one five", "315"), ("eight", "8")):
            f.write(json.dumps({"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": digits}]}) + "\n")
    return path


def test_trainable_table_and_refusal_of_a_wrong_set(train_dirs, tmp_path, monkeypatch, capsys):
    real = stages.freeze_for_stage

    def leaky(model, cfg):
        real(model, cfg)
        model.visual.blocks[0].attn.qkv.weight.requires_grad_(True)

    monkeypatch.setattr(stages, "freeze_for_stage", leaky)
    with pytest.raises(TrainError, match=r"stage 1: the trainable set differs .*visual.blocks.0.attn.qkv.weight"):
        train(config(train_dirs, tmp_path), quiet=True)
    monkeypatch.setattr(stages, "freeze_for_stage", real)
    model = loop.build_model(config(train_dirs, tmp_path, "2", model=str(train_dirs[1]), whisper=str(train_dirs[3])))
    table = loop.trainable_table(model)
    assert "LoRA" in table and "projector" in table and "model.layers.0.self_attn.q_proj.lora_A.weight" in table
    assert [line.split()[1] for line in table.splitlines() if line.startswith(("vision", "LLM", "whisper"))] == ["0", "0", "0"]


# -- accumulation, resume, corruption, NaN ----------------------------------------------------------------------
def final_trainable(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(sorted((out / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))


def stage2_with_samples(train_dirs, tmp_path, n: int, dtype=torch.float32):
    """A stage-2 model (LoRA B ≠ 0, so every factor gets a gradient) in `dtype`, its config, the first `n`
    samples encoded with their audio rows, and the trainable parameters by name."""
    from qva.train.data import encode_all, fill_audio_rows, read_manifest

    cfg = config(train_dirs, tmp_path, "2", model=str(train_dirs[1]), whisper=str(train_dirs[3]))
    model = loop.build_model(cfg).train()
    examples, _ = read_manifest(cfg.train_data, cfg.prompt)
    samples, _ = encode_all(examples[:n], model.processor, 4096)
    fill_audio_rows(model, samples, None)
    params = loop.check_trainable(model, cfg)
    with torch.no_grad():
        for lin in lora_linears(model).values():
            lin.lora_B.weight.normal_(std=0.2)
    model.to(dtype)
    for s in samples:
        s.audio_rows = s.audio_rows.to(dtype)
    return cfg, model, samples, params


def test_batch_4_equals_batch_1_with_accumulation_4(train_dirs, tmp_path):
    """The same 4 samples as one batch or as 4 accumulated micro-batches: the same loss and gradients (≤ 1e-6).
    The gradients are compared in float64: in fp32 the padded batch's other matrix shapes alone move this tiny
    model's deepest gradients by up to 7e-6 of their largest entry on AVX-512 kernels (measured), which would
    hide a normalisation error of that size; whole fp32 runs are compared by their step losses below."""
    from qva.train.data import collate

    cfg, model, samples, params = stage2_with_samples(train_dirs, tmp_path, 4, torch.float64)

    def grads(split):
        model.zero_grad(set_to_none=True)
        loss = loop.accumulate(model, [collate(part, model.processor.pad_token_id) for part in split])
        return loss, {n: p.grad.clone() for n, p in params.items()}

    (la, ga), (lb, gb) = grads([samples]), grads([[s] for s in samples])
    assert abs(la - lb) <= 1e-6 * abs(la)
    worst = max(max_rel_err(ga[n] / gb[n].abs().max(), gb[n] / gb[n].abs().max()) for n in ga)
    assert len(ga) == 1 + 2 * 7 * 2 and worst <= 1e-6, worst
    # and through whole runs: the same step losses
    a = replace(cfg, batch_size=4, grad_accum=1, steps=2, out=str(tmp_path / "a"))
    b = replace(a, batch_size=1, grad_accum=4, out=str(tmp_path / "b"))
    train(a, quiet=True), train(b, quiet=True)
    for x, y in zip(losses(tmp_path / "a"), losses(tmp_path / "b"), strict=True):
        assert abs(x - y) <= 1e-6 * abs(x)


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]


def test_resume_is_bit_exact(train_dirs, tmp_path, monkeypatch):
    whole = config(train_dirs, tmp_path, "2", model=str(train_dirs[1]), whisper=str(train_dirs[3]), steps=6, save_every=3,
                   lora_dropout=0.1, out=str(tmp_path / "whole"), keep_last=3)
    train(whole, quiet=True)
    cut = replace(whole, out=str(tmp_path / "cut"))
    real = loop.lr_factor

    def stop_at_4(step, total, cfg):
        if step == 3:
            raise KeyboardInterrupt  # killed after step 3's checkpoint
        return real(step, total, cfg)

    monkeypatch.setattr(loop, "lr_factor", stop_at_4)
    with pytest.raises(KeyboardInterrupt):
        train(cut, quiet=True)
    monkeypatch.setattr(loop, "lr_factor", real)
    train(replace(cut, resume=True), quiet=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # 3 before the cut + 3 after, bit for bit
    a, b = final_trainable(tmp_path / "whole"), final_trainable(tmp_path / "cut")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_corrupted_last_checkpoint_falls_back_to_the_previous(train_dirs, tmp_path, monkeypatch):
    cfg = config(train_dirs, tmp_path, "1", steps=4, save_every=2, out=str(tmp_path / "r"))
    train(cfg, quiet=True)
    last = tmp_path / "r" / "checkpoints" / "step-00000004" / "trainable.safetensors"
    data = bytearray(last.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the weights
    last.write_bytes(bytes(data))
    logs = []
    monkeypatch.setattr(loop.Log, "__call__", lambda self, text: logs.append(text))
    summary = train(replace(cfg, steps=5, resume=True))
    assert any("step-00000004 is corrupted" in line for line in logs)
    assert any("resumed from" in line and "step-00000002" in line for line in logs)
    assert summary["steps"] == 5


def test_nan_loss_stops_naming_the_step_and_saves_nothing(train_dirs, tmp_path, monkeypatch):
    cfg = config(train_dirs, tmp_path, "1", steps=4, save_every=1, out=str(tmp_path / "n"))
    real = qva.model.QVAModel.labelled_loss
    calls = []

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) >= 3:  # one forward per step: step 3's loss is NaN
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(qva.model.QVAModel, "labelled_loss", poisoned)
    with pytest.raises(TrainError, match=r"step 3: the loss is nan; stopped without saving"):
        train(cfg, quiet=True)
    saved = sorted(p.name for p in (tmp_path / "n" / "checkpoints").glob("step-*"))
    assert saved == ["step-00000001", "step-00000002"]
    assert not (tmp_path / "n" / "config.json").exists()  # no output written from a diverged run
    state = json.loads((tmp_path / "n" / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["step"] == 2 and all(math.isfinite(x) for x in losses(tmp_path / "n"))


def test_bf16_stored_training_step_keeps_no_fp32_weight_copies(train_dirs):
    """A stage-2 step over bf16-stored weights (fp32 compute): autograd saves no fp32 copy of any weight."""
    _, qwen, _, whisper, _ = train_dirs
    model = qva.load(qwen, whisper=whisper, dtype=torch.bfloat16)
    lora_linears_after(model, 4, 8.0)
    model.audio_projector.float()
    model.requires_grad_(False)
    for lin in lora_linears(model).values():
        lin.lora_A.requires_grad_(True)
        lin.lora_B.requires_grad_(True)
    model.audio_projector.requires_grad_(True)
    shapes = {s for n, p in model.named_parameters() if p.dim() == 2 and ".lora_" not in n for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    feats, valid = log_mel([torch.randn(9000) * 0.1], 80)  # 29 audio tokens: 36 in all, no weight's dimension
    ids = torch.tensor([[151644, 151657] + [151659] * 29 + [151658, 151645, 151644, 52, 151645]])
    labels = torch.full_like(ids, -100)
    labels[0, -2:] = ids[0, -2:]
    saved = []
    set_policy("float32")
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = model(ids, input_features=feats, audio_valid_frames=valid, labels=labels)
        out.loss.backward()
    finally:
        set_policy(None)
    fp32_copies = [t for t in saved if t.dtype == torch.float32 and tuple(t.shape) in shapes]
    assert not fp32_copies, [tuple(t.shape) for t in fp32_copies]
    assert all(lin.lora_A.weight.grad is not None for lin in lora_linears(model).values())


# -- output, evaluation, CLI ----------------------------------------------------------------------------------------
def test_eval_and_merge_cli(stage1, train_dirs, tmp_path, capsys):
    cfg = config(train_dirs, tmp_path, "2", model=stage1.out, steps=2, eval_data=str(train_dirs[4]), eval_limit=4)
    train(cfg, quiet=True)
    assert train_cli(["eval", cfg.out, "--data", str(train_dirs[4]), "--json", "--limit", "4", "--cache", "none"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"exact_match", "wer", "cer", "wer_plain", "n"} and result["n"] == 4
    assert train_cli(["merge", cfg.out, "--out", str(tmp_path / "merged")]) == 0
    merged, adapted = qva.load(tmp_path / "merged"), qva.load(cfg.out)
    assert not lora_linears(merged)
    ids = torch.tensor([[151644, 872, 198, 52, 53, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        assert max_rel_err(merged(ids).logits, adapted(ids).logits) <= 1e-5
    metrics = [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert any("exact_match" in m and "eval_loss" in m for m in metrics) and any("tokens_per_s" in m for m in metrics)


@pytest.mark.parametrize("args,message", [
    (["--stage", "1", "--model", "{qwen}", "--train", "{tmp}/missing.jsonl", "--out", "{tmp}/o", "--steps", "1", "--whisper", "{whisper}"],
     "missing.jsonl: no such manifest"),
    (["--stage", "2", "--model", "{qwen}", "--train", "{manifest}", "--out", "{tmp}/o", "--steps", "1"],
     "stage 2 trains the audio projector: give --whisper"),
    (["--stage", "1", "--model", "{qwen}", "--train", "{manifest}", "--out", "{tmp}/o", "--steps", "1"],
     "stage 1 trains the audio projector: give --whisper"),
    (["--stage", "1", "--model", "{tmp}/nope", "--train", "{manifest}", "--out", "{tmp}/o", "--steps", "1"], "no config.json"),
    (["--stage", "lm", "--model", "{qwen}", "--train", "{manifest}", "--out", "{tmp}/o", "--steps", "1", "--batch-size", "0"],
     "batch_size must be ≥ 1"),
    (["--stage", "lm", "--model", "{qwen}", "--train", "{manifest}", "--out", "{tmp}/o", "--steps", "1", "--lr", "nan"],
     "lr must be a positive number"),
    (["--stage", "1", "--model", "{qwen}", "--whisper", "{whisper}", "--train", "{manifest}", "--out", "{tmp}/o", "--steps", "1",
      "--noise-snr", "5"], "--noise-snr takes LO,HI"),
    (["eval", "{tmp}/nope", "--data", "{manifest}"], "no config.json"),
    (["merge", "{qwen}", "--out", "{tmp}/m"], "no LoRA adapter to merge"),
])
def test_cli_errors_are_one_line(train_dirs, tmp_path, capsys, args, message):
    _, qwen, _, whisper, manifest = train_dirs
    args = [a.format(qwen=qwen, whisper=whisper, manifest=manifest, tmp=tmp_path) for a in args]
    assert train_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qva-train: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_activation_checkpointing_gives_the_same_gradients(train_dirs, tmp_path):
    from qva.train.data import collate

    _, model, samples, params = stage2_with_samples(train_dirs, tmp_path, 3)
    batch = collate(samples, model.processor.pad_token_id)
    results = []
    for on in (False, True):
        model.model.checkpoint_layers = on
        model.zero_grad(set_to_none=True)
        loss = loop.accumulate(model, [batch])
        results.append((loss, {n: p.grad.clone() for n, p in params.items()}))
    (l0, g0), (l1, g1) = results
    assert l0 == l1 and all(torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7) for n in g0)


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "qva.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--stage" in out.stdout and "qva-train eval" in out.stdout


def test_qlora_stage2_trains_over_nf4_and_its_adapter_applies_to_the_unquantized_base(stage1, train_dirs, tmp_path):
    from qva.linear import NF4Linear

    cfg = config(train_dirs, tmp_path, "2", model=stage1.out, steps=3, qlora=True)
    model = loop.build_model(cfg)
    nf4 = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 7 * model.config.text.num_hidden_layers and all(n.startswith("model.layers.") for n in nf4)
    assert all(isinstance(m, NF4Linear) for m in lora_linears(model).values())
    train(cfg, quiet=True)
    qlora_model = qva.load(stage1.out, adapter=cfg.out, quantize="nf4")  # as trained
    bf16 = qva.load(cfg.out)  # the adapter over the unquantized base
    assert train_cli(["merge", cfg.out, "--out", str(tmp_path / "merged")]) == 0
    merged = qva.load(tmp_path / "merged")
    ids = torch.tensor([[151644, 872, 198, 52, 53, 54, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        q, b, m = qlora_model(ids).logits, bf16(ids).logits, merged(ids).logits
        base_q, base = qva.load(stage1.out, quantize="nf4")(ids).logits, qva.load(stage1.out)(ids).logits
    assert max_rel_err(m, b) <= 1e-5  # merging changes nothing
    rel = ((m - q).norm() / q.norm()).item()
    base_rel = ((base - base_q).norm() / base_q.norm()).item()
    print(f"merged vs QLoRA logits: relative L2 {rel:.4f}; the NF4 base alone vs unquantized: {base_rel:.4f}")
    assert 0 < rel <= 1.5 * base_rel  # the difference is the base's NF4 rounding, not the adapter


def test_augmented_training_runs_and_is_seeded(train_dirs, tmp_path):
    from qva.train.augment import AugmentConfig

    aug = AugmentConfig(speeds=(0.9, 1.1), noise_snr=(10.0, 20.0), noise_prob=1.0, time_masks=1, freq_masks=1)
    a = config(train_dirs, tmp_path, "1", steps=2, augment=aug, out=str(tmp_path / "a"))
    b = replace(a, out=str(tmp_path / "b"))
    plain = replace(a, augment=AugmentConfig(), out=str(tmp_path / "plain"))
    la, lb, lp = (train(c, quiet=True)["loss"] for c in (a, b, plain))
    assert math.isfinite(la) and la == lb  # the same seed draws the same augmentations
    assert la != lp  # and they change what the model hears
    with pytest.raises(TrainError, match="not with --fsdp"):
        train(replace(a, fsdp=True), quiet=True)


def test_row_masks_train_from_the_cached_rows_and_are_seeded(train_dirs, tmp_path, monkeypatch):
    from qva.model import QVAModel
    from qva.train.augment import AugmentConfig

    rows = AugmentConfig(row_masks=2, row_mask_width=3)
    a = config(train_dirs, tmp_path, "1", steps=2, augment=rows, out=str(tmp_path / "a"), rows_cache=str(tmp_path / "cache"))
    plain = replace(a, augment=AugmentConfig(), out=str(tmp_path / "plain"))
    lp = train(plain, quiet=True)["loss"]  # fills the cache
    encoded = []
    encoder_rows = QVAModel.audio_encoder_rows
    monkeypatch.setattr(QVAModel, "audio_encoder_rows", lambda self, *a, **k: encoded.append(1) or encoder_rows(self, *a, **k))
    la = train(a, quiet=True)["loss"]
    lb = train(replace(a, out=str(tmp_path / "b")), quiet=True)["loss"]
    assert not encoded  # every clip's rows came from the cache: masks cost no encoder pass
    assert math.isfinite(la) and la == lb and la != lp
    with pytest.raises(TrainError, match="--row-masks masks the cached encoder rows"):
        replace(a, stream=True).check()
