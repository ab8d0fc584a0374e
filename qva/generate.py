"""Generation: prefill once, then decode one token per step against a preallocated KV cache.

Both go through `model(...)` (`QVAModel.forward`, the one route to logits); this module only needs that
call, so it sits below the model (the model's `generate` method delegates here). Images, video and
audio are encoded once, at prefill. A decode step feeds one token per row at position (real tokens so
far + rope_delta) on all three M-RoPE axes — for a row without left padding that is
`cache_len + rope_delta`. `compile=True` compiles the decode step with static shapes (the whole cache
buffer, masked) the way gpt-fast does; it gives the same greedy tokens as eager. On CPU with bf16/fp16
weights the compiled step's matrix–vector products are `linear.gemv`'s where that was measured faster than
PyTorch's own on this machine (`linear.measure_gemv`, once per weight shape and batch size, remembered).
"""

from __future__ import annotations

import math
import time
from typing import Iterator

import torch

from .kv_cache import KVCache
from .linear import measure_gemv

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


class Decoder:
    """One decode step over a static cache: token ids `[B]` → next-token logits `[B, V]`."""

    def __init__(self, model, cache: KVCache, compile: bool = False):
        self.model, self.cache = model, cache
        if compile:
            measure_gemv([model.model, model.lm_head], cache.k[0].shape[0])  # the kernels the compiled step will use, chosen by timing here
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self.static = compile

    def _step(self, ids, positions, slot, kv_mask):
        out = self.model(ids[:, None], position_ids=positions, cache=self.cache, cache_slots=slot, kv_mask=kv_mask,
                         logits_to_keep=1, check=False)
        return out.logits[:, -1]  # [B, V]

    def __call__(self, ids, positions, slot: int, key_valid):
        kv_len = self.cache.max_len if self.static else slot + 1  # compiled: always the whole buffer
        visible = key_valid[:, :kv_len] & (torch.arange(kv_len, device=ids.device) <= slot)
        slot_t = torch.tensor([slot], device=ids.device)
        return self.step(ids, positions, slot_t, visible[:, None, None, :])


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

    cfg = model.config.text
    stored = model.lm_head.weight.dtype
    cache = KVCache(cfg.num_hidden_layers, b, cfg.num_key_value_heads, s + max_new_tokens, cfg.head_dim, stored, device)
    key_valid = torch.ones(b, cache.max_len, dtype=torch.bool, device=device)
    key_valid[:, :s] = mask.bool()
    out = model(input_ids, mask, **media, cache=cache, cache_slots=torch.arange(s, device=device), logits_to_keep=1, check=False)
    logits, deltas = out.logits[:, -1], out.rope_deltas  # [B, V]: one row per prompt

    decoder = Decoder(model, cache, compile)
    real = mask.sum(-1)  # [B] real tokens so far
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
        pos = (real + step + deltas[:, 0]).view(1, b, 1).expand(3, b, 1)
        logits = decoder(nxt, pos, s + step, key_valid)


def generate(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Prompt + new tokens `[B, S + n]`, like transformers' `generate` (finished rows padded)."""
    new = list(generate_tokens(model, input_ids, **kwargs))
    if not new:
        return input_ids
    return torch.cat([input_ids.to(new[0].device), torch.stack(new, dim=1)], dim=1)


def stream_text(model, processor, inputs: dict, stats: dict | None = None, **kwargs) -> Iterator[str]:
    """Decoded text pieces of row 0 as they are produced; bytes of a character split across tokens are
    held back until the character is complete. `stats` (if given) receives "tokens" and "first_token_at"."""
    ids: list[int] = []
    shown = ""
    eos = set(eos_ids(kwargs.get("eos_token_id")))
    stats = {} if stats is None else stats
    for tok in generate_tokens(model, **inputs, **kwargs):
        t = int(tok[0])
        stats["tokens"] = stats.get("tokens", 0) + 1
        stats.setdefault("first_token_at", time.perf_counter())
        if t in eos:
            break
        ids.append(t)
        text = processor.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            continue
        yield text[len(shown):]
        shown = text
