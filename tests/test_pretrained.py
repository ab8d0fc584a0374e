"""The audio graft against a reference assembled from transformers parts, exactly as the design describes:
`Qwen2VLForConditionalGeneration` + `WhisperEncoder` + `nn.Linear`, audio rows placed with `masked_scatter`
at `<|audio_pad|>`, positions from the reference `get_rope_index` with audio tokens as text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import (
    AUDIO_PAD,
    IMAGE_PAD,
    JFK,
    QWEN_TOKENIZER,
    VISION_END,
    VISION_START,
    WHISPER_TINY_EN,
    Reference,
    audio_block,
    left_padded,
    need_shared,
    prompt,
    reference_audio_tokens,
    reference_features,
    speechlike,
    tiny_qwen2vl,
)

import qva
from qva.audio import load_audio, log_mel
from weights_loader import Checkpoint, CheckpointError

TOL = 1e-4


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    ref = tiny_qwen2vl(seed=0, tie=True).eval()
    folder = tmp_path_factory.mktemp("qwen")
    ref.save_pretrained(folder)
    return ref, folder


def run_case(qwen_dir, whisper_dir, waves, frames="valid", pool=1, image=None, batch_pad=None):
    ref_qwen, qfolder = qwen_dir
    ref_whisper, wfolder = whisper_dir
    model = qva.load(qfolder, whisper=wfolder, audio_frames=frames, audio_pool=pool, seed=0)
    ref = Reference(ref_qwen, ref_whisper, model.audio_projector.weight.detach(), frames, pool)
    feats, valid = log_mel(waves, 80)
    ref_feats, ref_valid = reference_features(waves, 80)
    assert valid.tolist() == ref_valid
    blocks, w = [], 0
    for wave in waves:
        n_windows = max(1, math.ceil(wave.shape[0] / 480_000))
        blocks.append(audio_block(sum(reference_audio_tokens(v, frames, pool) for v in ref_valid[w : w + n_windows])))
        w += n_windows
    media = {}
    parts = [b for blk in blocks for b in (blk, 30)]
    if image is not None:
        media = dict(pixel_values=torch.randn(24, 1176, generator=torch.Generator().manual_seed(5)), image_grid_thw=torch.tensor([[1, 4, 6]]))
        parts = [[VISION_START] + [IMAGE_PAD] * 6 + [VISION_END], 11] + parts
    ids = torch.tensor([prompt(*parts)])
    mask = None
    if batch_pad is not None:
        ids, mask = left_padded([ids[0].tolist(), prompt(9707, 1879)])
    with torch.no_grad():
        got = model(ids, attention_mask=mask, input_features=feats, audio_valid_frames=valid, **media).logits
    want = ref.logits(ids, mask, ref_feats, ref_valid, **media)
    keep = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    err = (got - want)[keep].abs().max().item()
    assert err <= TOL, err
    # the audio rows matter: different audio → different logits after the audio block
    with torch.no_grad():
        other = model(ids, attention_mask=mask, input_features=feats.flip(-1), audio_valid_frames=valid, **media).logits
    assert (other - got)[keep].abs().max() > 1e-3
    return model, err


# -- parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames,pool", [("valid", 1), ("full", 1), ("valid", 2)])
def test_audio_only_short_clip(qwen_dir, whisper_dir, frames, pool):
    model, _ = run_case(qwen_dir, whisper_dir, [speechlike(4.0, 0)], frames, pool)
    assert model.config.audio_frames == frames and model.config.audio_pool == pool


def test_valid_clip_token_count(qwen_dir, whisper_dir):
    """A 4 s clip: 400 mel frames → 200 tokens ("valid"), 1500 ("full"), 100 with pool 2."""
    _, valid = log_mel(speechlike(4.0, 0), 80)
    from qva.audio import audio_token_count

    assert [audio_token_count(int(valid[0]), f, p) for f, p in (("valid", 1), ("full", 1), ("valid", 2), ("full", 2))] == [200, 1500, 100, 750]


def test_audio_and_image(qwen_dir, whisper_dir):
    run_case(qwen_dir, whisper_dir, [speechlike(2.5, 1)], image=True)


def test_two_clips(qwen_dir, whisper_dir):
    run_case(qwen_dir, whisper_dir, [speechlike(1.3, 2), speechlike(3.01, 3)])


def test_45_second_clip_uses_two_windows(qwen_dir, whisper_dir):
    wave = speechlike(45.0, 4)
    assert log_mel(wave, 80)[0].shape[0] == 2
    run_case(qwen_dir, whisper_dir, [wave])


def test_left_padded_batch(qwen_dir, whisper_dir):
    run_case(qwen_dir, whisper_dir, [speechlike(2.0, 5)], batch_pad=True)


@need_shared(WHISPER_TINY_EN)
def test_real_whisper_tiny_en_on_speech(qwen_dir, tmp_path):
    from transformers import WhisperForConditionalGeneration

    real = WhisperForConditionalGeneration.from_pretrained(WHISPER_TINY_EN, dtype=torch.float32).model.encoder
    # real weights are fp16 on disk: load the graft in fp32 like the reference
    ref_qwen, qfolder = qwen_dir
    model = qva.load(qfolder, whisper=WHISPER_TINY_EN, dtype=torch.float32)
    assert model.audio_encoder.config.d_model == 384 and model.audio_projector.weight.shape == (64, 384)
    ref = Reference(ref_qwen, real, model.audio_projector.weight.detach())
    wave = load_audio(JFK)
    feats, valid = log_mel(wave, 80)
    ref_feats, ref_valid = reference_features([wave], 80)
    n = reference_audio_tokens(ref_valid[0], "valid", 1)
    assert n == 550  # 11 s of speech at 50 tokens/s
    ids = torch.tensor([prompt(audio_block(n), 3838)])
    with torch.no_grad():
        got = model(ids, input_features=feats, audio_valid_frames=valid).logits
    assert (got - ref.logits(ids, None, ref_feats, ref_valid)).abs().max().item() <= TOL


# -- graft construction, save and load --------------------------------------------------------------
def test_projector_seeded_and_scaled(qwen_dir, whisper_dir):
    a = qva.load(qwen_dir[1], whisper=whisper_dir[1], seed=3)
    b = qva.load(qwen_dir[1], whisper=whisper_dir[1], seed=3)
    c = qva.load(qwen_dir[1], whisper=whisper_dir[1], seed=4)
    assert torch.equal(a.audio_projector.weight, b.audio_projector.weight)
    assert not torch.equal(a.audio_projector.weight, c.audio_projector.weight)
    assert a.audio_projector.bias is None and a.audio_projector.weight.shape == (64, 48)
    assert abs(a.audio_projector.weight.std().item() - 0.02) < 0.004  # initializer_range of the Qwen2-VL config


def test_whisper_decoder_never_read_by_graft(qwen_dir, whisper_dir, monkeypatch):
    read = []
    orig = Checkpoint.read

    def spy(self, name, *a, **k):
        read.append(name)
        return orig(self, name, *a, **k)

    monkeypatch.setattr(Checkpoint, "read", spy)
    qva.load(qwen_dir[1], whisper=whisper_dir[1])
    assert any(n.startswith("model.encoder.") for n in read)
    assert not [n for n in read if n.startswith("model.decoder.") or "proj_out" in n]


def test_save_load_round_trip_bit_identical(qwen_dir, whisper_dir, tmp_path):
    model = qva.load(qwen_dir[1], whisper=whisper_dir[1], audio_frames="full", audio_pool=2, seed=7)
    qva.save(model, tmp_path / "graft", max_shard_bytes=20 * 2**20)
    files = sorted(p.name for p in (tmp_path / "graft").iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files
    cfg = json.loads((tmp_path / "graft" / "config.json").read_text())
    assert cfg["has_audio_encoder"] is True and cfg["audio_hidden_size"] == 48 and cfg["audio_pool"] == 2
    assert (cfg["audio_start_token_id"], cfg["audio_end_token_id"], cfg["audio_token_id"]) == (151657, 151658, 151659)
    assert cfg["audio_frames"] == "full" and cfg["audio_config"]["num_mel_bins"] == 80
    index = json.loads((tmp_path / "graft" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "audio_projector.weight" in index and "audio_encoder.layers.0.self_attn.k_proj.weight" in index
    assert "lm_head.weight" not in index  # tied
    assert not [p for p in tmp_path.iterdir() if p.name != "graft"]  # atomic: no temp debris

    back = qva.load(tmp_path / "graft")
    feats, valid = log_mel([speechlike(3.0, 9)], 80)
    ids = torch.tensor([prompt(audio_block(750), 30)])
    with torch.no_grad():
        a = model(ids, input_features=feats, audio_valid_frames=valid).logits
        b = back(ids, input_features=feats, audio_valid_frames=valid).logits
    assert torch.equal(a, b)


def test_saved_graft_loads_into_the_reference(qwen_dir, whisper_dir, tmp_path):
    """Key names match a transformers fork with this graft: each part loads strictly from the folder."""
    from transformers import Qwen2VLForConditionalGeneration, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFEncoder

    model = qva.load(qwen_dir[1], whisper=whisper_dir[1], seed=1)
    qva.save(model, tmp_path / "graft")
    ckpt = Checkpoint(tmp_path / "graft")
    cfg = json.loads((tmp_path / "graft" / "config.json").read_text())
    enc = HFEncoder(WhisperConfig(**{k: v for k, v in cfg["audio_config"].items() if k != "model_type"}))
    enc.load_state_dict(ckpt.read_prefix("audio_encoder."), strict=True)
    proj = torch.nn.Linear(48, 64, bias=False)
    proj.load_state_dict(ckpt.read_prefix("audio_projector."), strict=True)
    qwen = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "graft")
    ref = Reference(qwen, enc, proj.weight.detach())
    feats, valid = log_mel([speechlike(2.0, 10)], 80)
    ids = torch.tensor([prompt(audio_block(100), 30)])
    with torch.no_grad():
        got = model(ids, input_features=feats, audio_valid_frames=valid).logits
    assert (got - ref.logits(ids, None, feats, valid.tolist())).abs().max().item() <= TOL


def test_plain_model_and_errors(qwen_dir, whisper_dir, tmp_path):
    plain = qva.load(qwen_dir[1])
    assert plain.audio_encoder is None and plain.audio_projector is None
    feats, valid = log_mel([speechlike(1.0, 11)], 80)
    with pytest.raises(ValueError, match="no audio encoder.*whisper="):
        plain(torch.tensor([prompt(audio_block(50))]), input_features=feats, audio_valid_frames=valid)
    # a projector whose shape disagrees with the LLM width
    model = qva.load(qwen_dir[1], whisper=whisper_dir[1])
    qva.save(model, tmp_path / "g")
    ck = Checkpoint(tmp_path / "g")
    tensors = {n: ck.read(n) for n in ck.names()}
    tensors["audio_projector.weight"] = torch.zeros(65, 48)
    from weights_loader.writer import save_checkpoint

    save_checkpoint(tmp_path / "bad", tensors, json.loads((tmp_path / "g" / "config.json").read_text()))
    with pytest.raises(CheckpointError, match=r"audio_projector.weight: checkpoint \[65, 48\].*expects \[64, 48\]"):
        qva.load(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="already has an audio encoder"):
        qva.load(tmp_path / "g", whisper=whisper_dir[1])
    with pytest.raises(ValueError, match="audio_frames must be one of"):
        qva.load(qwen_dir[1], whisper=whisper_dir[1], audio_frames="some")


@pytest.mark.parametrize("kw,message", [
    ({"dtype": torch.int8}, r"dtype must be torch.float32, torch.bfloat16, torch.float16 \(or one of \[.*'bf16'.*\]\), got torch.int8"),
    ({"dtype": "half-ish"}, r"dtype must be .*got 'half-ish'"),
    ({"device": "gpu"}, r"device must be a torch device such as 'cpu' or 'cuda:0', got 'gpu'"),
    ({"device": "cuda"} if not torch.cuda.is_available() else {"device": f"cuda:{torch.cuda.device_count()}"},
     r"device='cuda.*': (CUDA is not available on this machine|this machine has \d+ CUDA device)"),
])
def test_load_arguments_are_checked(qwen_dir, kw, message):
    with pytest.raises(ValueError, match=message):
        qva.load(qwen_dir[1], **kw)


def test_load_takes_dtype_names(qwen_dir):
    assert qva.load(qwen_dir[1], dtype="bf16").lm_head.weight.dtype == torch.bfloat16


@need_shared(QWEN_TOKENIZER)
def test_processor_audio_tokens_template_and_mel_mismatch(qwen_dir, whisper_dir, tmp_path):
    import shutil

    folder = tmp_path / "qwen_tok"
    shutil.copytree(qwen_dir[1], folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json"):
        shutil.copy(QWEN_TOKENIZER / f, folder / f)
    model = qva.load(folder, whisper=whisper_dir[1])
    proc = model.processor
    assert [proc.token_id(t) for t in ("<|audio_start|>", "<|audio_end|>", "<|audio_pad|>")] == [151657, 151658, 151659]
    wave = speechlike(2.0, 12)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": (wave.numpy(), 16000)}, {"type": "text", "text": "What was said?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|audio_start|><|audio_pad|><|audio_end|>What was said?<|im_end|>\n<|im_start|>assistant\n")
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert int((inputs["input_ids"] == AUDIO_PAD).sum()) == 100 and inputs["input_features"].shape == (1, 80, 3000)
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=r"1 audio placeholder\(s\).*but 0 audio"):
        proc(text=["<|audio_pad|>"])
    # saved folder: tokenizer with audio tokens, preprocessor with feature_size; a mel mismatch is refused
    qva.save(model, tmp_path / "g")
    back = qva.load(tmp_path / "g")
    assert back.processor.token_id("<|audio_pad|>") == 151659 and back.processor.feature_size == 80
    pre = json.loads((tmp_path / "g" / "preprocessor_config.json").read_text())
    (tmp_path / "g" / "preprocessor_config.json").write_text(json.dumps({**pre, "feature_size": 128}))
    with pytest.raises(CheckpointError, match="feature_size 128.*num_mel_bins 80"):
        qva.load(tmp_path / "g")
    # a plain Qwen2-VL processor refuses audio clearly
    plain = qva.Processor.from_pretrained(QWEN_TOKENIZER)
    with pytest.raises(ValueError, match="no audio encoder"):
        plain(text=["<|audio_pad|>"], audios=[np.zeros(16000, np.float32)])
