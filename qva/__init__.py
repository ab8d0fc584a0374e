"""qva: Qwen2-VL with a grafted Whisper audio encoder, in plain PyTorch.

Public names are imported on first use, so `python -m qva.audio` does not import itself twice.
"""

from importlib import import_module

_EXPORTS = {
    "AudioError": "audio", "load_audio": "audio", "log_mel": "audio",
    "WhisperEncoder": "whisper_encoder", "WhisperEncoderConfig": "whisper_encoder",
    "QVAModel": "model", "Qwen2VLConfig": "qwen2vl_config", "Processor": "processor",
    "load": "graft", "save": "graft",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qva' has no attribute {name!r}")
