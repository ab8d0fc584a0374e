"""qva's chat template (`qva/chat_template.py`) in Jinja, for vLLM's `--chat-template`.

It renders exactly what `qva.chat_template.render` renders: a default system prompt when the first message is
not a system one, `<|im_start|>role\\n … <|im_end|>\\n` per message, `<|vision_start|><|image_pad|><|vision_end|>`
per image, `<|vision_start|><|video_pad|><|vision_end|>` per video, `<|audio_start|><|audio_pad|><|audio_end|>`
per audio clip, in the order of the content parts. Qwen2-VL's own template drops audio parts, so a graft served
with it would have no audio placeholder; vLLM hands this one the parts as `{"type": "image" | "video" | "audio"}`
and `{"type": "text", "text": ...}` (its "openai" content format, which it detects from the loop over content).

    python -m qva.vllm chat-template            # prints it, for --chat-template "$(...)"
    python -m qva.vllm chat-template FILE       # writes it to FILE
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'input_audio' in content or 'audio_url' in content %}"
    "<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)
