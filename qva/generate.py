"""Generation: sampling, `generate` and streaming text, on the engine (`engine.py`) that the server uses too.

A prompt batch is prefilled once (images, video and audio encoded then), then each step samples one
token per row and feeds it back through the engine's decode step at that row's position (real tokens
so far + rope_delta, on all three M-RoPE axes). The engine calls the model's `prefill` and `decode_step`;
this module only needs those calls, so it sits below the model (the model's `generate` method delegates
here). The engine (its KV cache and compiled steps) is kept on the model and reused by the next call that
fits in it. `compile=True` compiles the decode step with
static shapes, the way gpt-fast does; it gives the same greedy tokens as eager.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from .engine import Engine
from .inputs import MEDIA
from .sampling import SamplingParams, sample_next

DEFAULT_EOS = (151645, 151643)  # <|im_end|>, <|endoftext|>


def eos_ids(eos_token_id: int | list[int] | None) -> list[int]:
    """The stop tokens: the given id(s), or Qwen2-VL's <|im_end|> and <|endoftext|>."""
    if eos_token_id is None:
        return list(DEFAULT_EOS)
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)




@torch.inference_mode()
def generate_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 151643,
    seed: int | None = None,
    compile: bool = False,
    sampling: SamplingParams | None = None,
    **media,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, `[B]`, until all rows hit an EOS or `max_new_tokens`.

    The sampling settings come as keywords (transformers' names) or as one `sampling=SamplingParams(...)`.
    Rows that have finished yield `pad_token_id`.
    """
    unknown = set(media) - set(MEDIA)
    if unknown:
        raise TypeError(f"generate() got unexpected arguments {sorted(unknown)}")
    params = sampling or SamplingParams(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed)
    media = {k: v for k, v in media.items() if v is not None}
    model.check_inputs(input_ids, attention_mask, **media)
    device = model.device
    input_ids = input_ids.to(device)
    b, s = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    limit = model.config.text.max_position_embeddings
    if s + params.max_new_tokens > limit:
        raise ValueError(f"prompt ({s} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's context of {limit}")
    eos = torch.tensor(eos_ids(eos_token_id), dtype=torch.long, device=device)
    generator = params.generator(device)

    if params.max_new_tokens == 0:
        return
    engine = engine_for(model, b, s + params.max_new_tokens, compile)
    logits = engine.prefill(0, {"input_ids": input_ids, "attention_mask": mask, **media})  # [B, V]: one row per prompt
    history = input_ids
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(params.max_new_tokens):
        nxt = sample_next(logits, history, params, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        yield nxt
        finished |= torch.isin(nxt, eos)
        if step == params.max_new_tokens - 1 or bool(finished.all()):
            return
        history = torch.cat([history, nxt[:, None]], dim=1)
        logits = engine.decode(nxt)


def engine_for(model, rows: int, max_len: int, compile: bool) -> Engine:
    """The engine `generate` last used on this model if it has the rows, slots and compile setting asked for
    (its cache and compiled steps are reused: rows past `rows` stay idle), else a new one kept for next time."""
    engine = getattr(model, "_generate_engine", None)
    if engine is None or engine.rows < rows or engine.max_len < max_len or engine.compile != compile \
            or engine.cache.dtype != model.dtype or engine.device != model.device:
        engine = Engine(model, rows, max_len, compile)
        model.__dict__["_generate_engine"] = engine  # a plain attribute: not a submodule, not in the state dict
    for row in range(rows):
        engine.release(row)
    return engine


def generate(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Prompt + new tokens `[B, S + n]`, like transformers' `generate` (finished rows padded)."""
    new = list(generate_tokens(model, input_ids, **kwargs))
    if not new:
        return input_ids
    return torch.cat([input_ids.to(new[0].device), torch.stack(new, dim=1)], dim=1)


class TextStream:
    """Token ids → text pieces as they become printable: bytes of a character split across tokens are held
    back until the character is complete (the decoded text ends in U+FFFD until then)."""

    def __init__(self, processor):
        self.processor, self.ids, self.text = processor, [], ""

    def push(self, token: int) -> str:
        """The new text that `token` completes ("" while a character is incomplete)."""
        self.ids.append(token)
        text = self.processor.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self.text = text[len(self.text):], text
        return piece


def stream_text(model, processor, inputs: dict, stats: dict | None = None, **kwargs) -> Iterator[str]:
    """Decoded text pieces of row 0 as they are produced (`TextStream`). `stats` (if given) receives
    "tokens" and "first_token_at"."""
    eos = set(eos_ids(kwargs.get("eos_token_id")))
    stats = {} if stats is None else stats
    text = TextStream(processor)
    for tok in generate_tokens(model, **inputs, **kwargs):
        t = int(tok[0])
        stats["tokens"] = stats.get("tokens", 0) + 1
        stats.setdefault("first_token_at", time.perf_counter())
        if t in eos:
            break
        piece = text.push(t)
        if piece:
            yield piece
