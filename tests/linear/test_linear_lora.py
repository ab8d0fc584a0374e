"""LoRA (`qva/linear/lora.py`): identity at step 0, merge / unmerge, fp32 factors over half and quantized bases, dropout."""


from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import lora_linear

from qva import linear as L
from qva.linear import (
    Linear,
    add_lora,
    lora_weight,
    merge_lora,
    unmerge_lora,
)


def test_lora_starts_as_identity_and_adds_its_scaled_product():
    lin = lora_linear()
    x = torch.randn(3, 16)
    base = F.linear(x, lin.weight, lin.bias)
    assert torch.equal(lin(x), base)  # B = 0: unchanged at step 0
    assert lin.lora_A.weight.shape == (4, 16) and lin.lora_B.weight.shape == (12, 4) and lin.lora_scaling == 2.0
    bound = 1 / 16**0.5  # kaiming-uniform(a=√5) over fan-in 16, as PEFT
    assert 0.5 * bound < lin.lora_A.weight.abs().max() <= bound
    with torch.no_grad():
        lin.lora_B.weight.normal_()
    want = base + 2.0 * (x @ lin.lora_A.weight.T @ lin.lora_B.weight.T)
    assert torch.allclose(lin(x), want, atol=1e-5)
    assert {n for n, _ in lin.named_parameters()} == {"weight", "bias", "lora_A.weight", "lora_B.weight"}  # base names kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merge_and_unmerge(dtype):
    lin = lora_linear(dtype)
    with torch.no_grad():
        lin.lora_B.weight.normal_(std=0.1)
    stored = lin.weight.detach().clone()
    x = torch.randn(3, 16, dtype=dtype)
    before = lin(x).float()
    merge_lora(lin)
    assert lin.lora_merged and torch.allclose(lin.weight.float(), stored.float() + lora_weight(lin), atol=1e-2 if dtype != torch.float32 else 1e-6)
    after = lin(x).float()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(before, after, atol=tol)
    unmerge_lora(lin)
    assert not lin.lora_merged
    assert torch.allclose(lin.weight.float(), stored.float(), atol=1e-6 if dtype == torch.float32 else 2e-2)


def test_lora_factors_train_in_fp32_over_a_frozen_half_base():
    lin = lora_linear(torch.bfloat16)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    with torch.no_grad():
        lin.lora_B.weight.normal_()
    x = torch.randn(3, 16)  # fp32 activations (the policy's choice on a CPU without native bf16)
    y = lin(x)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is None
    assert lin.lora_A.weight.grad.dtype == torch.float32 and lin.lora_B.weight.grad.abs().sum() > 0


def test_lora_dropout_applies_to_the_factors_input_only():
    lin = lora_linear(dropout=0.5)
    with torch.no_grad():
        lin.lora_B.weight.normal_()
    x = torch.randn(64, 16)
    lin.train()
    torch.manual_seed(1)
    a = lin(x)
    torch.manual_seed(2)
    b = lin(x)
    assert not torch.equal(a, b)
    lin.eval()
    assert torch.equal(lin(x), lin(x))


@pytest.mark.parametrize("fmt", ["nf4", "int8", "int4"])
def test_lora_over_a_quantized_base_equals_lora_over_the_dequantized_base(fmt):
    """Outputs without autograd (each format's inference kernel) and LoRA's gradients (and the input's) equal
    those over a plain Linear holding the dequantized weight; only the LoRA factors train."""
    torch.manual_seed(0)
    dense = Linear(256, 128)
    q = L.QUANTIZED_LINEARS[fmt].from_linear(dense)
    ref = Linear(256, 128)
    with torch.no_grad():
        ref.weight.copy_(q.dequantized())
        ref.bias.copy_(dense.bias)
    ref.requires_grad_(False)
    for m in (q, ref):
        add_lora(m, 8, 16.0)
    with torch.no_grad():
        ref.lora_A.weight.copy_(q.lora_A.weight)
        q.lora_B.weight.normal_()
        ref.lora_B.weight.copy_(q.lora_B.weight)
        probe = torch.randn(3, 256)
        assert (q(probe) - ref(probe)).abs().max().item() <= 1e-4 * ref(probe).abs().max().item()
    x = torch.randn(2, 5, 256, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    gy = torch.randn(2, 5, 128)
    q(x).backward(gy)
    ref(xr).backward(gy)
    for a, b in ((q.lora_A.weight.grad, ref.lora_A.weight.grad), (q.lora_B.weight.grad, ref.lora_B.weight.grad), (x.grad, xr.grad)):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
    assert {n for n, p in q.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}
