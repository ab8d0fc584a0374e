"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL configuration (plus the optional Whisper graft), read from either `config.json` layout.

The family is read once, here, from `model_type`: `qwen2_vl`, `qwen2_5_vl` or `qwen3_vl` (`Qwen2VLConfig.family`).
Qwen2-VL and Qwen2.5-VL have the same Qwen2 LLM with M-RoPE; Qwen2.5-VL's vision tower differs (RMSNorm + SwiGLU
blocks, window attention but in `fullatt_block_indexes`, `out_hidden_size`; `qwen2_5_vision.py`) and its video
positions follow absolute time (`tokens_per_second`). Qwen3-VL's LLM is Qwen3 (q/k RMSNorm, no q/k/v bias, an
explicit `head_dim`, interleaved M-RoPE: `TextConfig.qk_norm`, `.mrope_interleaved`); its tower (`qwen3_vision.py`)
has 16-pixel patches, a learned position table (`num_position_embeddings`) and DeepStack taps
(`deepstack_visual_indexes`). From Qwen2.5-VL on, vision_config names the tower's width `hidden_size` (Qwen2-VL:
`embed_dim`) and the LLM's `out_hidden_size` (Qwen2-VL: `hidden_size`); `VisionConfig` keeps Qwen2-VL's names.
Qwen3-VL's files are nested (`text_config`, `vision_config`) and name the tensors `model.language_model.*`,
`model.visual.*` (`CHECKPOINT_PREFIXES`: the module tree keeps one set of names for all three families).

The Hub's checkpoints use the flat v4 layout (LLM fields at top level, `rope_scaling.mrope_section`,
`vision_config.in_chans`); transformers 5 writes a nested one (`text_config` with `rope_parameters`,
`vision_config.in_channels`). Every value comes from the file; only fields the format itself treats as
optional (e.g. `num_key_value_heads`) fall back to the format's documented default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from weights_loader import CheckpointError, Fields, read_config

from .whisper_encoder import WhisperEncoderConfig

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration"}
# (qva's module prefix, transformers 5's): Qwen3-VL's files, and PEFT adapters on transformers 5, use the latter
TRANSFORMERS5_PREFIXES = (("model.", "model.language_model."), ("visual.", "model.visual."))
CHECKPOINT_PREFIXES = {"qwen3_vl": TRANSFORMERS5_PREFIXES}  # families whose checkpoints name tensors so
AUDIO_FRAMES = ("valid", "full")
AUDIO_TOKEN_IDS = {"audio_start_token_id": 151657, "audio_end_token_id": 151658, "audio_token_id": 151659}
# the first ids after each family's released tokenizer (Qwen2-VL's ends at 151656, Qwen2.5-VL's at 151664 with
# <tool_call> … <|file_sep|>, Qwen3-VL's at 151668 with <think> </think>): where the processor adds the audio
# tokens, inside the embedding's spare rows
FIRST_FREE_ID = {"qwen2_vl": 151657, "qwen2_5_vl": 151665, "qwen3_vl": 151669}
# what a graft's config.json names as its architecture: the vLLM plugin (qva/vllm/) registers it; a plain Qwen2-VL
# keeps Qwen2VLForConditionalGeneration, so stock engines still load it
GRAFT_ARCHITECTURE = "QVAForConditionalGeneration"


def swap_prefix(name: str, pairs, forward: bool = True) -> str:
    """`name` with the first matching prefix of `pairs` ((ours, theirs), …) swapped: ours → theirs, or back."""
    for ours, theirs in pairs:
        src, dst = (ours, theirs) if forward else (theirs, ours)
        if name.startswith(src):
            return dst + name[len(src):]
    return name


def file_name(name: str, family: str) -> str:
    """qva's tensor name → the name in the family's checkpoint files."""
    return swap_prefix(name, CHECKPOINT_PREFIXES.get(family, ()))


def module_name(name: str, family: str) -> str:
    """A tensor name in the family's checkpoint files → qva's."""
    return swap_prefix(name, CHECKPOINT_PREFIXES.get(family, ()), forward=False)


@dataclass
class VisionConfig:
    depth: int
    embed_dim: int
    hidden_size: int  # width of the LLM: the merger's output size
    num_heads: int
    mlp_ratio: float = 4
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    # Qwen2.5-VL only (None / empty for Qwen2-VL): SwiGLU width, window attention, video time scale
    intermediate_size: int | None = None
    window_size: int | None = None  # pixels: windows of window_size / patch_size patches a side
    fullatt_block_indexes: list[int] = field(default_factory=list)  # blocks with full (per-frame) attention
    tokens_per_second: float | None = None  # video temporal position ids per second
    # Qwen3-VL only: learned position table (a square grid, interpolated to each image) and DeepStack taps
    num_position_embeddings: int | None = None
    deepstack_visual_indexes: list[int] = field(default_factory=list)  # blocks whose output feeds LLM layers 0, 1, …

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2  # 3 * 2 * 14 * 14 = 1176


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: list[int]
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    head_dim: int | None = None  # None: hidden_size / heads (Qwen2); Qwen3 states it
    qk_norm: bool = False  # Qwen3: RMSNorm over each query/key head, no q/k/v bias
    mrope_interleaved: bool = False  # Qwen3-VL: frequencies take axes t, h, w in turn (not in contiguous chunks)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool
    family: str = "qwen2_vl"  # model_type: "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    initializer_range: float = 0.02
    # the audio graft (None: a plain Qwen2-VL)
    audio: WhisperEncoderConfig | None = None
    audio_frames: str = "valid"  # "valid": encoder frames covering real audio; "full": all 1500 per window
    audio_pool: int = 1  # average-pool this many encoder frames into one token (2 = Qwen2-Audio's 25 tokens/s)
    audio_start_token_id: int = 151657
    audio_end_token_id: int = 151658
    audio_token_id: int = 151659
    raw: dict = field(default_factory=dict, repr=False)  # the file's dict, written back on save

    def with_audio(self, audio: WhisperEncoderConfig | None, frames: str = "valid", pool: int = 1) -> "Qwen2VLConfig":
        """This config with a Whisper encoder grafted on (validated)."""
        if frames not in AUDIO_FRAMES:
            raise ValueError(f"audio_frames must be one of {AUDIO_FRAMES}, got {frames!r}")
        if not isinstance(pool, int) or pool < 1:
            raise ValueError(f"audio_pool must be a positive integer, got {pool!r}")
        from dataclasses import replace

        return replace(self, audio=audio, audio_frames=frames, audio_pool=pool)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Qwen2VLConfig":
        """Read and check every field: a wrong type or impossible value names the file and the field."""
        f = Fields(d, source)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported; qva loads {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(Qwen2-VL 2B/7B/72B, Qwen2.5-VL 3B/7B/32B/72B, Qwen3-VL 2B/4B/8B/32B dense)"
            )
        t = f.sub("text_config") if d.get("text_config") is not None else f  # nested (transformers 5) or flat (Hub)
        rope = next((src.sub(k) for src, k in ((t, "rope_parameters"), (t, "rope_scaling"), (f, "rope_scaling"))
                     if src.data.get(k) is not None), None)
        if rope is None or "mrope_section" not in rope:
            raise CheckpointError(f"{source}: missing mrope_section (in rope_scaling / rope_parameters)")
        theta_src = next((src for src in (rope, t, f) if "rope_theta" in src), None)
        if theta_src is None:
            raise CheckpointError(f"{source}: missing rope_theta (top level, or in rope_parameters)")
        if t.bool("use_sliding_window", False):
            raise CheckpointError(f"{source}: use_sliding_window=true is not supported (no Qwen2-VL checkpoint uses it)")
        qwen3 = model_type == "qwen3_vl"
        hidden, heads = t.int("hidden_size"), t.int("num_attention_heads")
        kv_heads = t.int("num_key_value_heads", heads)
        head_dim = t.int("head_dim") if qwen3 else None
        if qwen3 and head_dim % 2:
            raise t.error("head_dim", f"must be even (rotary pairs), got {head_dim}")
        if not qwen3 and (hidden % heads or (hidden // heads) % 2):
            raise t.error("num_attention_heads", f"must divide hidden_size {hidden} into an even head_dim, got {heads}")
        if qwen3 and t.bool("attention_bias", False):
            raise t.error("attention_bias", "true is not supported (no Qwen3-VL checkpoint uses it)")
        if heads % kv_heads:
            raise t.error("num_key_value_heads", f"must divide num_attention_heads {heads}, got {kv_heads}")
        text = TextConfig(
            vocab_size=t.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=t.int("intermediate_size"),
            num_hidden_layers=t.int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rms_norm_eps=t.float("rms_norm_eps"),
            rope_theta=theta_src.float("rope_theta"),
            mrope_section=rope.ints("mrope_section", length=3),
            max_position_embeddings=t.int("max_position_embeddings"),
            hidden_act=t.str("hidden_act", "silu", choices=("silu",)),
            head_dim=head_dim, qk_norm=qwen3, mrope_interleaved=rope.bool("mrope_interleaved", False),
        )
        if 2 * sum(text.mrope_section) != text.head_dim:
            raise rope.error("mrope_section", f"{text.mrope_section} must sum to head_dim/2 = {text.head_dim // 2}")

        vision = read_vision(f.sub("vision_config"), model_type, text)
        tie = f.bool("tie_word_embeddings") if "tie_word_embeddings" in f else t.bool("tie_word_embeddings", False)
        keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", *AUDIO_TOKEN_IDS)
        ids = {k: f.int(k, minimum=0) for k in keys if f.data.get(k) is not None}
        for k, tid in ids.items():
            if tid >= text.vocab_size:
                raise f.error(k, f"{tid} is outside the vocabulary (vocab_size {text.vocab_size})")
        init_src = f if "initializer_range" in f else t
        first = FIRST_FREE_ID[model_type]
        ids = {**{k: first + i for i, k in enumerate(AUDIO_TOKEN_IDS)}, **ids}  # the family's audio ids unless the file names them
        cfg = cls(text=text, vision=vision, tie_word_embeddings=tie, family=model_type,
                  initializer_range=init_src.float("initializer_range", 0.02), raw=dict(d), **ids)
        if f.bool("has_audio_encoder", False):
            audio = WhisperEncoderConfig.from_fields(f.sub("audio_config"))
            if f.int("audio_hidden_size", audio.d_model) != audio.d_model:
                raise f.error("audio_hidden_size", f"{d['audio_hidden_size']} must equal audio_config.d_model {audio.d_model}")
            cfg = cfg.with_audio(audio, f.str("audio_frames", "valid", choices=AUDIO_FRAMES), f.int("audio_pool", 1))
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Qwen2VLConfig":
        return cls.from_dict(read_config(path, "Qwen2-VL"), str(Path(path) / "config.json"))

    def to_dict(self) -> dict:
        """The family's Hub layout, which both qva and transformers read: flat (v4) for Qwen2-VL and Qwen2.5-VL,
        nested (`text_config` with `rope_parameters`) for Qwen3-VL."""
        t, v = self.text, self.vision
        out = dict(self.raw)
        qwen2_text = {k: val for k, val in asdict(t).items() if k not in ("mrope_section", "head_dim", "qk_norm", "mrope_interleaved")}
        if self.family == "qwen3_vl":
            text = {k: val for k, val in (out.get("text_config") or {}).items() if k not in ("rope_scaling", "rope_theta")}
            text.update(qwen2_text, model_type="qwen3_vl_text", head_dim=t.head_dim, attention_bias=False,
                        tie_word_embeddings=self.tie_word_embeddings,
                        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": t.mrope_section,
                                         "mrope_interleaved": t.mrope_interleaved})
            out["text_config"] = text
        else:
            for k in ("text_config", "rope_parameters"):
                out.pop(k, None)
            out.update(qwen2_text, rope_scaling={"type": "mrope", "mrope_section": t.mrope_section})
        out.update(
            model_type=self.family, architectures=[GRAFT_ARCHITECTURE if self.audio is not None else ARCHITECTURES[self.family]],
            tie_word_embeddings=self.tie_word_embeddings, image_token_id=self.image_token_id,
            video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
        )
        out["vision_config"] = vision_dict(v, self.family)
        out["initializer_range"] = self.initializer_range
        for k in ("has_audio_encoder", "audio_config", "audio_hidden_size", "audio_frames", "audio_pool", *AUDIO_TOKEN_IDS):
            out.pop(k, None)
        out["has_audio_encoder"] = self.audio is not None
        if self.audio is not None:
            out.update(
                audio_config=self.audio.to_dict(), audio_hidden_size=self.audio.d_model,
                audio_frames=self.audio_frames, audio_pool=self.audio_pool,
                **{k: getattr(self, k) for k in AUDIO_TOKEN_IDS},
            )
        return out


def read_vision(v: Fields, model_type: str, text: TextConfig) -> VisionConfig:
    """The vision tower's fields in either family's names (see the module docstring)."""
    newer = model_type in ("qwen2_5_vl", "qwen3_vl")  # the names Qwen2.5-VL introduced
    width = "hidden_size" if newer else "embed_dim"
    embed, vheads = v.int(width), v.int("num_heads")
    if embed % vheads or (embed // vheads) % 4:
        raise v.error("num_heads", f"must divide {width} {embed} into a head_dim divisible by 4 (2-D rotary), got {vheads}")
    out_key = "out_hidden_size" if newer else "hidden_size"
    acts = {"qwen2_vl": ("quick_gelu", ("quick_gelu", "gelu")), "qwen2_5_vl": ("silu", ("silu",)),
            "qwen3_vl": ("gelu_pytorch_tanh", ("gelu_pytorch_tanh",))}[model_type]
    vision = VisionConfig(
        depth=v.int("depth"),
        embed_dim=embed,
        hidden_size=v.int(out_key, text.hidden_size),
        num_heads=vheads,
        mlp_ratio=v.number("mlp_ratio", 4),
        in_channels=v.int("in_channels") if "in_channels" in v else v.int("in_chans", 3),
        patch_size=v.int("patch_size") if "patch_size" in v else v.int("spatial_patch_size", 14),
        spatial_merge_size=v.int("spatial_merge_size", 2),
        temporal_patch_size=v.int("temporal_patch_size", 2),
        hidden_act=v.str("hidden_act", acts[0], choices=acts[1]),
        rope_theta=v.sub("rope_parameters").float("rope_theta", 10000.0) if v.data.get("rope_parameters") is not None else 10000.0,
    )
    if newer:
        vision.intermediate_size = v.int("intermediate_size")
    if model_type == "qwen2_5_vl":
        vision.window_size = v.int("window_size")
        vision.fullatt_block_indexes = v.ints("fullatt_block_indexes")
        vision.tokens_per_second = v.number("tokens_per_second")
        cell = vision.patch_size * vision.spatial_merge_size
        if vision.window_size % cell:
            raise v.error("window_size", f"must be a multiple of patch_size × spatial_merge_size = {cell}, got {vision.window_size}")
        check_blocks(v, "fullatt_block_indexes", vision.fullatt_block_indexes, vision.depth)
    if model_type == "qwen3_vl":
        vision.num_position_embeddings = v.int("num_position_embeddings", minimum=1)
        if round(vision.num_position_embeddings**0.5) ** 2 != vision.num_position_embeddings:
            raise v.error("num_position_embeddings", f"must be a square (a side × side grid), got {vision.num_position_embeddings}")
        vision.deepstack_visual_indexes = v.ints("deepstack_visual_indexes")
        check_blocks(v, "deepstack_visual_indexes", vision.deepstack_visual_indexes, vision.depth)
        if len(vision.deepstack_visual_indexes) > text.num_hidden_layers:
            raise v.error("deepstack_visual_indexes", f"{len(vision.deepstack_visual_indexes)} taps for {text.num_hidden_layers} LLM layers")
    if vision.hidden_size != text.hidden_size:
        raise v.error(out_key, f"{vision.hidden_size} must equal the LLM's hidden_size {text.hidden_size}")
    return vision


def check_blocks(v: Fields, key: str, blocks: list[int], depth: int) -> None:
    bad = [i for i in blocks if not 0 <= i < depth]
    if bad:
        raise v.error(key, f"{bad} are not blocks of a depth-{depth} tower")


def vision_dict(v: VisionConfig, family: str) -> dict:
    """`vision_config` in the family's Hub names (`in_chans`, as the Hub files say; Qwen3-VL: `in_channels`)."""
    common = dict(patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                  hidden_act=v.hidden_act, in_chans=v.in_channels)
    newer = dict(depth=v.depth, hidden_size=v.embed_dim, out_hidden_size=v.hidden_size, num_heads=v.num_heads,
                 intermediate_size=v.intermediate_size)
    if family == "qwen2_5_vl":
        return dict(**newer, **common, window_size=v.window_size,
                    fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=v.tokens_per_second)
    if family == "qwen3_vl":
        common["in_channels"] = common.pop("in_chans")
        return dict(model_type="qwen3_vl_vision", **newer, **common, num_position_embeddings=v.num_position_embeddings,
                    deepstack_visual_indexes=list(v.deepstack_visual_indexes))
    return dict(depth=v.depth, embed_dim=v.embed_dim, hidden_size=v.hidden_size, num_heads=v.num_heads, mlp_ratio=v.mlp_ratio, **common)
