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


@pytest.mark.parametrize("forced,want", [("storage", torch.bfloat16), ("float32", torch.float32)])
def test_decode_dtype_is_the_measured_choice(forced, want, kernel_cache, monkeypatch):
    """A one-query step runs in the dtype `fastest` chose for this machine (here forced) and answers in q's dtype;
    a prompt keeps the large-product dtype; the choice is remembered under the decode key."""
    from qva import attention as A
    from qva.linear import measure

    monkeypatch.setenv(measure.KERNEL_OVERRIDE, forced)
    assert A.decode_dtype(torch.bfloat16, torch.device("cpu")) == want
    assert A.decode_dtype(torch.float32, torch.device("cpu")) == torch.float32  # nothing to choose
    seen = []
    sdpa = A.F.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda q, *a, **kw: seen.append(q.dtype) or sdpa(q, *a, **kw))
    q, k, v = torch.randn(2, 12, 1, 16).bfloat16(), torch.randn(2, 2, 9, 16).bfloat16(), torch.randn(2, 2, 9, 16).bfloat16()
    assert attention(q, k, v, torch.ones(2, 1, 1, 9, dtype=torch.bool)).dtype == torch.bfloat16
    assert seen == [want]


def test_decode_dtype_is_measured_once_and_follows_the_policy(kernel_cache, monkeypatch):
    from qva import attention as A
    from qva.linear import measure, set_policy

    got = A.decode_dtype(torch.bfloat16, torch.device("cpu"))
    key = A.DECODE_KEY.format(dtype="bfloat16")
    choice = measure.known_choice(key)
    assert choice in ("storage", "float32") and got == (torch.float32 if choice == "float32" else torch.bfloat16)
    try:
        set_policy("float32")
        assert A.decode_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
        set_policy("storage")
        assert A.decode_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    finally:
        set_policy(None)
