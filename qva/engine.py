"""The generation engine: a fixed set of KV-cache rows, each holding one sequence at its own position.

`generate` and the server (`qva/serve/`) both run on this class; it knows nothing about sampling or
text. It owns:

- one `KVCache` of `rows` × `max_len` slots per layer, allocated once;
- per row: the next cache slot, the next M-RoPE position (real tokens so far + rope delta), and which
  cache slots hold real keys (`real_keys` `[rows, max_len]`; left padding of a batched prefill is not).

`prefill(first_row, inputs)` runs a prompt batch (vision and audio encoders + prompt, `model.prefill`)
straight into rows `first_row …` of the cache and returns their next-token
logits. `decode(ids)` feeds one token to each of the first `n = len(ids)` rows, each written at its own
cache slot and position, and returns `[n, V]` logits; a row that is free gets a dummy token (its
output is ignored, and the row is overwritten by its next prefill). Sequences finish and new ones join
between steps without touching the other rows: continuous batching.

`compile=True` compiles the decode step with static shapes (the whole cache buffer, masked), once per
batch bucket (1, 2, 4, … rows) rather than per request: a step over n active rows runs the bucket that
holds them. On CPU with bf16/fp16 weights its attention runs in the dtype measured faster here
(`attention.decode_dtype`), its matrix–vector products are `linear.gemv`'s where that was
measured faster on this machine (`linear.measure_gemv`); the int8 / w8a8 products run the kernel measured
fastest for their shape and row count (`linear.measure_quantized`), inside the graph.
"""

from __future__ import annotations

import torch

from .attention import decode_dtype
from .inputs import ModelInputs
from .kv_cache import KVCache
from .linear import cpu_has_fast_half_matmul, measure_gemv, measure_quantized


class Decoder:
    """One compiled-or-eager decode step over a fixed view of the cache: ids `[B]` → logits `[B, V]`."""

    def __init__(self, model, cache: KVCache, compile: bool = False):
        self.model, self.cache = model, cache
        if compile:  # the kernels and dtypes the compiled step will use, chosen by timing here, before tracing
            cpu_has_fast_half_matmul()
            decode_dtype(model.dtype, model.device)
            measure_gemv([model.model, model.lm_head], cache.rows_held)
            measure_quantized([model.model, model.lm_head], cache.rows_held, model.dtype)
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self.static = compile

    def _step(self, ids, positions, slots, visible):
        return self.model.decode_step(ids[:, None], positions, self.cache, slots, visible)  # [B, V]

    def __call__(self, ids, positions, slots, real_keys):
        """ids `[B]`, positions `[3, B, 1]`, slots `[B]` (each row's write slot), real_keys `[B, max_len]`."""
        kv_len = self.cache.max_len if self.static else int(slots.max()) + 1  # compiled: always the whole buffer
        visible = real_keys[:, :kv_len] & (torch.arange(kv_len, device=ids.device) <= slots[:, None])  # [B, kv_len]
        if not self.static:
            return self.step(ids, positions, slots[:, None], visible[:, None, None, :])
        # one compiled graph per bucket (and per gemv choice): more than dynamo's default of 8, for this step only
        with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
            return self.step(ids, positions, slots[:, None], visible[:, None, None, :])


class Engine:
    """`rows` sequences of at most `max_len` tokens each (prompt + generated), decoded together."""

    def __init__(self, model, rows: int, max_len: int, compile: bool = False):
        cfg = model.config.text
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's context of {cfg.max_position_embeddings}")
        self.model, self.rows, self.max_len, self.compile = model, rows, max_len, compile
        self.device = model.device
        self.cache = KVCache(cfg.num_hidden_layers, rows, cfg.num_key_value_heads, max_len, cfg.head_dim, model.dtype,
                             self.device)
        self.slot = torch.zeros(rows, dtype=torch.long, device=self.device)  # [rows] where each row's next token goes
        self.position = torch.zeros(rows, dtype=torch.long, device=self.device)  # [rows] its M-RoPE position
        self.real_keys = torch.ones(rows, max_len, dtype=torch.bool, device=self.device)  # [rows, max_len]
        self.length = [0] * rows  # host copy of `slot`: tokens in each row (0: free)
        self.decoders: dict[int, Decoder] = {}  # batch bucket → decode step over the cache's first rows

    def bucket(self, n: int) -> int:
        """Rows a step over the first n rows runs: n itself eagerly, the next power of two (≤ rows) compiled."""
        return n if not self.compile else min(self.rows, 1 << (n - 1).bit_length())

    @torch.inference_mode()
    def prefill(self, first_row: int, inputs: dict) -> torch.Tensor:
        """A (left-padded) prompt batch `input_ids` `[b, S]` + media into rows `first_row … first_row + b`;
        returns their next-token logits `[b, V]`. Raises ValueError (nothing written) if S does not fit."""
        ids = inputs["input_ids"].to(self.device)
        b, s = ids.shape
        if first_row + b > self.rows:
            raise ValueError(f"rows {first_row}…{first_row + b - 1} do not exist: the engine has {self.rows}")
        if s >= self.max_len:
            raise ValueError(f"prompt ({s} tokens) leaves no room in the engine's {self.max_len} cache slots")
        inputs = ModelInputs.of(inputs)
        mask = torch.ones_like(ids) if inputs.attention_mask is None else inputs.attention_mask.to(self.device)
        rows = slice(first_row, first_row + b)
        out = self.model.prefill(ModelInputs(ids, mask, **inputs.media()), self.cache.rows(rows))
        self.real_keys[rows] = True
        self.real_keys[rows, :s] = mask.bool()
        self.slot[rows] = s
        self.position[rows] = mask.sum(-1) + out.rope_deltas[:, 0]
        self.length[rows] = [s] * b
        return out.logits[:, -1]  # [b, V]

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per row for the first n = len(ids) rows `[n]` → their next-token logits `[n, V]`."""
        n = ids.shape[0]
        full = [r for r in range(n) if self.length[r] >= self.max_len]
        if full:
            raise ValueError(f"rows {full} have used all {self.max_len} cache slots")
        m = self.bucket(n)
        if m not in self.decoders:
            self.decoders[m] = Decoder(self.model, self.cache.rows(slice(0, m)), self.compile)
        ids = ids.to(self.device)
        if m > n:
            ids = torch.cat([ids, ids.new_zeros(m - n)])  # [m]: rows past n are free or idle; their outputs are dropped
        pos = self.position[:m].view(1, m, 1).expand(3, m, 1)  # [3, m, 1]: the same position on all three axes
        logits = self.decoders[m](ids, pos, self.slot[:m], self.real_keys[:m])
        for r in range(n):
            if self.length[r]:
                self.length[r] += 1
        live = torch.tensor([bool(x) for x in self.length[:m]], device=self.device)
        self.slot[:m] += live
        self.position[:m] += live
        return logits[:n]

    def release(self, row: int) -> None:
        """Free a row: it keeps its (stale) keys, which its next prefill overwrites; until then it is idle."""
        self.length[row] = 0
        self.slot[row] = 0
        self.real_keys[row] = True
