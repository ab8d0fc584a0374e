"""Config: the Hub's flat v4 layout and transformers 5's nested layout read to the same values."""

from __future__ import annotations

import json

import pytest
from conftest import QWEN_TOKENIZER, need_shared, tiny_qwen2vl

from qva.demo import tiny_qwen2vl_config
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
    with pytest.raises(CheckpointError, match="'qwen3_vl_moe' is not supported"):
        Qwen2VLConfig.from_dict({**base, "model_type": "qwen3_vl_moe"})
    with pytest.raises(CheckpointError, match="field 'vision_config.intermediate_size' is missing"):  # Qwen2-VL's fields, 2.5's name
        Qwen2VLConfig.from_dict({**base, "model_type": "qwen2_5_vl"})
    with pytest.raises(CheckpointError, match="field 'rms_norm_eps' is missing"):
        Qwen2VLConfig.from_dict({k: v for k, v in base.items() if k != "rms_norm_eps"})
    with pytest.raises(CheckpointError, match="mrope_section"):
        Qwen2VLConfig.from_dict({**base, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 23]}})


# -- every field checked at load: (field path, value or DELETE, what the message must say) ----------------
DELETE = object()


def edited(cfg: dict, path: str, value) -> dict:
    out = json.loads(json.dumps(cfg))
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return out


def graft_config() -> dict:
    from qva.whisper_encoder import WhisperEncoderConfig

    whisper = WhisperEncoderConfig(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
    return Qwen2VLConfig.from_dict(tiny_qwen2vl_config()).with_audio(whisper).to_dict()


BAD_FIELDS = [
    ("hidden_size", "64", "field 'hidden_size' must be an integer, got '64' (str)"),
    ("num_hidden_layers", 2.0, "field 'num_hidden_layers' must be an integer, got 2.0 (float)"),
    ("num_hidden_layers", True, "field 'num_hidden_layers' must be an integer, got True (bool)"),
    ("num_attention_heads", 0, "field 'num_attention_heads' must be ≥ 1, got 0"),
    ("num_attention_heads", 3, "field 'num_attention_heads' must divide hidden_size 64"),
    ("num_key_value_heads", 3, "field 'num_key_value_heads' must divide num_attention_heads 4"),
    ("vocab_size", -5, "field 'vocab_size' must be ≥ 1, got -5"),
    ("intermediate_size", None, "field 'intermediate_size' is null"),
    ("max_position_embeddings", DELETE, "field 'max_position_embeddings' is missing"),
    ("rms_norm_eps", "1e-6", "field 'rms_norm_eps' must be a finite number"),
    ("rms_norm_eps", 0, "field 'rms_norm_eps' must be > 0"),
    ("rope_theta", float("nan"), "field 'rope_theta' must be a finite number"),
    ("rope_scaling", "mrope", "rope_scaling must be a JSON object, got 'mrope' (str)"),
    ("rope_scaling", {"type": "mrope"}, "missing mrope_section"),
    ("rope_scaling.mrope_section", [2, 3], "field 'rope_scaling.mrope_section' must be a list of 3 integers"),
    ("rope_scaling.mrope_section", [2, 3, 4], "field 'rope_scaling.mrope_section' [2, 3, 4] must sum to head_dim/2 = 8"),
    ("hidden_act", "gelu", "field 'hidden_act' must be one of ['silu'], got 'gelu'"),
    ("tie_word_embeddings", "yes", "field 'tie_word_embeddings' must be true or false"),
    ("use_sliding_window", True, "use_sliding_window=true is not supported"),
    ("image_token_id", 10**9, "field 'image_token_id' 1000000000 is outside the vocabulary (vocab_size 151936)"),
    ("video_token_id", "151656", "field 'video_token_id' must be an integer"),
    ("vision_config", None, "field 'vision_config' is null"),
    ("vision_config", [], "vision_config must be a JSON object"),
    ("vision_config.depth", "2", "field 'vision_config.depth' must be an integer"),
    ("vision_config.num_heads", 3, "field 'vision_config.num_heads' must divide embed_dim 32"),
    ("vision_config.embed_dim", DELETE, "field 'vision_config.embed_dim' is missing"),
    ("vision_config.spatial_merge_size", 0, "field 'vision_config.spatial_merge_size' must be ≥ 1"),
    ("vision_config.hidden_size", 32, "field 'vision_config.hidden_size' 32 must equal the LLM's hidden_size 64"),
    ("vision_config.mlp_ratio", -1, "field 'vision_config.mlp_ratio' must be > 0"),
    ("vision_config.hidden_act", "relu", "field 'vision_config.hidden_act' must be one of"),
]
BAD_GRAFT_FIELDS = [
    ("audio_pool", 0, "field 'audio_pool' must be ≥ 1, got 0"),
    ("audio_frames", "some", "field 'audio_frames' must be one of ['valid', 'full']"),
    ("has_audio_encoder", "true", "field 'has_audio_encoder' must be true or false"),
    ("audio_config", None, "field 'audio_config' is null"),
    ("audio_config.d_model", "64", "field 'audio_config.d_model' must be an integer"),
    ("audio_config.encoder_attention_heads", 5, "field 'audio_config.encoder_attention_heads' must divide d_model 64"),
    ("audio_config.num_mel_bins", 0, "field 'audio_config.num_mel_bins' must be ≥ 1"),
    ("audio_config.max_source_positions", 1000, "field 'audio_config.max_source_positions' must be 1500"),
    ("audio_config.encoder_layers", DELETE, "Whisper config lacks audio_config.encoder_layers"),
    ("audio_config.activation_function", "relu", "field 'audio_config.activation_function' must be one of ['gelu']"),
    ("audio_hidden_size", 32, "field 'audio_hidden_size' 32 must equal audio_config.d_model 64"),
]


@pytest.mark.parametrize("path,value,message", BAD_FIELDS + BAD_GRAFT_FIELDS, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_field_is_a_checkpoint_error_naming_file_and_field(path, value, message):
    base = graft_config() if (path, value, message) in BAD_GRAFT_FIELDS else tiny_qwen2vl_config()
    with pytest.raises(CheckpointError) as e:
        Qwen2VLConfig.from_dict(edited(base, path, value), "ckpt/config.json")
    assert str(e.value).startswith("ckpt/config.json: ") and message in str(e.value), str(e.value)


def test_good_configs_still_load():
    assert Qwen2VLConfig.from_dict(tiny_qwen2vl_config()).text.num_hidden_layers == 2
    assert Qwen2VLConfig.from_dict(graft_config()).audio.d_model == 64
    assert Qwen2VLConfig.from_dict(edited(tiny_qwen2vl_config(), "vision_config.mlp_ratio", 2.5)).vision.mlp_ratio == 2.5


def test_bad_whisper_checkpoint_config_names_its_file(tmp_path):
    from qva.demo import write_tiny_whisper
    from qva.whisper_encoder import WhisperEncoderConfig

    folder = write_tiny_whisper(tmp_path / "w")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "encoder_ffn_dim": 12.5}))
    with pytest.raises(CheckpointError, match=r"w/config.json: field 'encoder_ffn_dim' must be an integer, got 12.5"):
        WhisperEncoderConfig.from_pretrained(folder)
