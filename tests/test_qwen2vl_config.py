"""Config: the Hub's flat v4 layout and transformers 5's nested layout read to the same values."""

from __future__ import annotations

import json

import pytest
from conftest import QWEN_TOKENIZER, need_shared, tiny_qwen2vl

from qva.qwen2vl_config import Qwen2VLConfig
from weights_loader import CheckpointError

REAL_2B = QWEN_TOKENIZER / "config_Qwen2-VL-2B-Instruct.json"


@need_shared(REAL_2B)
def test_real_2b_flat_config():
    cfg = Qwen2VLConfig.from_dict(json.loads(REAL_2B.read_text()))
    t, v = cfg.text, cfg.vision
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (151936, 1536, 28, 12, 2)
    assert (t.rms_norm_eps, t.rope_theta, t.mrope_section) == (1e-6, 1e6, [16, 24, 24])
    assert cfg.tie_word_embeddings is True
    assert (v.depth, v.embed_dim, v.num_heads, v.in_channels, v.hidden_size, v.patch_dim) == (32, 1280, 16, 3, 1536, 1176)


def test_flat_and_nested_layouts_agree(tmp_path):
    tiny_qwen2vl(tie=False).save_pretrained(tmp_path)  # transformers 5: nested text_config + rope_parameters
    nested = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in nested and "in_channels" in nested["vision_config"]
    a = Qwen2VLConfig.from_dict(nested)
    b = Qwen2VLConfig.from_dict(a.to_dict())  # written back flat, Hub style
    assert "text_config" not in a.to_dict() and a.to_dict()["vision_config"]["in_chans"] == 3
    assert (a.text, a.vision, a.tie_word_embeddings) == (b.text, b.vision, b.tie_word_embeddings)
    assert a.text.rms_norm_eps == 1e-6 and a.tie_word_embeddings is False and a.text.mrope_section == [2, 3, 3]


def test_clear_errors():
    base = json.loads(REAL_2B.read_text()) if REAL_2B.exists() else None
    if base is None:
        pytest.skip("needs ../shared")
    with pytest.raises(CheckpointError, match="'qwen2_5_vl' is not supported"):
        Qwen2VLConfig.from_dict({**base, "model_type": "qwen2_5_vl"})
    with pytest.raises(CheckpointError, match="missing 'rms_norm_eps'"):
        Qwen2VLConfig.from_dict({k: v for k, v in base.items() if k != "rms_norm_eps"})
    with pytest.raises(CheckpointError, match="mrope_section"):
        Qwen2VLConfig.from_dict({**base, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 23]}})
