"""Qwen3-VL: logits parity against transformers' `Qwen3VLForConditionalGeneration` (fp32, tiny random weights with
real structure: 16-pixel patches, a 4 × 4 position table interpolated to every image, two DeepStack taps, the Qwen3
LLM with q/k norms, an explicit head_dim and interleaved M-RoPE), the vision tower alone with its taps, videos as
per-frame blocks after their timestamps, the Whisper graft with image + video + audio in one prompt, left-padded
batches, the Hub's layout (`model.language_model.*`), save / reload, and the processor (image rows, timestamps,
no default system prompt). A broken DeepStack tap, position table or M-RoPE interleave fails."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    IMAGE_PAD,
    PARITY_TOL,
    QWEN_TOKENIZER,
    VIDEO_PAD,
    assert_padded_row_alone,
    assert_parity,
    graft_parity,
    left_padded,
    need_shared,
    pixels,
    prompt,
    reference_logits,
    speechlike,
    tiny_qwen2vl,
    vision_block,
)

import qva
from qva import qwen3_vision
from qva.merge import DeepStack

TOL = PARITY_TOL
PATCH = 3 * 2 * 16 * 16  # pixel values a patch
STAMP = [27, 16, 13, 15, 6486, 29]  # "<0.5 seconds>"-like text before each frame block (any text ids)


def qwen3_pixels(grids, seed):
    return pixels(grids, seed, PATCH)


def video_blocks(grid: list[int]) -> list[int]:
    """A video as Qwen3-VL writes it: per temporal patch, its timestamp text then its own vision block."""
    t, h, w = grid
    return [tok for _ in range(t) for tok in STAMP + vision_block(VIDEO_PAD, [1, h, w])]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = tiny_qwen2vl(seed=21, tie=True, family="qwen3_vl").eval()
    saved = tmp_path_factory.mktemp("qwen3")
    ref.save_pretrained(saved)
    return ref, qva.load(saved), saved


def test_reads_the_family(pair):
    _, ours, saved = pair
    c = ours.config
    assert c.family == "qwen3_vl" and type(ours.visual).__name__ == "Qwen3VisionTransformer"
    assert c.text.head_dim == 32 and c.text.qk_norm and c.text.mrope_interleaved and c.text.mrope_section == [6, 5, 5]
    assert c.vision.patch_size == 16 and c.vision.deepstack_visual_indexes == [0, 2] and c.vision.num_position_embeddings == 16
    from weights_loader import Checkpoint

    stored = set(Checkpoint(saved).names())
    assert "model.language_model.layers.0.self_attn.q_norm.weight" in stored and "model.visual.pos_embed.weight" in stored
    assert "model.visual.deepstack_merger_list.1.norm.weight" in stored and "model.layers.0.self_attn.q_proj.bias" not in stored


# -- the vision tower alone ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("grids", [[[1, 8, 12]], [[1, 6, 10]], [[2, 8, 8]], [[1, 6, 10], [3, 4, 8], [1, 2, 2]]],
                         ids=["image", "odd", "video", "mixed"])
def test_vision_tower_and_deepstack_taps(pair, grids):
    ref, ours, _ = pair
    px, grid = qwen3_pixels(grids, seed=1)
    with torch.no_grad():
        rows, taps = ours.visual(px, grid)
        out = ref.model.visual(px, grid_thw=grid)
    want = [out.pooler_output, *out.deepstack_features]
    assert len(taps) == 2
    for got, exp in zip([rows, *taps], want):
        assert (got - exp).abs().max() <= TOL * max(1.0, exp.abs().max().item())
        assert exp.abs().max() > 1.0


def test_a_broken_position_table_fails(pair, monkeypatch):
    """The table is resampled with aligned corners: without them the rows differ."""
    ref, ours, _ = pair
    px, grid = qwen3_pixels([[1, 6, 10]], seed=2)
    real = torch.nn.functional.interpolate

    def unaligned(x, size=None, mode="nearest", align_corners=None, **kw):
        return real(x, size=size, mode=mode, align_corners=False, **kw)

    with torch.no_grad():
        want = ref.model.visual(px, grid_thw=grid).pooler_output
        monkeypatch.setattr(qwen3_vision.F, "interpolate", unaligned)
        wrong = ours.visual(px, grid)[0]
    assert (wrong - want).abs().max() > 100 * TOL


# -- logits ----------------------------------------------------------------------------------------------------------
def test_text_only(pair):
    ref, ours, _ = pair
    assert_parity(ours, ref, torch.tensor([prompt(9707, 11, 1879, 0, 358, 1079)]))


def test_images_of_odd_sizes(pair):
    ref, ours, _ = pair
    grids = [[1, 6, 10], [1, 4, 14]]
    px, grid = qwen3_pixels(grids, seed=3)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, grids[0]), 3838, vision_block(IMAGE_PAD, grids[1]), 30)])
    assert_parity(ours, ref, ids, pixel_values=px, image_grid_thw=grid)


def test_video_as_timestamped_frames(pair):
    """Each temporal patch is its own block after its time as text: positions restart the frame grid per block."""
    ref, ours, _ = pair
    pv, grid = qwen3_pixels([[3, 8, 4]], seed=4)
    ids = torch.tensor([prompt(video_blocks([3, 8, 4]), 3838, 374)])
    assert_parity(ours, ref, ids, pixel_values_videos=pv, video_grid_thw=grid)
    pos, delta = ours.position_ids(ids, None, None, grid)
    theirs, their_delta = ref.model.get_rope_index(ids, (ids == VIDEO_PAD).int() * 2, None, grid)
    assert torch.equal(pos, theirs) and torch.equal(delta, their_delta)


@pytest.mark.parametrize("broken", ["deepstack", "interleave"])
def test_a_broken_deepstack_tap_or_interleave_fails(pair, monkeypatch, broken):
    ref, ours, _ = pair
    px, grid = qwen3_pixels([[1, 8, 12]], seed=5)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 8, 12]), 3838, 374, 419)])
    want = reference_logits(ref, ids, pixel_values=px, image_grid_thw=grid)
    if broken == "deepstack":  # the second tap lands on layer 0 too
        monkeypatch.setattr(DeepStack, "add", lambda self, hidden, layer: hidden + torch.cat(
            [self.taps[-1].new_zeros(1, self.taps[-1].shape[1]), self.taps[-1]])[self.index])
    else:
        monkeypatch.setattr(ours.model.config, "mrope_interleaved", False)
    with torch.no_grad():
        got = ours(ids, pixel_values=px, image_grid_thw=grid).logits
    assert (got - want).abs().max() > 100 * TOL


def test_image_and_video_in_a_left_padded_batch(pair):
    ref, ours, _ = pair
    px, igrid = qwen3_pixels([[1, 6, 10]], seed=6)
    pv, vgrid = qwen3_pixels([[2, 8, 4]], seed=7)
    short = prompt(9707, 1879)
    ids, mask = left_padded([prompt(video_blocks([2, 8, 4]), 11, vision_block(IMAGE_PAD, [1, 6, 10]), 30), short])
    media = dict(pixel_values=px, image_grid_thw=igrid, pixel_values_videos=pv, video_grid_thw=vgrid)
    assert_parity(ours, ref, ids, mask, **media)
    assert_padded_row_alone(ours, ids, mask, short, **media)


def test_generate_equals_forward_with_deepstack(pair):
    """The engine's prefill adds the taps as `forward` does: greedy tokens equal step-by-step argmax of forward."""
    _, ours, _ = pair
    px, grid = qwen3_pixels([[1, 8, 12]], seed=8)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 8, 12]), 3838)])
    with torch.no_grad():
        out = ours.generate(input_ids=ids, pixel_values=px, image_grid_thw=grid, max_new_tokens=4, eos_token_id=[])
        seq = ids
        for _ in range(4):
            nxt = ours(seq, pixel_values=px, image_grid_thw=grid).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert out[0, ids.shape[1]:].tolist() == seq[0, ids.shape[1]:].tolist()


def test_save_reload_and_transformers_reads_it(pair, tmp_path):
    ref, ours, _ = pair
    px, grid = qwen3_pixels([[1, 6, 10]], seed=9)
    ids = torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 6, 10]), 3838)])
    qva.save(ours, tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["model_type"] == "qwen3_vl" and written["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert written["text_config"]["head_dim"] == 32 and written["vision_config"]["deepstack_visual_indexes"] == [0, 2]
    again = qva.load(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(ours(ids, pixel_values=px, image_grid_thw=grid).logits, again(ids, pixel_values=px, image_grid_thw=grid).logits)
    from transformers import Qwen3VLForConditionalGeneration

    back = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    assert_parity(ours, back, ids, pixel_values=px, image_grid_thw=grid)


# -- the graft ---------------------------------------------------------------------------------------------------------
def test_image_video_and_audio_in_one_prompt(pair, whisper_dir, tmp_path):
    ref, _, saved = pair
    encoder, wfolder = whisper_dir
    graft = qva.load(saved, whisper=wfolder, seed=3)
    c = graft.config
    px, igrid = qwen3_pixels([[1, 6, 10]], seed=10)
    pv, vgrid = qwen3_pixels([[2, 8, 4]], seed=11)
    block = lambda n: [c.audio_start_token_id] + [c.audio_token_id] * n + [c.audio_end_token_id]  # noqa: E731
    media = dict(pixel_values=px, image_grid_thw=igrid, pixel_values_videos=pv, video_grid_thw=vgrid)
    ids, feats, valid, got = graft_parity(
        graft, ref, encoder, lambda n: torch.tensor([prompt(vision_block(IMAGE_PAD, [1, 6, 10]), 11, video_blocks([2, 8, 4]), 30, block(n), 3838)]),
        media)
    qva.save(graft, tmp_path / "graft")
    again = qva.load(tmp_path / "graft")
    assert again.config.family == "qwen3_vl" and again.config.audio is not None
    with torch.no_grad():
        assert torch.equal(again(ids, input_features=feats, audio_valid_frames=valid, **media).logits, got)


# -- the processor --------------------------------------------------------------------------------------------------
QWEN3_EXTRA = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
               "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


@need_shared(QWEN_TOKENIZER)
def test_processor(pair, whisper_dir, tmp_path):
    """With Qwen3-VL's tokenizer (Qwen2-VL's plus 12 tokens up to </think> at 151668) a fresh graft's audio tokens are
    151669–151671; image rows (16-pixel patches, mean/std 0.5) equal transformers' image processor's; a video is
    per-patch blocks after `<t seconds>` as transformers' Qwen3VLProcessor computes the times; no default system prompt."""
    import shutil

    from PIL import Image
    from tokenizers import AddedToken, Tokenizer
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

    _, _, saved = pair
    folder = tmp_path / "base"
    shutil.copytree(saved, folder)
    tok = Tokenizer.from_file(str(QWEN_TOKENIZER / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3_EXTRA])
    assert tok.token_to_id("</think>") == 151668
    tok.save(str(folder / "tokenizer.json"))
    size = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}
    pre = dict(size=size, patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    (folder / "video_preprocessor_config.json").write_text(json.dumps({**pre, "size": {"shortest_edge": 4096, "longest_edge": 32 * 32 * 96}}))
    graft = qva.load(folder, whisper=whisper_dir[1])
    p = graft.processor
    assert (graft.config.audio_start_token_id, graft.config.audio_token_id) == (151669, 151671) == (p.token_id("<|audio_start|>"), p.audio_token_id)
    image = Image.fromarray((torch.rand(150, 230, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    frames = [Image.fromarray((torch.rand(120, 90, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()) for i in range(5)]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "video", "video": frames, "fps": 4.0},
                                             {"type": "audio", "audio": speechlike(2.0, 0).numpy()}, {"type": "text", "text": "What?"}]}]
    text = p.apply_chat_template(messages, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|>")
    inputs = p.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref_img = Qwen2VLImageProcessorPil(size=size, patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)(images=[image], return_tensors="pt")
    assert torch.allclose(inputs["pixel_values"], ref_img["pixel_values"], atol=1e-6)
    assert inputs["image_grid_thw"].tolist() == ref_img["image_grid_thw"].tolist()
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert t == 3  # 5 frames, the last repeated
    times = Qwen3VLProcessor._calculate_timestamps(None, list(range(5)), 4.0, 2)
    frame = "<|video_pad|>" * (h * w // 4)
    video = "".join(f"<{s:.1f} seconds><|vision_start|>{frame}<|vision_end|>" for s in times)
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * (int(inputs["image_grid_thw"].prod()) // 4)).replace("<|video_pad|>", video)
    expanded = expanded.replace("<|audio_pad|>", "<|audio_pad|>" * int((inputs["input_ids"] == graft.config.audio_token_id).sum()))
    assert p.tokenizer.encode(expanded, add_special_tokens=False).ids == inputs["input_ids"][0].tolist()
    assert times == [0.125, 0.625, 1.0] and "<0.1 seconds>" in p.decode(inputs["input_ids"][0], skip_special_tokens=False)
    with torch.no_grad():
        out = graft.generate(**inputs, max_new_tokens=2)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_video_sizing_bounds_all_frames_together():
    """Qwen3-VL's video pixels bound all frames at once (transformers' Qwen3-VL `smart_resize`)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    from qva.image_processing import smart_resize_frames

    for frames, hgt, wid, lo, hi in [(8, 480, 640, 4096, 32 * 32 * 96), (5, 120, 90, 4096, 32 * 32 * 96), (2, 20, 700, 4096, 10**7),
                                     (16, 1080, 1920, 128 * 32 * 32, 32 * 32 * 768), (4, 64, 64, 10**6, 10**7)]:
        assert smart_resize_frames(frames, hgt, wid, 2, 32, lo, hi) == smart_resize(frames, hgt, wid, 2, 32, lo, hi)
