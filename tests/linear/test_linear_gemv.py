"""Decode-sized products (`qva/linear/gemv.py`): the compiled gemv, PyTorch's own kernel beside oneDNN's, chosen by measurement."""


from __future__ import annotations

import pytest
import torch
from conftest import reference, rel_l2
from torch import nn

from qva import linear as L
from qva.linear import (
    Linear,
    decode,
    dense,
    gemv,
    measure,
    use_gemv,
)


@pytest.mark.parametrize("dtype,shape,bias", [
    (torch.bfloat16, (1, 528), True), (torch.bfloat16, (2, 1, 528), False), (torch.bfloat16, (4, 528), True), (torch.float16, (3, 1, 528), True),
])
def test_gemv_equals_fp32_linear_eager_and_compiled(fresh_dynamo, dtype, shape, bias):
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


def test_linear_takes_the_gemv_path_when_compiled(fresh_dynamo, monkeypatch):
    monkeypatch.setattr(decode, "_decode_kernel", {})  # not measured: gemv, as before measurement existed
    lin = Linear(512, 8).to(torch.bfloat16)
    calls = []
    real = L.gemv
    monkeypatch.setattr(dense, "gemv", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    out = torch.compile(lin, fullgraph=True, dynamic=False)(x)
    assert calls, "compiled bf16 Linear did not use gemv"
    want = reference(x, lin.weight, lin.bias)
    assert ((out.float() - want).abs() <= want.abs() * 2**-8 + 1e-3).all()
    calls.clear()
    lin(x)
    assert not calls  # eager keeps F.linear


def test_compiled_step_runs_pytorchs_own_kernel_where_measured_fastest(fresh_dynamo, monkeypatch):
    lin = Linear(512, 8).to(torch.bfloat16)
    monkeypatch.setattr(decode, "_decode_kernel", {(8, 512, torch.bfloat16, 1): "aten"})
    calls = []
    real = decode._without_onednn
    monkeypatch.setattr(decode, "_without_onednn", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        out = torch.compile(lin, fullgraph=True, dynamic=False)(x)
    assert calls and torch._C._get_mkldnn_enabled()
    assert rel_l2(out, reference(x, lin.weight, lin.bias)) < 1e-2


def test_gemv_follows_the_measurement(monkeypatch, tmp_path):
    monkeypatch.setenv("QVA_CACHE", str(tmp_path))
    monkeypatch.setattr(measure, "_choices", None)
    monkeypatch.setattr(decode, "_decode_kernel", {})
    offered = []

    def fake_fastest(key, candidates):
        offered.append((key, sorted(candidates)))
        return "linear" if ":1024x512:" in key else "gemv"

    monkeypatch.setattr(decode, "fastest", fake_fastest)
    model = nn.Sequential(Linear(512, 1024), Linear(1024, 512), Linear(256, 64)).to(torch.bfloat16)  # the last: too narrow
    L.measure_gemv([model], 4)
    kernels = ["aten", "gemv", "linear"] if torch.backends.mkldnn.is_available() else ["gemv", "linear"]
    assert offered == [("decode:1024x512:4:bfloat16:cpu", kernels), ("decode:512x1024:4:bfloat16:cpu", kernels)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not use_gemv(torch.zeros(4, 512, dtype=torch.bfloat16), model[0].weight)  # measured slower here
    assert use_gemv(torch.zeros(4, 1024, dtype=torch.bfloat16), model[1].weight)
    assert use_gemv(torch.zeros(1, 512, dtype=torch.bfloat16), model[0].weight)  # 1 row: not measured, gemv
    L.measure_gemv([model], 4)
    assert len(offered) == 2  # once per shape and row count


@pytest.mark.parametrize("kernel", ["aten", "linear"])
def test_few_rows_over_half_weights_either_kernel(monkeypatch, kernel):
    """Decode-sized products over bf16 weights run oneDNN's kernel or PyTorch's own (the faster, measured once);
    either gives the fp32 product to bf16 accuracy, and oneDNN is left enabled afterwards."""
    monkeypatch.setenv(L.KERNEL_OVERRIDE, kernel)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 512, generator=g).bfloat16()
    for rows in (1, 3):
        x = torch.randn(rows, 512, generator=g).bfloat16()
        with torch.no_grad():
            y = L.matmul(x, w)
        ref = x.float() @ w.float().T
        assert y.dtype == torch.bfloat16 and rel_l2(y, ref) < 1e-2
    assert torch._C._get_mkldnn_enabled()
    monkeypatch.delenv(L.KERNEL_OVERRIDE)
    with torch.no_grad():
        L.matmul(torch.randn(1, 512).bfloat16(), w)
    assert measure._load_choices()["few-rows:torch.bfloat16:384x512:r1"] in ("aten", "linear")  # measured and remembered
