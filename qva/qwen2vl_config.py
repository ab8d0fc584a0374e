"""Qwen2-VL configuration (plus the optional Whisper graft), read from either `config.json` layout.

The Hub's checkpoints use the flat v4 layout (LLM fields at top level, `rope_scaling.mrope_section`,
`vision_config.in_chans`); transformers 5 writes a nested one (`text_config` with `rope_parameters`,
`vision_config.in_channels`). Every value comes from the file; only fields the format itself treats as
optional (e.g. `num_key_value_heads`) fall back to the format's documented default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from weights_loader import CheckpointError, read_config

from .whisper_encoder import WhisperEncoderConfig

SUPPORTED_MODEL_TYPES = ("qwen2_vl",)
AUDIO_FRAMES = ("valid", "full")
AUDIO_TOKEN_IDS = {"audio_start_token_id": 151657, "audio_end_token_id": 151658, "audio_token_id": 151659}


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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig
    tie_word_embeddings: bool
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
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported; qva loads {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(Qwen2-VL 2B/7B/72B). Qwen2.5-VL and Qwen3-VL use a different vision tower."
            )
        text_src = d.get("text_config") or d  # nested (transformers 5) or flat (Hub)
        rope = text_src.get("rope_parameters") or text_src.get("rope_scaling") or d.get("rope_scaling") or {}

        def need(src: dict, key: str, where: str):
            if key not in src:
                raise CheckpointError(f"{source}: missing {where}{key!r}")
            return src[key]

        where = "text_config." if "text_config" in d else ""
        theta = rope.get("rope_theta", text_src.get("rope_theta", d.get("rope_theta")))
        if theta is None:
            raise CheckpointError(f"{source}: missing rope_theta (top level, or in rope_parameters)")
        if "mrope_section" not in rope:
            raise CheckpointError(f"{source}: missing mrope_section (in rope_scaling / rope_parameters)")
        if text_src.get("use_sliding_window"):
            raise CheckpointError(f"{source}: use_sliding_window=true is not supported (no Qwen2-VL checkpoint uses it)")
        heads = need(text_src, "num_attention_heads", where)
        text = TextConfig(
            vocab_size=need(text_src, "vocab_size", where),
            hidden_size=need(text_src, "hidden_size", where),
            intermediate_size=need(text_src, "intermediate_size", where),
            num_hidden_layers=need(text_src, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=text_src.get("num_key_value_heads") or heads,
            rms_norm_eps=float(need(text_src, "rms_norm_eps", where)),
            rope_theta=float(theta),
            mrope_section=list(rope["mrope_section"]),
            max_position_embeddings=text_src.get("max_position_embeddings", 32768),
            hidden_act=text_src.get("hidden_act", "silu"),
        )
        if 2 * sum(text.mrope_section) != text.head_dim:
            raise CheckpointError(f"{source}: mrope_section {text.mrope_section} must sum to head_dim/2 = {text.head_dim // 2}")
        if text.hidden_act != "silu":
            raise CheckpointError(f"{source}: hidden_act {text.hidden_act!r} unsupported (Qwen2-VL uses 'silu')")

        v = need(d, "vision_config", "")
        vision = VisionConfig(
            depth=need(v, "depth", "vision_config."),
            embed_dim=need(v, "embed_dim", "vision_config."),
            hidden_size=v.get("hidden_size", text.hidden_size),
            num_heads=need(v, "num_heads", "vision_config."),
            mlp_ratio=v.get("mlp_ratio", 4),
            in_channels=v.get("in_channels", v.get("in_chans", 3)),
            patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            hidden_act=v.get("hidden_act", "quick_gelu"),
            rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        )
        if vision.hidden_size != text.hidden_size:
            raise CheckpointError(f"{source}: vision_config.hidden_size {vision.hidden_size} != LLM hidden_size {text.hidden_size}")
        tie = d.get("tie_word_embeddings", text_src.get("tie_word_embeddings", False))
        keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", *AUDIO_TOKEN_IDS)
        ids = {k: d[k] for k in keys if k in d}
        init = d.get("initializer_range", text_src.get("initializer_range", 0.02))
        cfg = cls(text=text, vision=vision, tie_word_embeddings=bool(tie), initializer_range=init, raw=dict(d), **ids)
        if d.get("has_audio_encoder"):
            if "audio_config" not in d:
                raise CheckpointError(f"{source}: has_audio_encoder is true but there is no audio_config")
            audio = WhisperEncoderConfig.from_dict(d["audio_config"], f"{source} audio_config")
            if d.get("audio_hidden_size", audio.d_model) != audio.d_model:
                raise CheckpointError(f"{source}: audio_hidden_size {d['audio_hidden_size']} != audio_config.d_model {audio.d_model}")
            try:
                cfg = cfg.with_audio(audio, d.get("audio_frames", "valid"), d.get("audio_pool", 1))
            except ValueError as e:
                raise CheckpointError(f"{source}: {e}") from None
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Qwen2VLConfig":
        return cls.from_dict(read_config(path, "Qwen2-VL"), str(Path(path) / "config.json"))

    def to_dict(self) -> dict:
        """Flat Hub (v4) layout, which both qva and transformers read."""
        t, v = self.text, self.vision
        out = dict(self.raw)
        for k in ("text_config", "rope_parameters"):
            out.pop(k, None)
        out.update({k: val for k, val in asdict(t).items() if k != "mrope_section"})
        out.update(
            model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"],
            rope_scaling={"type": "mrope", "mrope_section": t.mrope_section},
            tie_word_embeddings=self.tie_word_embeddings, image_token_id=self.image_token_id,
            video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
        )
        vd = {k: val for k, val in asdict(v).items() if k != "rope_theta"}
        vd["in_chans"] = vd.pop("in_channels")
        out["vision_config"] = vd
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
