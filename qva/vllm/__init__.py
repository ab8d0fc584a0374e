"""Serving a qva graft on vLLM: an out-of-tree model plugin (vLLM's `vllm.general_plugins` entry point).

    pip install -e ".[vllm]"            # vLLM in its own environment: see tests/vllm_env.sh for a CPU one
    python -m vllm.entrypoints.openai.api_server --model my-qva --chat-template "$(python -m qva.vllm chat-template)"

`register()` (the entry point) names the architecture a graft's `config.json` carries,
`QVAForConditionalGeneration`, lazily (`"qva.vllm.model:QVAForConditionalGeneration"`), so importing
this package never imports vLLM or touches a device. `model.py` is the model (vLLM's own Qwen2-VL,
vision tower and M-RoPE LLM with its parallel layers, plus vLLM's Whisper encoder and the projector),
`processor.py` its multimodal processor (qva's own preprocessing: image patches, 16 kHz mono resampling,
log-mel windows, audio token counts), `chat_template.py` the chat template with audio (qva's, in Jinja).
Only this package imports vLLM; the rest of qva never does.
"""

from __future__ import annotations

ARCHITECTURE = "QVAForConditionalGeneration"
MODEL_CLASS = "qva.vllm.model:QVAForConditionalGeneration"


def register() -> None:
    """vLLM's `vllm.general_plugins` hook, run in every vLLM process: register the graft's architecture."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    undecodable_audio_is_a_client_error()


def undecodable_audio_is_a_client_error() -> None:
    """vLLM 0.32 answers audio that libsndfile recognises but cannot decode (a malformed WAV header, say) with a
    500: `load_audio` re-raises `soundfile.LibsndfileError`, a RuntimeError, where it turns FFmpeg's failures into
    ValueError (which its server answers with a 400). This makes any decoder failure a ValueError naming it, for
    `AudioMediaIO` (input_audio, audio_url, files) in the process that decodes requests."""
    from vllm.multimodal.media.audio import AudioMediaIO

    if getattr(AudioMediaIO, "_qva_decode_errors", False):
        return
    for name in ("load_bytes", "load_file"):
        decode = getattr(AudioMediaIO, name)

        def wrapped(self, data, _decode=decode):
            try:
                return _decode(self, data)
            except (RuntimeError, OSError, EOFError) as e:  # libsndfile, torchcodec, truncated streams
                raise ValueError(f"cannot decode the audio ({type(e).__name__}: {e})") from e

        setattr(AudioMediaIO, name, wrapped)
    AudioMediaIO._qva_decode_errors = True


def __getattr__(name: str):
    if name == "CHAT_TEMPLATE":
        from .chat_template import CHAT_TEMPLATE

        return CHAT_TEMPLATE
    raise AttributeError(name)
