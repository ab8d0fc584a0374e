"""W8A8 decode (`qva/linear/int8_activations.py`): both one-row kernels equal the rounded product written out,
several rows are int8 weight-only's, the error stays near int8's, gradients pass through the rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_l2 as rel

from qva import linear as L
from qva.linear import Linear


def rounded_product(q: L.W8A8Linear, x: torch.Tensor, levels: int) -> torch.Tensor:
    """The one-row W8A8 product in fp64: the row on `levels` steps over [min(x, 0), max(x, 0)] with an integer zero
    point, integer dot products with the int8 weights, then both scales and the bias."""
    x2 = x.reshape(1, q.in_features).double()
    lo, hi = min(x2.min().item(), 0.0), max(x2.max().item(), 0.0)
    s = (hi - lo) / levels
    z = round(-lo / s)
    xq = ((x2 / s).round() + z).clamp(0, levels) - z
    y = (xq @ q.weight_int8.double().t()) * s * q.weight_scale.double() + q.bias.double()
    return y.reshape(*x.shape[:-1], q.out_features)


def kernels() -> tuple[str, ...]:
    return ("fbgemm", "dequant") if L.fbgemm_available() else ("dequant",)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [0.0, 0.7])  # centred rows, and rows whose zero point is not at the middle
def test_one_row_kernels_equal_the_rounded_product(dtype, shift, kernel_cache, monkeypatch):
    torch.manual_seed(0)
    q = L.W8A8Linear.from_linear(Linear(256, 128).to(torch.bfloat16))
    x = (torch.randn(1, 1, 256) + shift).to(dtype)
    want = rounded_product(q, x, L.activation_levels())
    int8 = L.Int8Linear.from_linear(Linear(256, 128))
    int8.load_state_dict(q.state_dict())
    for kernel in kernels():
        monkeypatch.setenv(L.KERNEL_OVERRIDE, kernel)
        with torch.no_grad():
            got, weight_only = q(x), int8(x)
        assert got.dtype == dtype and got.shape == (1, 1, 128)
        bound, apart = (2e-4, 10) if dtype == torch.float32 else (4e-3, 2)  # bf16: its output's own rounding, ~0.3%
        assert rel(got, want) <= bound, (kernel, rel(got, want))
        assert rel(weight_only, want) > apart * rel(got, want)  # the rounding really is the activations'


def test_several_rows_are_int8_weight_only(kernel_cache):
    torch.manual_seed(0)
    q = L.W8A8Linear.from_linear(Linear(256, 128))
    int8 = L.Int8Linear.from_linear(Linear(256, 128))
    int8.load_state_dict(q.state_dict())
    x = torch.randn(2, 3, 256)
    with torch.no_grad():
        assert torch.equal(q(x), int8(x))


def test_error_is_near_int8_weight_only(kernel_cache, monkeypatch):
    """A Gaussian row: 255 levels over its ~±3σ range add ~0.7% to int8 weights' ~0.4% (in quadrature)."""
    torch.manual_seed(0)
    lin = Linear(512, 256).to(torch.float32)
    x = torch.randn(1, 512)
    want = F.linear(x, lin.weight, lin.bias)
    w8a8, int8 = L.W8A8Linear.from_linear(lin), L.Int8Linear.from_linear(lin)
    for kernel in kernels():
        monkeypatch.setenv(L.KERNEL_OVERRIDE, kernel)
        with torch.no_grad():
            e_w8a8, e_int8 = rel(w8a8(x), want), rel(int8(x), want)
        print(f"{kernel}: relative error w8a8 {e_w8a8:.4f}, int8 weight-only {e_int8:.4f}")
        assert 1.2 * e_int8 < e_w8a8 < (2.5 if L.activation_levels() == 255 else 4) * e_int8 and e_w8a8 < 0.02


def test_gradients_pass_through_the_rounding():
    torch.manual_seed(0)
    q = L.W8A8Linear.from_linear(Linear(64, 32).to(torch.float32))
    x = torch.randn(1, 64, requires_grad=True)
    q(x).sum().backward()
    assert rel(x.grad, q.dequantized().sum(dim=0, keepdim=True)) < 1e-5  # d Σ(x Wᵀ)/dx with the rounding as identity


@pytest.mark.skipif(not L.fbgemm_available(), reason="this PyTorch build has no fbgemm dynamic linear")
def test_fbgemm_packs_once_and_again_after_a_write(kernel_cache, monkeypatch):
    """fbgemm's packed copy is kept per weight and made again when `weight_int8` or `weight_scale` is written."""
    torch.manual_seed(0)
    monkeypatch.setenv(L.KERNEL_OVERRIDE, "fbgemm")
    q = L.W8A8Linear.from_linear(Linear(128, 64).to(torch.float32))
    x = torch.randn(1, 128)
    with torch.no_grad():
        first = q(x)
        assert L.packed_weight(q.weight_int8, q.weight_scale) is L.packed_weight(q.weight_int8, q.weight_scale)
        q.weight_int8[:32].neg_()  # the first 32 output rows' weights negated in place
        q.weight_scale[32:].mul_(2)
        second = q(x)
    assert rel(second, rounded_product(q, x, L.activation_levels())) < 2e-4
    torch.testing.assert_close(second[:, :32] - q.bias[:32], -(first[:, :32] - q.bias[:32]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second[:, 32:] - q.bias[32:], 2 * (first[:, 32:] - q.bias[32:]), rtol=1e-4, atol=1e-4)
