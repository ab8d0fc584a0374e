"""Shared fixtures: paths to ../shared data, and helpers that make reference models non-trivial."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qva.demo import randomize_
from qva.linear import Linear, add_lora, measure, set_policy

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WHISPER_TINY_EN = SHARED / "whisper-tiny.en"
WHISPER_ASSETS = SHARED / "whisper-assets"
JFK = WHISPER_ASSETS / "jfk.flac"


def need_shared(path: Path):
    """Skip (with the reason) when ../shared is absent, as in a user's clone of the project alone."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not found: ../shared data is only beside CI/dev checkouts")


def perturb_(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Large random weights (std 0.1, norm gains 1 ± 0.2) for reference models: see `qva.demo.randomize_`."""
    return randomize_(model, seed, std)


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| divided by max(1, max |ref|): absolute for unit-scale outputs, relative for large."""
    return ((out.double() - ref.double()).abs().max() / max(1.0, ref.double().abs().max().item())).item()


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ over the whole tensor, in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """qva's cache (kernel choices, Whisper rows, demo checkpoints) in a temp folder: tests leave ~/.cache alone."""
    import os

    old = os.environ.get("QVA_CACHE")
    os.environ["QVA_CACHE"] = str(tmp_path_factory.mktemp("qva-cache"))
    yield
    if old is None:
        os.environ.pop("QVA_CACHE", None)
    else:
        os.environ["QVA_CACHE"] = old


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# -- tiny Qwen2-VL checkpoints --------------------------------------------------------------------------
QWEN_TOKENIZER = SHARED / "qwen2-vl-tokenizer"
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 151655, 151656, 151652, 151653
AUDIO_START, AUDIO_END, AUDIO_PAD = 151657, 151658, 151659


def tiny_qwen2vl_config(tie: bool = True, layers: int = 2, vocab: int = 151936):
    """A transformers Qwen2VLConfig small enough for CPU tests (GQA 4:2, mrope [2, 3, 3] over head_dim 16)."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4),
        text_config=dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
        ),
        tie_word_embeddings=tie,
    )


def tiny_qwen2_5_vl_config(tie: bool = True, layers: int = 2, vocab: int = 151936):
    """A transformers Qwen2_5_VLConfig with real structure at a tiny width: the Hub's 112-pixel windows (4 merged
    tokens a side), 3 blocks of which block 1 attends to whole frames, SwiGLU 128 wide (shapes int4 packs); the LLM as Qwen2-VL's tiny one."""
    from transformers import Qwen2_5_VLConfig

    text = tiny_qwen2vl_config(tie, layers, vocab).text_config.to_dict()
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=3, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=64, window_size=112,
                           fullatt_block_indexes=[1], tokens_per_second=2),
        text_config={k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                          "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings", "rope_parameters")},
        tie_word_embeddings=tie,
    )


def tiny_qwen3_vl_config(tie: bool = True, layers: int = 2, vocab: int = 151936):
    """A transformers Qwen3VLConfig with real structure at a tiny width: 16-pixel patches, a 4 × 4 position table
    (every image interpolated), 3 blocks of which blocks 0 and 2 are DeepStack taps into LLM layers 0 and 1; the
    LLM Qwen3 with q/k norms, head_dim 32 ≠ hidden / heads, interleaved M-RoPE [6, 5, 5]."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        vision_config=dict(depth=3, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=64, patch_size=16,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 2]),
        text_config=dict(
            hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=tie,
            rope_parameters={"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True, "rope_theta": 1e4},
        ),
        tie_word_embeddings=tie,
    )


FAMILY_CONFIGS = {"qwen2_vl": tiny_qwen2vl_config, "qwen2_5_vl": tiny_qwen2_5_vl_config, "qwen3_vl": tiny_qwen3_vl_config}


def tiny_qwen2vl(seed: int = 0, tie: bool = True, family: str = "qwen2_vl", **kw):
    """A transformers Qwen2-VL (or, with `family="qwen2_5_vl"` / `"qwen3_vl"`, Qwen2.5-VL / Qwen3-VL)
    ForConditionalGeneration with large random weights (std 0.1, norms ≠ 1)."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    classes = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
               "qwen3_vl": Qwen3VLForConditionalGeneration}
    torch.manual_seed(seed)
    model = classes[family](FAMILY_CONFIGS[family](tie, **kw))
    model = perturb_(model, seed)
    if tie:
        model.tie_weights()
    return model


def write_hub_layout(saved_dir: Path, out_dir: Path, max_shard_bytes: int = 20 * 2**20) -> Path:
    """Rewrite a `save_pretrained` folder the way the Hub stores Qwen2-VL: flat v4 config with
    `rope_scaling` and `in_chans`, bf16-free fp32 shards with an index, no `lm_head.weight` when tied."""
    import json

    from weights_loader import Checkpoint
    from weights_loader.writer import save_checkpoint

    nested = json.loads((saved_dir / "config.json").read_text())
    text = nested["text_config"]
    rope = text["rope_parameters"]
    vision = {k: v for k, v in nested["vision_config"].items() if k not in ("in_channels", "model_type", "rope_parameters", "initializer_range")}
    flat = {
        "architectures": nested["architectures"], "model_type": nested["model_type"],
        **{k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings", "hidden_act")},
        "rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
        "tie_word_embeddings": nested["tie_word_embeddings"], "use_sliding_window": False, "sliding_window": 32768,
        "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END, "vision_token_id": 151654,
        "image_token_id": IMAGE_PAD, "video_token_id": VIDEO_PAD, "torch_dtype": "float32",
        "vision_config": {**vision, "in_chans": 3, "spatial_patch_size": 14},
    }
    ckpt = Checkpoint(saved_dir)
    tensors = {n: ckpt.read(n) for n in ckpt.names() if not (nested["tie_word_embeddings"] and n == "lm_head.weight")}
    save_checkpoint(out_dir, tensors, flat, max_shard_bytes=max_shard_bytes)
    return out_dir


def tiny_hf_whisper(seed: int = 1):
    """A transformers Whisper (80 mels, d_model 48, 2 encoder layers) with large random weights."""
    import transformers

    cfg = transformers.WhisperConfig(
        num_mel_bins=80, d_model=48, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=128, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    torch.manual_seed(seed)
    return perturb_(transformers.WhisperForConditionalGeneration(cfg), seed)


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory):
    """A tiny transformers Whisper saved to a folder: (its encoder, the folder)."""
    whisper = tiny_hf_whisper(seed=1)
    folder = tmp_path_factory.mktemp("whisper")
    whisper.save_pretrained(folder)
    return whisper.model.encoder, folder


def left_padded(rows: list[list[int]], pad_id: int = 151643) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of token rows, left-padded to the longest: (input_ids, attention_mask)."""
    longest = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# -- prompts and media by token id -----------------------------------------------------------------------
def vision_block(pad: int, grid: list[int]) -> list[int]:
    t, h, w = grid
    return [VISION_START] + [pad] * (t * h * w // 4) + [VISION_END]


def prompt(*parts) -> list[int]:
    ids = [151644, 872, 198]  # <|im_start|>user\n
    for p in parts:
        ids += p if isinstance(p, list) else [p]
    return ids + [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n


def pixels(grids: list[list[int]], seed: int = 0, patch_dim: int = 1176) -> tuple[torch.Tensor, torch.Tensor]:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, patch_dim, generator=torch.Generator().manual_seed(seed)), torch.tensor(grids)


# -- logits parity against a transformers Qwen VL of any family -------------------------------------------------------
PARITY_TOL = 1e-4  # fp32, relative to the logits' scale


def types_of(ids: torch.Tensor) -> torch.Tensor:
    """transformers' `mm_token_type_ids`: 1 at image placeholders, 2 at video ones."""
    return (ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int()


def reference_logits(ref, input_ids, attention_mask=None, **media):
    with torch.no_grad():
        return ref(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=types_of(input_ids), **media).logits


def assert_padded_row_alone(ours, ids, mask, short: list[int], **media) -> None:
    """The left-padded second row of a batch (the prompt `short`) gives the logits that prompt gives alone."""
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask, **media).logits[1, ids.shape[1] - len(short):]
        alone = ours(torch.tensor([short])).logits[0]
    assert (batched - alone).abs().max().item() <= PARITY_TOL


def graft_parity(graft, ref, encoder, make_ids, media: dict, **extra):
    """A fresh graft's logits on a prompt with 3 s of speech (ids from `make_ids(audio tokens)`) and `media`, against
    transformers' parts (`Reference`), within PARITY_TOL; the audio rows (projector ×20, as large as text rows) must
    move the logits. Returns (ids, features, valid frames, logits)."""
    from qva.audio import log_mel

    c = graft.config
    with torch.no_grad():
        graft.audio_projector.weight.mul_(20)
    wave = speechlike(3.0, seed=2)
    feats, valid = log_mel(wave, 80)
    ref_feats, ref_valid = reference_features([wave], 80)
    ids = make_ids((ref_valid[0] - 1) // 2 + 1)
    reference = Reference(ref, encoder, graft.audio_projector.weight.detach())
    with torch.no_grad():
        got = graft(ids, input_features=feats, audio_valid_frames=valid, **media, **extra).logits
        want = reference.logits(ids, None, ref_feats, ref_valid, **media, **extra, audio_pad=c.audio_token_id)
        silent = graft(ids, input_features=feats.flip(-1), audio_valid_frames=valid, **media, **extra).logits
    assert (got - want).abs().max() / max(1.0, want.abs().max().item()) <= PARITY_TOL
    assert (silent - got).abs().max() > 1e-3  # the audio rows reach the logits
    return ids, feats, valid, got


def assert_parity(ours, ref, input_ids, attention_mask=None, **media) -> float:
    """qva's logits equal transformers' within PARITY_TOL over the real (unpadded) positions, and are not small."""
    with torch.no_grad():
        got = ours(input_ids, attention_mask=attention_mask, **media).logits
    want = reference_logits(ref, input_ids, attention_mask, **media)
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    err = (got - want)[keep].abs().max().item() / max(1.0, want[keep].abs().max().item())
    assert err <= PARITY_TOL, err
    assert want[keep].abs().max() > 1.0  # not a comparison of near-zero logits
    return err


def speechlike(seconds: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    return (0.3 * torch.sin(2 * math.pi * 180 * t * (1 + 0.3 * torch.sin(3 * t))) + 0.05 * torch.randn(t.shape, generator=g)).float()


def audio_block(n: int) -> list[int]:
    return [AUDIO_START] + [AUDIO_PAD] * n + [AUDIO_END]


# -- the audio graft's reference: transformers parts + nn.Linear + masked_scatter ------------------------
def reference_audio_tokens(valid_mel: int, frames: str, pool: int) -> int:
    enc = (valid_mel - 1) // 2 + 1 if frames == "valid" else 1500  # Qwen2-Audio's conv length formula
    return math.ceil(enc / pool)


def reference_features(waves: list[torch.Tensor], n_mels: int):
    """transformers' WhisperFeatureExtractor on each 30 s window of each clip; valid frames from its mask."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    feats, valid = [], []
    for w in waves:
        for start in range(0, w.shape[0], 480_000):
            out = fe(w[start : start + 480_000].numpy(), sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
            feats.append(out.input_features)
            valid.append(int(out.attention_mask.sum()))
    return torch.cat(feats), valid


class Reference:
    def __init__(self, qwen, whisper_encoder, projector_weight, frames="valid", pool=1):
        self.qwen, self.whisper, self.frames, self.pool = qwen.eval(), whisper_encoder.eval(), frames, pool
        self.proj = torch.nn.Linear(projector_weight.shape[1], projector_weight.shape[0], bias=False)
        self.proj.weight.data.copy_(projector_weight)

    def audio_rows(self, feats, valid):
        states = self.whisper(feats).last_hidden_state  # [W, 1500, d]
        if self.pool > 1:
            states = torch.nn.AvgPool1d(self.pool, self.pool, ceil_mode=True)(states.transpose(1, 2)).transpose(1, 2)
        rows = [states[w, : reference_audio_tokens(v, self.frames, self.pool)] for w, v in enumerate(valid)]
        return self.proj(torch.cat(rows))

    @torch.no_grad()
    def logits(self, ids, mask=None, feats=None, valid=None, pixel_values=None, image_grid_thw=None, **videos):
        return self.forward(ids, mask, feats, valid, pixel_values, image_grid_thw, **videos)

    def forward(self, ids, mask=None, feats=None, valid=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, audio_pad=AUDIO_PAD):
        """Logits `[B, S, V]`, recording gradients (for training parity)."""
        model = self.qwen
        embeds = model.get_input_embeddings()(ids)
        types = (ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int()  # audio tokens are text (type 0)
        if model.config.model_type == "qwen3_vl":  # DeepStack needs the vision inputs given to transformers itself
            if feats is not None:
                embeds = embeds.masked_scatter((ids == audio_pad)[..., None], self.audio_rows(feats, valid))
            pos, _ = model.model.get_rope_index(ids, types, image_grid_thw, video_grid_thw, attention_mask=mask)
            return model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask, pixel_values=pixel_values,
                         image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw).logits
        if pixel_values is not None:
            img = model.model.get_image_features(pixel_values, image_grid_thw).pooler_output
            img = torch.cat(img) if isinstance(img, (list, tuple)) else img
            embeds = embeds.masked_scatter((ids == IMAGE_PAD)[..., None], img)
        if pixel_values_videos is not None:
            vid = model.model.get_video_features(pixel_values_videos, video_grid_thw).pooler_output
            vid = torch.cat(vid) if isinstance(vid, (list, tuple)) else vid
            embeds = embeds.masked_scatter((ids == VIDEO_PAD)[..., None], vid)
        if feats is not None:
            embeds = embeds.masked_scatter((ids == audio_pad)[..., None], self.audio_rows(feats, valid))
        extra = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts}
        pos, _ = model.model.get_rope_index(ids, types, image_grid_thw, video_grid_thw, attention_mask=mask, **extra)
        return model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask).logits

    def loss(self, labels, *args, **kwargs):
        """Mean cross-entropy of `labels[:, t + 1]` from position t over labelled (≠ −100) positions."""
        logits = self.forward(*args, **kwargs)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# -- qva.linear: references, what autograd saves, fixtures ----------------------------------------------------
def reference(x, weight, bias):
    """fp32 product of the same (rounded) weights."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def saved_during(fn) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward while `fn` runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def lora_linear(dtype=torch.float32, rank=4, alpha=8.0, dropout=0.0) -> Linear:
    torch.manual_seed(0)
    lin = Linear(16, 12).to(dtype)
    return add_lora(lin, rank, alpha, dropout)


def bnb_plain_torch(op: str, *args):
    """bitsandbytes' plain-torch kernel for `op` (its "default" backend), not its native CPU library, whose
    8-bit blockwise quantizer is only approximately nearest (it takes the farther code for ~0.15% of values
    within ~1e-5 of a midpoint)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return getattr(torch.ops.bitsandbytes, op).default.redispatch(keys, *args)


@pytest.fixture(autouse=True)
def restore_policy():
    """Every test leaves the compute-dtype policy as it found it."""
    yield
    set_policy(None)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # each case compiles anew (and stays under the recompile limit)
    yield
    torch._dynamo.reset()


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """Kernel choices measured into a fresh cache folder (and forgotten by the process afterwards)."""
    monkeypatch.setenv("QVA_CACHE", str(tmp_path))
    monkeypatch.delenv(measure.KERNEL_OVERRIDE, raising=False)
    monkeypatch.setattr(measure, "_choices", None)
    yield tmp_path
    measure._choices = None



# -- the demo checkpoints, written once, and broken copies of them -----------------------------------------
@pytest.fixture(scope="session")
def demo_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny Qwen2-VL in the Hub's layout with a Qwen-id tokenizer, tiny Whisper): what `--demo` runs on."""
    from qva.demo import write_tiny_qwen2vl, write_tiny_whisper

    root = tmp_path_factory.mktemp("demo")
    return write_tiny_qwen2vl(root / "qwen2-vl"), write_tiny_whisper(root / "whisper")


def broken_copy(folder: Path, dst: Path, **files) -> Path:
    """A copy of a checkpoint folder with some files replaced: `name=str | bytes | dict (as JSON) | callable(old bytes)`."""
    import json
    import shutil

    shutil.copytree(folder, dst)
    for name, content in files.items():
        name = name.replace("__", ".")  # config__json → config.json
        path = dst / name
        if callable(content):
            content = content(path.read_bytes())
        if isinstance(content, dict):
            content = json.dumps(content)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return dst


# -- training: a tiny transformers-built Qwen2-VL with a tokenizer, a tiny Whisper, and a small manifest -----------
@pytest.fixture(scope="session")
def train_dirs(tmp_path_factory):
    """(ref qwen, qwen folder, ref whisper encoder, whisper folder, manifest): the reference models are the
    transformers modules the folders were saved from; the qwen folder has the demo tokenizer (Qwen's ids)."""
    return make_train_dirs(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def family_train_dirs(request, tmp_path_factory):
    """`train_dirs` for each base family (the same tokenizer, Whisper and manifest)."""
    return make_train_dirs(tmp_path_factory.mktemp(f"train-{request.param}"), request.param)


def make_train_dirs(root: Path, family: str = "qwen2_vl"):
    import json

    import soundfile as sf

    from qva.demo import demo_tokenizer

    qwen = tiny_qwen2vl(seed=3, tie=True, family=family).eval()
    qwen.save_pretrained(root / "qwen")
    (root / "qwen" / "tokenizer.json").write_text(demo_tokenizer().to_str())
    pre = {"min_pixels": 3136, "max_pixels": 28 * 28 * 64}
    if family == "qwen3_vl":  # 16-pixel patches, mean/std 0.5, bounds in the Hub's `size` form
        pre = {"size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}, "patch_size": 16, "image_mean": [0.5] * 3,
               "image_std": [0.5] * 3}
    (root / "qwen" / "preprocessor_config.json").write_text(json.dumps(pre))
    whisper = tiny_hf_whisper(seed=4)
    whisper.save_pretrained(root / "whisper")
    (root / "clips").mkdir()
    answers = ["42", "7", "315", "8", "906", "11", "2", "64"]
    with open(root / "train.jsonl", "w") as f:
        for i, text in enumerate(answers):
            sf.write(str(root / "clips" / f"{i}.wav"), speechlike(0.3 + 0.1 * i, seed=i).numpy(), 16000)
            f.write(json.dumps({"audio": f"clips/{i}.wav", "text": text, "voice": f"v{i % 3}"}) + "\n")
    return qwen, root / "qwen", whisper.model.encoder, root / "whisper", root / "train.jsonl"


@pytest.fixture(scope="session")
def graft(train_dirs):
    """The `train_dirs` Qwen2-VL with its Whisper grafted on (audio_pool 2), as training's data tests read it."""
    import qva

    _, qwen, _, whisper, _ = train_dirs
    return qva.load(qwen, whisper=whisper, audio_pool=2)


def train_config(train_dirs, tmp_path, stage="1", **kw):
    """A short training run's settings on the `train_dirs` checkpoints (stage 1 grafts the Whisper)."""
    from qva.train.config import TrainConfig

    _, qwen, _, whisper, manifest = train_dirs
    base = dict(stage=stage, model=str(qwen), whisper=str(whisper) if stage == "1" else None, train_data=str(manifest),
                out=str(tmp_path / f"run{stage}"), steps=3, batch_size=2, lr=1e-2, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                rows_cache="none", log_every=1, prompt="Write the number.")
    base.update(kw)
    return TrainConfig(**base)


# -- a real qva-serve process ---------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body=None, headers: dict | None = None, method: str | None = None, timeout: float = 60) -> tuple[int, bytes]:
    """(status, body bytes) of one HTTP request; `body` is bytes, or JSON-encoded when not bytes."""
    import json
    import urllib.error
    import urllib.request

    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="session")
def demo_fp32(demo_dirs):
    """The demo graft loaded in this process in fp32: what a served demo model's answers are compared with."""
    import qva

    qwen, whisper = demo_dirs
    return qva.load(qwen, whisper=whisper, dtype=torch.float32)


def demo_server(demo_dirs, key: str, name: str, *extra: str) -> "ServeProcess":
    """`qva-serve` on the demo graft in fp32, behind `key`, serving it as `name`."""
    qwen, whisper = demo_dirs
    return ServeProcess("--model", str(qwen), "--whisper", str(whisper), "--dtype", "fp32", "--api-key", key,
                        "--served-model-name", name, *extra)


class ServeProcess:
    """`qva-serve ARGS` on a free port, started and waited for (/health 200); `stop()` ends it."""

    def __init__(self, *args: str, ready: bool = True):
        import os
        import subprocess
        import sys
        import time

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w") if not os.environ.get("QVA_SERVE_LOG") else None
        self.proc = subprocess.Popen([sys.executable, "-m", "qva.serve.cli", "--port", str(self.port), *args], stdout=self.log,
                                     stderr=subprocess.STDOUT if self.log else None)
        deadline = time.monotonic() + 120
        while ready:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qva-serve exited with status {self.proc.returncode}")
            try:
                if http(self.base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("qva-serve did not become healthy in 120 s")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
        if self.log:
            self.log.close()
