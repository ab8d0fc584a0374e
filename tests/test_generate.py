"""Generation: greedy parity with transformers' `generate`, the audio graft, compiled decoding, streaming."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    IMAGE_PAD,
    QWEN_TOKENIZER,
    VIDEO_PAD,
    Reference,
    audio_block,
    left_padded,
    need_shared,
    pixels,
    prompt,
    speechlike,
    tiny_hf_whisper,
    tiny_qwen2vl,
    vision_block,
)

import qva
import qva.generate as gen
from qva.audio import log_mel
from qva.demo import randomize_
from qva.engine import Decoder
from qva.kv_cache import KVCache
from qva.model import QVAModel
from qva.qwen2vl_config import Qwen2VLConfig

N = 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = tiny_qwen2vl(seed=11, tie=True).eval()
    ref.generation_config.eos_token_id = None  # run all 32 steps on both sides
    ref.generation_config.pad_token_id = 151643
    folder = tmp_path_factory.mktemp("gen")
    ref.save_pretrained(folder)
    return ref, qva.load(folder), folder


def reference_generate(ref, ids, mask=None, **media):
    types = (ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int()
    with torch.no_grad():
        return ref.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids), mm_token_type_ids=types,
                            max_new_tokens=N, do_sample=False, **media)


def check(pair, ids, mask=None, **media):
    ref, ours, _ = pair
    want = reference_generate(ref, ids, mask, **media)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, eos_token_id=[], **media)
    assert got.shape == want.shape == (ids.shape[0], ids.shape[1] + N)
    assert got.tolist() == want.tolist()
    assert len(set(got[0, ids.shape[1]:].tolist())) >= 2  # not a single token repeated 32 times


def test_greedy_text(pair):
    check(pair, torch.tensor([prompt(9707, 11, 1879, 0, 358, 1079)]))


def test_greedy_one_image(pair):
    px, grid = pixels([[1, 4, 6]], seed=1)
    check(pair, torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 4, 6]), 3838, 374)]), pixel_values=px, image_grid_thw=grid)


def test_greedy_one_video(pair):
    px, grid = pixels([[2, 4, 4]], seed=2)
    check(pair, torch.tensor([prompt(vision_block(VIDEO_PAD, [2, 4, 4]), 3838)]), pixel_values_videos=px, video_grid_thw=grid)


def test_wrong_decode_positions_are_caught(pair, monkeypatch):
    """The parity above is sensitive to decode positions: an off-by-3 rope delta changes the tokens."""
    _, ours, _ = pair
    px, grid = pixels([[1, 4, 6]], seed=1)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 4, 6]), 3838, 374)])
    right = ours.generate(input_ids=ids, pixel_values=px, image_grid_thw=grid, max_new_tokens=N, eos_token_id=[])
    embed = ours.embed_inputs
    monkeypatch.setattr(ours, "embed_inputs", lambda *a, **k: (lambda e, p, d, s: (e, p, d + 3, s))(*embed(*a, **k)))
    wrong = ours.generate(input_ids=ids, pixel_values=px, image_grid_thw=grid, max_new_tokens=N, eos_token_id=[])
    assert wrong.tolist() != right.tolist()


def test_greedy_left_padded_batch(pair):
    px, grid = pixels([[1, 4, 4]], seed=3)
    ids, mask = left_padded([prompt(vision_block(IMAGE_PAD, [1, 4, 4]), 3838, 374, 419), prompt(9707, 1879)])
    assert mask[1, 0] == 0  # the second row is padded
    check(pair, ids, mask, pixel_values=px, image_grid_thw=grid)


def test_greedy_audio_against_graft_reference(tmp_path):
    """The graft reference has no generate(): a greedy loop re-running its full forward each step."""
    ref_qwen = tiny_qwen2vl(seed=12).eval()
    ref_qwen.save_pretrained(tmp_path / "q")
    whisper = tiny_hf_whisper(seed=2)
    whisper.save_pretrained(tmp_path / "w")
    model = qva.load(tmp_path / "q", whisper=tmp_path / "w", seed=0)
    ref = Reference(ref_qwen, whisper.model.encoder, model.audio_projector.weight.detach())
    feats, valid = log_mel([speechlike(2.0, 1)], 80)
    ids = torch.tensor([prompt(audio_block(100), 3838)])
    seq = ids
    for _ in range(N):
        logits = ref.logits(seq, None, feats, valid.tolist())
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    got = model.generate(input_ids=ids, input_features=feats, audio_valid_frames=valid, max_new_tokens=N, eos_token_id=[])
    assert got.tolist() == seq.tolist()


def test_compiled_decode_matches_eager(pair):
    _, ours, _ = pair
    px, grid = pixels([[1, 2, 4]], seed=4)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 2, 4]), 3838)])
    eager = ours.generate(input_ids=ids, pixel_values=px, image_grid_thw=grid, max_new_tokens=12, eos_token_id=[])
    compiled = ours.generate(input_ids=ids, pixel_values=px, image_grid_thw=grid, max_new_tokens=12, eos_token_id=[], compile=True)
    assert compiled.tolist() == eager.tolist()


def test_compiled_bf16_decode_close_to_eager(tmp_path):
    """bf16 weights wide enough for the compiled CPU path to use qva.gemv: the first decode step's logits are as
    close to the fp32 model's as eager bf16's are."""
    cfg = Qwen2VLConfig.from_dict({
        "model_type": "qwen2_vl", "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 256,
        "rope_theta": 1e6, "rms_norm_eps": 1e-6,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": True,
        "vision_config": {"depth": 1, "embed_dim": 32, "num_heads": 4, "hidden_size": 512},
    })
    model32 = randomize_(QVAModel(cfg), seed=3, std=0.05)
    model32.lm_head.weight = model32.model.embed_tokens.weight
    model16 = QVAModel(cfg).to(torch.bfloat16)
    model16.load_state_dict(model32.state_dict())
    model16.lm_head.weight = model16.model.embed_tokens.weight
    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(0))

    def first_step(model, compile):
        dtype = model.lm_head.weight.dtype
        with torch.inference_mode():
            embeds, positions, _, _ = model.embed_inputs(ids)
            cache = KVCache(2, 2, 2, 16, 128, dtype)
            model.model(embeds, positions, cache=cache, slots=torch.arange(9), visible=torch.ones(2, 1, 9, 9, dtype=torch.bool).tril())
            step = Decoder(model, cache, compile=compile)
            return step(ids[:, -1], torch.full((3, 2, 1), 9), torch.full((2,), 9), torch.ones(2, 16, dtype=torch.bool)).float()

    truth, eager, compiled = first_step(model32, False), first_step(model16, False), first_step(model16, True)
    torch._dynamo.reset()
    err = lambda a: ((a - truth).norm() / truth.norm()).item()  # noqa: E731
    assert 0 < err(compiled) < 0.03 and 0 < err(eager) < 0.03  # bf16 weights and activations
    assert err(compiled) < 1.5 * err(eager)  # fp32 accumulation: no worse than eager
    assert (compiled.argmax(-1) == truth.argmax(-1)).all()


def test_stops_at_eos_per_row_and_pads(pair):
    _, ours, _ = pair
    ids = torch.tensor([prompt(9707, 11), prompt(358, 1079)])
    free = ours.generate(input_ids=ids, max_new_tokens=8, eos_token_id=[])
    stop_tok = int(free[0, ids.shape[1] + 2])  # make row 0's third new token an EOS
    out = ours.generate(input_ids=ids, max_new_tokens=8, eos_token_id=stop_tok, pad_token_id=151643)
    row0 = out[0, ids.shape[1]:].tolist()
    first = row0.index(stop_tok)
    assert all(t == 151643 for t in row0[first + 1:])
    assert out[1, ids.shape[1]:].tolist()[: first + 1] == free[1, ids.shape[1]:].tolist()[: first + 1]


def test_sampling_controls(pair):
    _, ours, _ = pair
    ids = torch.tensor([prompt(9707, 11, 1879)])
    greedy = ours.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[], do_sample=True, top_k=1, seed=5), greedy)
    a = ours.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=5.0, seed=1)
    b = ours.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=5.0, seed=1)
    c = ours.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=5.0, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    tight = ours.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[], do_sample=True, top_p=1e-6, seed=3)
    assert torch.equal(tight, greedy)  # top_p → 0 keeps only the most likely token
    assert not torch.equal(ours.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[], repetition_penalty=50.0), greedy)


def test_context_limit_is_a_clear_error(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="exceeds the model's context of 4096"):
        ours.generate(input_ids=torch.zeros(1, 4000, dtype=torch.long), max_new_tokens=200)


@need_shared(QWEN_TOKENIZER)
def test_stream_holds_back_split_utf8(monkeypatch):
    proc = qva.Processor.from_pretrained(QWEN_TOKENIZER)
    target = " this is 🦙.cpp 你好"
    tokens = proc.tokenizer.encode(target, add_special_tokens=False).ids
    assert [proc.decode([t]) for t in tokens].count("\ufffd") >= 2  # the llama emoji spans 3 byte-level tokens
    monkeypatch.setattr(gen, "generate_tokens", lambda model, **kw: (torch.tensor([t]) for t in tokens + [151645, 42]))
    pieces = list(gen.stream_text(None, proc, {"input_ids": torch.zeros(1, 1, dtype=torch.long)}))
    assert "".join(pieces) == target
    assert not any("\ufffd" in p for p in pieces)


# -- bad arguments: a ValueError naming the argument, before any compute ------------------------------------
BAD_ARGS = [
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer ≥ 0, got -1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer ≥ 0, got 2.5"),
    ({"top_k": -1, "do_sample": True}, "top_k must be an integer ≥ 0"),
    ({"top_p": 0.0, "do_sample": True}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5, "do_sample": True}, "top_p must be in (0, 1]"),
    ({"top_p": float("nan"), "do_sample": True}, "top_p must be in (0, 1]"),
    ({"temperature": -0.5, "do_sample": True}, "temperature must be a finite number ≥ 0"),
    ({"temperature": float("nan"), "do_sample": True}, "temperature must be a finite number ≥ 0 (0 or do_sample=False: greedy), got nan"),
    ({"temperature": 0.0, "do_sample": True}, "temperature must be > 0 when do_sample=True"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ({"repetition_penalty": -1.2}, "repetition_penalty must be a finite number > 0"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGS, ids=[m for _, m in BAD_ARGS])
def test_bad_generation_arguments(demo_dirs, kwargs, message, monkeypatch):
    model = qva.load(demo_dirs[0])
    monkeypatch.setattr(model, "embed_inputs", lambda *a, **k: pytest.fail("computed before checking the arguments"))
    with pytest.raises(ValueError) as e:
        model.generate(input_ids=torch.tensor([prompt(9707)]), **kwargs)
    assert message in str(e.value), str(e.value)
