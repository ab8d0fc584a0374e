"""Decode products over half-precision weights: `gemv` equals F.linear, and `Linear` uses it only where meant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qva import gemv as gemv_module
from qva.gemv import Linear, gemv, use_gemv


def reference(x, weight, bias):
    """fp32 product of the same (rounded) weights."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # each case compiles anew (and stays under the recompile limit)
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype,shape,bias", [
    (torch.bfloat16, (1, 528), True), (torch.bfloat16, (2, 1, 528), False), (torch.bfloat16, (4, 528), True), (torch.float16, (3, 1, 528), True),
])
def test_gemv_equals_fp32_linear_eager_and_compiled(dtype, shape, bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 528, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype) if bias else None
    x = torch.randn(shape, generator=g)
    want = reference(x, weight, b)
    eager = gemv(x, weight, b)
    compiled = torch.compile(gemv, fullgraph=True, dynamic=False)(x, weight, b)
    assert eager.shape == compiled.shape == (*shape[:-1], 40) and compiled.dtype == x.dtype
    assert (eager - want).abs().max() < 1e-4  # outputs ~50: fp32 summation order only
    assert (compiled - want).abs().max() < 1e-4
    # in the storage dtype, the result is the fp32 sum rounded once
    xh = x.to(dtype)
    half = torch.compile(gemv, fullgraph=True, dynamic=False)(xh, weight, b)
    want = reference(xh, weight, b)
    assert half.dtype == dtype
    assert ((half.float() - want).abs() <= want.abs() * 2**-8 + 1e-5).all()


def test_use_gemv_only_when_compiling_for_cpu_half_weights_few_rows(monkeypatch):
    w16, w32 = torch.zeros(8, 512, dtype=torch.bfloat16), torch.zeros(8, 512)
    x = torch.zeros(1, 512)
    assert not use_gemv(x, w16)  # eager: F.linear
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert use_gemv(x, w16)
    assert use_gemv(torch.zeros(2, 2, 512), w16)  # 4 rows
    assert not use_gemv(torch.zeros(5, 512), w16)  # too many rows: a matrix product
    assert not use_gemv(x, w32)  # fp32 weights: F.linear is as fast
    assert not use_gemv(torch.zeros(1, 520), torch.zeros(8, 520, dtype=torch.bfloat16))  # not a multiple of 16
    assert not use_gemv(torch.zeros(1, 256), torch.zeros(8, 256, dtype=torch.bfloat16))  # narrow: partial sums dominate


def test_linear_takes_the_gemv_path_when_compiled(monkeypatch):
    lin = Linear(512, 8).to(torch.bfloat16)
    calls = []
    real = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    out = torch.compile(lin, fullgraph=True, dynamic=False)(x)
    assert calls, "compiled bf16 Linear did not use gemv"
    want = reference(x, lin.weight, lin.bias)
    assert ((out.float() - want).abs() <= want.abs() * 2**-8 + 1e-3).all()
    calls.clear()
    lin(x)
    assert not calls  # eager keeps F.linear
