"""qva: Qwen2-VL with a grafted Whisper audio encoder, in plain PyTorch.

    model = qva.load("Qwen2-VL-2B-Instruct", whisper="whisper-large-v3-turbo")
    inputs = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    out = model.generate(**inputs, max_new_tokens=64)
"""

from .audio import AudioError, load_audio, log_mel
from .model import QVAModel
from .pretrained import load, load_whisper_encoder, save
from .processor import Processor
from .qwen2vl_config import Qwen2VLConfig
from .whisper_encoder import WhisperEncoder, WhisperEncoderConfig

__all__ = [
    "AudioError", "load_audio", "log_mel", "QVAModel", "load", "load_whisper_encoder", "save",
    "Processor", "Qwen2VLConfig", "WhisperEncoder", "WhisperEncoderConfig",
]
