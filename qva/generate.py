"""Generation: sampling, `generate` and streaming text, on the engine (`engine.py`) that the server uses too.

A prompt batch is prefilled once (images, video and audio encoded then), then each step samples one
token per row and feeds it back through the engine's decode step at that row's position (real tokens
so far + rope_delta, on all three M-RoPE axes). Everything goes through `model(...)`
(`QVAModel.forward`, the one route to logits); this module only needs that call, so it sits below the
model (the model's `generate` method delegates here). `compile=True` compiles the decode step with
static shapes, the way gpt-fast does; it gives the same greedy tokens as eager.
"""

from __future__ import annotations

import math
import time
from typing import Iterator

import torch

from .engine import Engine

DEFAULT_EOS = (151645, 151643)  # <|im_end|>, <|endoftext|>


def eos_ids(eos_token_id: int | list[int] | None) -> list[int]:
    """The stop tokens: the given id(s), or Qwen2-VL's <|im_end|> and <|endoftext|>."""
    if eos_token_id is None:
        return list(DEFAULT_EOS)
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "input_features", "audio_valid_frames", "audio_rows")


def sample_next(
    logits: torch.Tensor,
    history: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token per row from logits `[B, V]`; `history` `[B, T]` are the ids seen so far (for the penalty)."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        logits = logits.scatter(1, history, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty) -> None:
    """Refuse arguments that torch would fail on, or that would silently change the output, by name."""
    def number(name, v, ok, want):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise ValueError(f"{name} must be {want}, got {v!r}")

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer ≥ 0, got {max_new_tokens!r}")
    number("temperature", temperature, lambda v: v >= 0, "a finite number ≥ 0 (0 or do_sample=False: greedy)")
    number("repetition_penalty", repetition_penalty, lambda v: v > 0, "a finite number > 0 (1.0: off)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an integer ≥ 0 (0 or None: off), got {top_k!r}")
    if top_p is not None:
        number("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1] (1.0 or None: off)")
    if do_sample and temperature == 0:
        raise ValueError("temperature must be > 0 when do_sample=True (use do_sample=False for greedy decoding)")


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
    **media,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, `[B]`, until all rows hit an EOS or `max_new_tokens`.

    Rows that have finished yield `pad_token_id`.
    """
    unknown = set(media) - set(MEDIA_KEYS)
    if unknown:
        raise TypeError(f"generate() got unexpected arguments {sorted(unknown)}")
    check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty)
    media = {k: v for k, v in media.items() if v is not None}
    model.check_inputs(input_ids, attention_mask, **media)
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    b, s = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    limit = model.config.text.max_position_embeddings
    if s + max_new_tokens > limit:
        raise ValueError(f"prompt ({s} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {limit}")
    eos = torch.tensor(eos_ids(eos_token_id), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    if max_new_tokens == 0:
        return
    engine = Engine(model, b, s + max_new_tokens, compile)
    logits = engine.prefill(0, {"input_ids": input_ids, "attention_mask": mask, **media})  # [B, V]: one row per prompt
    history = input_ids
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, history, do_sample, temperature, top_k, top_p, repetition_penalty, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        yield nxt
        finished |= torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        history = torch.cat([history, nxt[:, None]], dim=1)
        logits = engine.decode(nxt)


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
