"""LoRA adapters in PEFT's layout (`qva/adapters.py`): a qva adapter loads into PEFT on transformers'
Qwen2-VL and back with the same logits; both key forms are read; bad adapters are clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import max_rel_err, prompt
from safetensors.torch import load_file, save_file

import qva
from qva.adapters import from_peft_name, save_adapter, to_peft_name
from qva.linear import LORA_TARGETS, add_lora, lora_linears
from weights_loader import CheckpointError

IDS = torch.tensor([prompt(9707, 11, 1879, 0, 358, 1079, 52, 53)])


@pytest.fixture(scope="module")
def adapted(train_dirs, tmp_path_factory):
    """A qva model with random LoRA factors on every LLM target, and its adapter folder."""
    _, qwen, _, _, _ = train_dirs
    model = qva.load(qwen)
    g = torch.Generator().manual_seed(9)
    for name, module in model.model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS:
            add_lora(module, 4, 8.0)
            with torch.no_grad():
                module.lora_A.weight.copy_(0.3 * torch.randn(module.lora_A.weight.shape, generator=g))
                module.lora_B.weight.copy_(0.3 * torch.randn(module.lora_B.weight.shape, generator=g))
    folder = save_adapter(model, tmp_path_factory.mktemp("adapter") / "a", base=qwen, projector=False)
    return model, folder


def hf_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS), mm_token_type_ids=torch.zeros_like(IDS)).logits


def test_names_both_ways():
    ours = "model.layers.3.mlp.down_proj.lora_B.weight"
    assert to_peft_name(ours) == "base_model.model.model.language_model.layers.3.mlp.down_proj.lora_B.weight"
    assert from_peft_name(to_peft_name(ours)) == ours
    assert from_peft_name("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight") == ours  # the older form
    assert from_peft_name("base_model.model.model.language_model.layers.3.mlp.down_proj.lora_B.default.weight") == ours


def test_qva_adapter_loads_into_peft_and_back(adapted, train_dirs, tmp_path):
    from peft import PeftModel

    model, folder = adapted
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and sorted(cfg["target_modules"]) == sorted(LORA_TARGETS)
    keys = list(load_file(str(folder / "adapter_model.safetensors")))
    assert len(keys) == 2 * 7 * 2 and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    with torch.no_grad():
        ours = model(IDS).logits
    loaded = qva.load(train_dirs[1], adapter=folder)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ours)
    peft = PeftModel.from_pretrained(copy.deepcopy(train_dirs[0]), str(folder)).eval()
    theirs = hf_logits(peft)
    base = hf_logits(train_dirs[0])
    assert max_rel_err(theirs, base) > 1e-2  # the adapter changes the model (PEFT did load it)
    assert max_rel_err(ours, theirs) <= 1e-5
    peft.save_pretrained(tmp_path / "back")
    back = qva.load(train_dirs[1], adapter=tmp_path / "back")
    with torch.no_grad():
        assert max_rel_err(back(IDS).logits, theirs) <= 1e-5


def test_older_key_form_and_default_infix_are_read(adapted, train_dirs, tmp_path):
    model, folder = adapted
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    for name, rewrite in (("old", lambda k: k.replace("model.language_model.layers.", "model.layers.")),
                          ("default", lambda k: k.replace(".weight", ".default.weight"))):
        (tmp_path / name).mkdir()
        save_file({rewrite(k): v for k, v in tensors.items()}, str(tmp_path / name / "adapter_model.safetensors"))
        (tmp_path / name / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
        with torch.no_grad():
            assert torch.equal(qva.load(train_dirs[1], adapter=tmp_path / name)(IDS).logits, model(IDS).logits)


def test_run_folder_loads_its_base_then_adapter(adapted, train_dirs, tmp_path):
    model, folder = adapted
    run = save_adapter(model, tmp_path / "run", base=train_dirs[1], projector=False)
    assert not (run / "config.json").exists()
    loaded = qva.load(run)  # base from base_model_name_or_path
    assert len(lora_linears(loaded)) == 14 and loaded.processor is not None


@pytest.mark.parametrize("edit,message", [
    (lambda c, t: ({**c, "peft_type": "IA3"}, t), "field 'peft_type' must be 'LORA'"),
    (lambda c, t: ({**c, "use_dora": True}, t), "unsupported adapter options {'use_dora': True}"),
    (lambda c, t: ({**c, "r": 0}, t), "field 'r' must be a positive number"),
    (lambda c, t: (c, {**t, "base_model.model.model.language_model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 64),
                         "base_model.model.model.language_model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(96, 4)}),
     "'model.layers.9.mlp.up_proj' is not a linear layer of this model"),
    (lambda c, t: (c, {**t, "base_model.model.lm_head.weight": torch.zeros(2, 2)}), "is not a LoRA factor"),
    (lambda c, t: (c, {k: (v[:, :3] if k.endswith("q_proj.lora_A.weight") else v) for k, v in t.items()}), "has shape [4, 3], expected [4, 64]"),
    (lambda c, t: ({**c, "base_model_name_or_path": None}, t), "no base_model_name_or_path"),
    (lambda c, t: (c, {k: (v * float("nan") if k.endswith("layers.0.self_attn.q_proj.lora_B.weight") else v) for k, v in t.items()}),
     "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight holds NaN or infinite values"),
    (lambda c, t: (c, {}), "holds no LoRA tensors"),
    (lambda c, t: ({**c, "target_modules": ["q_proj"]}, t), "are not in target_modules ['q_proj']"),
    (lambda c, t: ({**c, "target_modules": c["target_modules"] + ["fc9"]}, t),
     "target_modules names ['fc9'] but adapter_model.safetensors has no LoRA tensors for them"),
    (lambda c, t: ({**c, "target_modules": 7}, t), "field 'target_modules' must be a list of names or a regex, got 7"),
])
def test_bad_adapters_are_checkpoint_errors(adapted, train_dirs, tmp_path, edit, message):
    _, folder = adapted
    cfg, tensors = edit(json.loads((folder / "adapter_config.json").read_text()), load_file(str(folder / "adapter_model.safetensors")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "bad" / "adapter_model.safetensors"))
    assert not tensors or len(tensors) > 2  # the edits leave several factors: each refusal names the one that is wrong
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{").replace("}", r"\}")):
        qva.load(tmp_path / "bad") if "base_model_name_or_path" in message else qva.load(train_dirs[1], adapter=tmp_path / "bad")
