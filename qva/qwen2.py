"""The Qwen2 language model with M-RoPE: GQA attention with qkv bias, RMSNorm, SwiGLU MLP — and its Qwen3 variant.

embeddings `[B, S, D]` + 3-axis position ids `[3, B, S]` → decoder layers → final RMSNorm → `[B, S, D]`.
Module names follow the checkpoints (`embed_tokens`, `layers.{i}.self_attn.{q,k,v,o}_proj`,
`layers.{i}.mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`).

Qwen3 (Qwen3-VL's LLM, `TextConfig.qk_norm`): no q/k/v bias, an RMSNorm over each query and key head
(`self_attn.{q,k}_norm`, before the rotary), an explicit head_dim, interleaved M-RoPE; and DeepStack: the
outputs of the first layers get vision features added at the visual positions (`merge.DeepStack`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

from .attention import attention
from .kv_cache import KVCache, LayerCache
from .linear import Linear, large_matmul_dtype
from .merge import DeepStack
from .mrope import apply_rotary, mrope_cos_sin
from .qwen2vl_config import TextConfig


class RMSNorm(nn.Module):
    """x / rms(x) computed in fp32, cast back to the input dtype, then scaled by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        bias = not cfg.qk_norm  # Qwen2: q/k/v bias; Qwen3: none, an RMSNorm per head instead
        self.q_proj = Linear(d, self.heads * hd, bias=bias)
        self.k_proj = Linear(d, self.kv_heads * hd, bias=bias)
        self.v_proj = Linear(d, self.kv_heads * hd, bias=bias)
        self.o_proj = Linear(self.heads * hd, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, visible, cache: LayerCache | None = None, slots=None) -> torch.Tensor:
        """x `[B, S, D]` → `[B, S, D]`. `visible` `[B, 1, S, kv_len]` (True: may attend) or None (causal); with this
        layer's `cache`, the S keys go to `slots` and the queries attend over the cache's first kv_len slots."""
        q = rearrange(self.q_proj(x), "b s (h e) -> b h s e", h=self.heads)
        k = rearrange(self.k_proj(x), "b s (h e) -> b h s e", h=self.kv_heads)
        v = rearrange(self.v_proj(x), "b s (h e) -> b h s e", h=self.kv_heads)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # attend over everything cached so far, this step included
            k, v = cache.update(slots, k, v, visible.shape[-1])
        y = attention(q, k, v, visible)  # [B, H, S, e], in the dtype and layout `qva/attention.py` picks
        return self.o_proj(rearrange(y.to(x.dtype), "b h s e -> b s (h e)"))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # [B, S, I]
        # without autograd, in place: one [B, S, I] buffer fewer (autograd needs gate and the product kept)
        h = F.silu(gate) * up if torch.is_grad_enabled() else F.silu(gate, inplace=True).mul_(up)
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    """x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, visible, cache: LayerCache | None = None, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, visible, cache, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B, S]` (1 = token, 0 = padding) → boolean `[B, 1, S, S]`: causal, padded keys hidden.

    Every query keeps at least its own key, so padded rows give finite (ignored) outputs, not NaN.
    """
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal[None] & attention_mask.bool()[:, None, :]
    mask = mask | torch.eye(s, dtype=torch.bool, device=attention_mask.device)
    return mask[:, None]


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.checkpoint_layers = False  # training: recompute each layer's activations in backward (saves memory)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
        deepstack: DeepStack | None = None,
    ) -> torch.Tensor:
        """embeds `[B, S, D]`, positions `[3, B, S]` → hidden `[B, S, D]`.
        Without a cache: causal attention over the S tokens (`attention_mask` `[B, S]` marks padding).
        With a cache: each layer is handed its own entry; the S tokens go to cache `slots` (`[S]`, or `[B, 1]`
        for one token per row) and attend to the cache's first `visible.shape[-1]` slots as `visible`
        `[B, 1, S, kv_len]` allows. `deepstack` (Qwen3-VL, a prompt with images or videos): rows added to the
        outputs of layers 0, 1, … at the visual positions.
        """
        cfg = self.config
        stored = self.embed_tokens.weight.dtype
        # prefill (many rows) may run in fp32 over half-precision weights; one-token decoding stays as stored
        dt = large_matmul_dtype(stored, inputs_embeds.device) if inputs_embeds.shape[1] > 1 else stored
        cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, dt, cfg.mrope_interleaved)
        x = inputs_embeds.to(dt)
        taps = len(deepstack.taps) if deepstack is not None else 0
        if cache is not None:
            for i, (layer, entry) in enumerate(zip(self.layers, cache.layers)):
                x = layer(x, cos, sin, visible, entry, slots)
                x = deepstack.add(x, i) if i < taps else x
            return self.norm(x)
        visible = None if attention_mask is None else causal_padding_mask(attention_mask)
        for i, layer in enumerate(self.layers):
            if self.checkpoint_layers and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, visible, use_reentrant=False)
            else:
                x = layer(x, cos, sin, visible)
            x = deepstack.add(x, i) if i < taps else x
        return self.norm(x)
