"""`QVAForConditionalGeneration`: a qva graft on vLLM's own layers.

vLLM's `Qwen2VLForConditionalGeneration` (its vision tower and M-RoPE Qwen2 LLM, with tensor-parallel linears)
plus the audio side of `qva.model.QVAModel`, on vLLM's layers:

- `audio_tower`: vLLM's `WhisperEncoder` (as `ultravox.py` builds it: a Whisper config, fused `qkv_proj` with a
  zero k bias, `mlp.fc1/fc2`), always on whole 30 s windows as Whisper was trained;
- then qva's frame selection exactly: `F.avg_pool1d(…, audio_pool, ceil_mode=True)` over each window's 1500
  frames, the first `audio_token_count(valid, audio_frames, audio_pool)` rows of each window kept;
- `audio_projector`: `d_audio → hidden`, no bias (replicated on every tensor-parallel rank);
- positions: audio rows are text positions (qva's `rope_index`), so vLLM's M-RoPE helper, which refuses an
  audio modality, runs on the vision items alone.

Weights are read from the qva folder as saved (legacy Qwen2-VL names, `audio_encoder.*`,
`audio_projector.weight`): `hf_to_vllm_mapper` renames prefixes, vLLM's Qwen2 loader fuses q/k/v into `qkv_proj`
and gate/up into `gate_up_proj`, and `WHISPER_MAPPER` fuses the encoder's q/k/v.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from transformers import WhisperConfig
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.model_executor.models.whisper import WhisperEncoder, _create_fake_bias_for_k_proj
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..audio import audio_token_count
from ..qwen2vl_config import AUDIO_FRAMES
from ..whisper_encoder import WhisperEncoderConfig
from .processor import QVADummyInputsBuilder, QVAMultiModalProcessor, QVAProcessingInfo

AUDIO_KEYS = ("input_features", "audio_valid_frames", "audio_windows")

# qva's (= Hugging Face's) Whisper encoder names → vLLM's WhisperEncoder
WHISPER_MAPPER = WeightsMapper(
    orig_to_new_substr={".fc1.": ".mlp.fc1.", ".fc2.": ".mlp.fc2."},
    orig_to_new_stacked={
        ".self_attn.q_proj": (".self_attn.qkv_proj", "q"),
        ".self_attn.k_proj": (".self_attn.qkv_proj", "k"),
        ".self_attn.v_proj": (".self_attn.qkv_proj", "v"),
    },
)


class QVAWhisperEncoder(WhisperEncoder):
    """vLLM's Whisper encoder, loading qva's `audio_encoder.*` tensors (k_proj has no bias: a zero one is fused)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights = _create_fake_bias_for_k_proj(weights, ".self_attn.k_proj.weight")
        return AutoWeightsLoader(self).load_weights(weights, mapper=WHISPER_MAPPER)


def audio_settings(config) -> tuple[WhisperConfig, str, int, int]:
    """(the Whisper config vLLM's encoder is built from, audio_frames, audio_pool, audio token id), from the
    graft's config.json fields as `qva.save` writes them."""
    raw = getattr(config, "audio_config", None)
    if not getattr(config, "has_audio_encoder", raw is not None) or raw is None:
        raise ValueError("QVAForConditionalGeneration needs a graft's config.json (has_audio_encoder, audio_config)")
    raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
    ours = WhisperEncoderConfig.from_dict(raw, "config.json audio_config")  # checked as qva checks it
    whisper = WhisperConfig(
        num_mel_bins=ours.num_mel_bins, d_model=ours.d_model, encoder_layers=ours.encoder_layers,
        encoder_attention_heads=ours.encoder_attention_heads, encoder_ffn_dim=ours.encoder_ffn_dim,
        max_source_positions=ours.max_source_positions, activation_function=ours.activation_function,
        scale_embedding=False,
    )
    frames, pool = getattr(config, "audio_frames", "valid"), int(getattr(config, "audio_pool", 1))
    if frames not in AUDIO_FRAMES or pool < 1:
        raise ValueError(f"config.json: audio_frames {frames!r} / audio_pool {pool!r} are not valid")
    return whisper, frames, pool, int(getattr(config, "audio_token_id", 151659))


@MULTIMODAL_REGISTRY.register_processor(QVAMultiModalProcessor, info=QVAProcessingInfo, dummy_inputs=QVADummyInputsBuilder)
class QVAForConditionalGeneration(Qwen2VLForConditionalGeneration):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",  # transformers-5 names, as Qwen2-VL maps them
            "model.visual.": "visual.",
            "lm_head.": "language_model.lm_head.",
            "model.": "language_model.model.",
            "audio_encoder.": "audio_tower.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return "<|audio_start|><|audio_pad|><|audio_end|>"
        return super().get_placeholder_str(modality, i)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        whisper, self.audio_frames, self.audio_pool, self.audio_token_id = audio_settings(self.config)
        vision_towers = list(self._tower_model_names)
        with self._mark_tower_model(vllm_config, "audio"):
            self.audio_tower = QVAWhisperEncoder(
                vllm_config=vllm_config.with_hf_config(whisper, architectures=["WhisperForConditionalGeneration"]),
                prefix=maybe_prefix(prefix, "audio_tower"),
                enable_pp=False,
            )
            self.audio_projector = ReplicatedLinear(
                whisper.d_model, self.config.text_config.hidden_size, bias=False,
                quant_config=None, prefix=maybe_prefix(prefix, "audio_projector"),
            )
        self._tower_model_names = vision_towers + list(self._tower_model_names)

    # -- audio ------------------------------------------------------------------------------------------
    def audio_rows(self, input_features: torch.Tensor, valid_frames: list[int]) -> torch.Tensor:
        """Log-mel windows `[W, mels, 3000]` → projected rows `[Σ tokens, hidden]`, as `QVAModel.audio_features`."""
        dtype = self.audio_tower.conv1.weight.dtype
        states = self.audio_tower(list(input_features.to(dtype)))  # [W, 1500, d_audio]
        if self.audio_pool > 1:
            states = F.avg_pool1d(states.transpose(1, 2), self.audio_pool, self.audio_pool, ceil_mode=True).transpose(1, 2)
        counts = [audio_token_count(v, self.audio_frames, self.audio_pool) for v in valid_frames]
        rows = torch.cat([states[w, :n] for w, n in enumerate(counts)])
        out, _ = self.audio_projector(rows)
        return out

    def embed_audio(self, input_features, audio_valid_frames, audio_windows) -> tuple[torch.Tensor, ...]:
        feats = torch.cat(list(input_features)) if isinstance(input_features, (list, tuple)) else input_features
        valid = torch.cat([torch.as_tensor(v).reshape(-1) for v in audio_valid_frames]) if isinstance(
            audio_valid_frames, (list, tuple)) else audio_valid_frames.reshape(-1)
        windows = torch.as_tensor(audio_windows).reshape(-1).tolist()
        valid = valid.tolist()
        rows = self.audio_rows(feats, valid)
        per_item, start = [], 0
        for w in windows:  # tokens of each clip: its windows' counts
            per_item.append(sum(audio_token_count(v, self.audio_frames, self.audio_pool) for v in valid[start:start + w]))
            start += w
        return rows.split(per_item)

    def embed_multimodal(self, **kwargs: object):
        audio = {k: kwargs.pop(k) for k in AUDIO_KEYS if k in kwargs}
        vision = tuple(super().embed_multimodal(**kwargs)) if kwargs else ()
        if audio.get("input_features") is None:
            return vision
        # vLLM's runner groups items by modality, so one call carries either vision items or audio ones
        return vision + self.embed_audio(audio["input_features"], audio["audio_valid_frames"], audio["audio_windows"])

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """qva's positions: audio rows are text (consecutive on all three axes), vision blocks as Qwen2-VL's."""
        return super().get_mrope_input_positions(input_tokens, [f for f in mm_features if f.modality != "audio"])

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(
            language_model="language_model",
            connector=["visual.merger.", "audio_projector."],
            tower_model=["visual.", "audio_tower."],
        )

    def get_mm_lora_token_counts(self, *, modality: str, mm_kwargs, num_mm_embeds: int) -> tuple[int, int | None]:
        if modality.startswith("audio"):
            raise NotImplementedError("LoRA on the audio tower / projector is not supported: merge the adapter first")
        return super().get_mm_lora_token_counts(modality=modality, mm_kwargs=mm_kwargs, num_mm_embeds=num_mm_embeds)
