"""qva/attention.py: grouped-query attention, the folded decode layout against a float64 softmax written out."""

from __future__ import annotations

import pytest
import torch
from conftest import max_rel_err
from einops import repeat

from qva.attention import attention


def reference(q, k, v, visible):
    """Each query head against its key head's keys (`h // G`), masked softmax in float64: [B, H, S, e]."""
    groups = q.shape[1] // k.shape[1]
    k, v = (repeat(t.double(), "b h t e -> b (h g) t e", g=groups) for t in (k, v))  # head h reads key head h // G
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, S, T]
    if visible is None:
        visible = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("rows,queries", [(1, 1), (3, 1), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_a_written_out_softmax(rows, queries, dtype):
    """One query a row (the folded decode layout) and a prompt (the kernel's own GQA), each row with its own mask:
    within rounding of the float64 reference; 12 query heads over 2 key heads, as the 2B has."""
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, keys, e = 12, 2, 37, 16
    q = torch.randn(rows, heads, queries, e, generator=g).to(dtype)
    k, v = (torch.randn(rows, kv_heads, keys, e, generator=g).to(dtype) for _ in range(2))
    visible = torch.rand(rows, 1, queries, keys, generator=g) < 0.6
    visible[..., 0] = True  # every query sees a key
    got = attention(q, k, v, visible)
    assert got.shape == (rows, heads, queries, e) and got.dtype == dtype
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    assert max_rel_err(got, reference(q, k, v, visible)) < tol
    # not vacuous: the heads differ, and reading another key head's keys misses by far more than the tolerance
    assert max_rel_err(got, reference(q, k.flip(1), v.flip(1), visible)) > 50 * tol


def test_prompt_without_a_mask_is_causal():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    assert max_rel_err(attention(q, k, v, None), reference(q, k, v, None)) < 2e-6
