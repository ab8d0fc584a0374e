"""Whisper encoder parity against transformers' `WhisperEncoder`: random configs, turbo shape, real weights."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import (
    JFK,
    WHISPER_ASSETS,
    WHISPER_TINY_EN,
    max_rel_err,
    need_shared,
    perturb_,
)

from qva.audio import load_audio, log_mel
from qva.pretrained import load_whisper_encoder
from qva.whisper_encoder import WhisperEncoderConfig
from weights_loader import Checkpoint, CheckpointError
from weights_loader.writer import save_checkpoint


def hf_whisper(cls_name: str, seed: int, **cfg):
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=128, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, **cfg,
    )
    torch.manual_seed(seed)
    return perturb_(getattr(transformers, cls_name)(config), seed)


TINY = dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=96)
TINY_128 = dict(num_mel_bins=128, d_model=48, encoder_layers=3, encoder_attention_heads=3, encoder_ffn_dim=80, max_source_positions=1500)


def features(n_mels: int, windows: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(windows, n_mels, 3000, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "cls_name,cfg",
    [("WhisperForConditionalGeneration", TINY), ("WhisperModel", TINY), ("WhisperForConditionalGeneration", TINY_128)],
)
def test_parity_tiny_random_save_pretrained(tmp_path, cls_name, cfg):
    ref_model = hf_whisper(cls_name, seed=1, **cfg)
    ref_model.save_pretrained(tmp_path)  # model.encoder.* (ForConditionalGeneration) or encoder.* (WhisperModel)
    x = features(cfg["num_mel_bins"])
    with torch.no_grad():
        ref = ref_model.get_encoder()(x).last_hidden_state
        ours = load_whisper_encoder(tmp_path)(x)
    assert ours.shape == (2, 1500, cfg["d_model"])
    assert max_rel_err(ours, ref) <= 1e-4


def test_parity_fails_when_positions_are_wrong(tmp_path):
    """The parity test is sensitive: a shifted positional table is caught."""
    ref_model = hf_whisper("WhisperForConditionalGeneration", seed=1, **TINY)
    ref_model.save_pretrained(tmp_path)
    x = features(80)
    ours = load_whisper_encoder(tmp_path)
    with torch.no_grad():
        ref = ref_model.get_encoder()(x).last_hidden_state
        ours.embed_positions.weight.copy_(ours.embed_positions.weight.roll(1, 0))
        assert max_rel_err(ours(x), ref) > 1e-2


def turbo_checkpoint(folder, layers: int = 2):
    """A large-v3-turbo-shaped encoder (d 1280, 20 heads, 128 mels) written by hand in the Hub layout (fp16)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFEncoder

    cfg = dict(num_mel_bins=128, d_model=1280, encoder_layers=layers, encoder_attention_heads=20, encoder_ffn_dim=5120)
    torch.manual_seed(0)
    enc = perturb_(HFEncoder(WhisperConfig(**cfg)), seed=2, std=0.03)
    tensors = {f"model.encoder.{k}": v.half() for k, v in enc.state_dict().items()}
    tensors["model.decoder.embed_tokens.weight"] = torch.zeros(16, 1280, dtype=torch.float16)  # never to be read
    save_checkpoint(folder, tensors, {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
                                      "max_source_positions": 1500, "decoder_layers": 4, **cfg}, max_shard_bytes=40 * 2**20)
    return enc.float()


def test_parity_turbo_shaped_fp16_sharded(tmp_path):
    ref_enc = turbo_checkpoint(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()  # sharded, as the Hub stores big checkpoints
    with torch.no_grad():
        for p in ref_enc.parameters():  # the reference sees exactly the fp16-rounded weights
            p.copy_(p.half().float())
        x = features(128, windows=1)
        ref = ref_enc(x).last_hidden_state
        ckpt = Checkpoint(tmp_path)
        ours = load_whisper_encoder(tmp_path, dtype=torch.float32, checkpoint=ckpt)
        assert ours.conv1.weight.dtype == torch.float32
        out = ours(x)
    assert out.shape == (1, 1500, 1280)
    assert max_rel_err(out, ref) <= 1e-4
    assert all(n.startswith("model.encoder.") for n in ckpt.reads)
    assert len(ckpt.reads) == len(ckpt.names("model.encoder."))


# -- real weights -----------------------------------------------------------------------------------
@need_shared(WHISPER_TINY_EN)
def test_decoder_never_read_from_real_checkpoint():
    ckpt = Checkpoint(WHISPER_TINY_EN)
    assert any(n.startswith("model.decoder.") for n in ckpt.names())  # the decoder is there on disk...
    enc = load_whisper_encoder(WHISPER_TINY_EN, checkpoint=ckpt)
    assert not [n for n in ckpt.reads if "decoder" in n or "proj_out" in n]  # ...and never read
    assert sorted(ckpt.reads) == sorted(ckpt.names("model.encoder."))
    assert len(ckpt.reads) == len(enc.state_dict()) == 4 + 1 + 4 * 15 + 2  # conv1/conv2 (w, b), positions, 4 layers × 15, final LN (w, b)
    assert enc.conv1.weight.dtype == torch.float16  # stored dtype by default


@pytest.fixture(scope="module")
def jfk_real():
    if not (WHISPER_TINY_EN.exists() and JFK.exists()):
        pytest.skip("../shared whisper-tiny.en / jfk.flac not found")
    from transformers import WhisperForConditionalGeneration

    ref = WhisperForConditionalGeneration.from_pretrained(WHISPER_TINY_EN, dtype=torch.float32).eval()
    feats, valid = log_mel(load_audio(JFK), n_mels=80)
    ours = load_whisper_encoder(WHISPER_TINY_EN, dtype=torch.float32)
    with torch.no_grad():
        return ref, feats, ours(feats), ref.model.encoder(feats).last_hidden_state


def test_parity_real_tiny_en_on_speech(jfk_real):
    _, _, ours, ref = jfk_real
    assert ours.shape == (1, 1500, 384)
    assert max_rel_err(ours, ref) <= 1e-4


def test_bf16_close_to_fp32_real_weights(jfk_real):
    """bf16 weights+activations stay within 5% (relative L2) and 0.15 × output scale (max abs) of fp32."""
    _, feats, ours32, _ = jfk_real
    enc16 = load_whisper_encoder(WHISPER_TINY_EN, dtype=torch.bfloat16)
    with torch.no_grad():
        ours16 = enc16(feats).float()
    rel_l2 = ((ours16 - ours32).norm() / ours32.norm()).item()
    assert rel_l2 < 0.05
    assert max_rel_err(ours16, ours32) < 0.15
    assert rel_l2 > 1e-4  # it really ran in bf16


def _expected_transcript() -> tuple[list[int], str]:
    text = (WHISPER_TINY_EN / "SOURCE.md").read_text()
    ids = json.loads(re.search(r"\n\s*(\[843,[^\]]*\])", text).group(1))
    spoken = re.search(r'Speech: "([^"]+)"', (WHISPER_ASSETS / "SOURCE.md").read_text()).group(1)
    return ids, spoken


def test_end_to_end_transcript_with_reference_decoder(jfk_real):
    """qva features + qva encoder states → transformers' Whisper decoder, greedy → the real transcript."""
    from tokenizers import Tokenizer

    ref, _, states, _ = jfk_real
    expected_ids, spoken = _expected_transcript()
    tokens = [50257, 50362]  # <|startoftranscript|> <|notimestamps|> (English-only model)
    with torch.no_grad():
        for _ in range(40):
            out = ref.model.decoder(input_ids=torch.tensor([tokens]), encoder_hidden_states=states)
            nxt = int(ref.proj_out(out.last_hidden_state[0, -1]).argmax())
            if nxt == 50256:  # <|endoftext|>
                break
            tokens.append(nxt)
    new = tokens[2:]
    assert new == expected_ids
    text = Tokenizer.from_file(str(WHISPER_TINY_EN / "tokenizer.json")).decode(new)
    assert text == " And so my fellow Americans ask not what your country can do for you, ask what you can do for your country."
    words = lambda s: re.sub(r"[^a-z ]", "", s.lower()).split()  # noqa: E731
    assert words(text) == words(spoken)


# -- config and errors ------------------------------------------------------------------------------
def test_config_reads_whisper_sizes():
    turbo = {"model_type": "whisper", "num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32,
             "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "max_source_positions": 1500, "decoder_layers": 4}
    cfg = WhisperEncoderConfig.from_dict(turbo)
    assert (cfg.num_mel_bins, cfg.d_model, cfg.encoder_layers, cfg.input_frames) == (128, 1280, 32, 3000)
    with pytest.raises(CheckpointError, match="not a Whisper config"):
        WhisperEncoderConfig.from_dict({**turbo, "model_type": "qwen2_vl"})
    with pytest.raises(CheckpointError, match="lacks d_model"):
        WhisperEncoderConfig.from_dict({k: v for k, v in turbo.items() if k != "d_model"})


def test_errors_name_the_problem(tmp_path):
    ref_model = hf_whisper("WhisperForConditionalGeneration", seed=1, **TINY)
    ref_model.save_pretrained(tmp_path / "ok")
    enc = load_whisper_encoder(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"must be \[windows, 80, 3000\].*got \[1, 80, 2999\]"):
        enc(torch.zeros(1, 80, 2999))
    # a checkpoint with one tensor removed and one with the wrong mel count
    ckpt = Checkpoint(tmp_path / "ok")
    tensors = ckpt.read_prefix("", strip=False)
    del tensors["model.encoder.layers.1.fc2.bias"]
    tensors["model.encoder.conv1.weight"] = torch.zeros(64, 81, 3)
    save_checkpoint(tmp_path / "bad", tensors, json.loads((tmp_path / "ok" / "config.json").read_text()))
    with pytest.raises(CheckpointError) as e:
        load_whisper_encoder(tmp_path / "bad")
    msg = str(e.value)
    assert "model.encoder.layers.1.fc2.bias" in msg and "missing" in msg
    assert "model.encoder.conv1.weight: checkpoint [64, 81, 3]" in msg and "expects [64, 80, 3]" in msg
    with pytest.raises(CheckpointError, match="no config.json"):
        load_whisper_encoder(tmp_path)
