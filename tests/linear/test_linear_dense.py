"""Products over a stored weight (`qva/linear/dense.py`, `buffers.py`): the autograd product that saves only the stored
weight, scratch buffers, norms and convs in the input's dtype."""


from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import reference, saved_during
from torch import nn

from qva.linear import (
    Conv1d,
    LayerNorm,
    Linear,
    clear_scratch,
    matmul,
)
from qva.linear import buffers as linear_buffers


@pytest.mark.parametrize("weight_trains", [True, False])
def test_stored_weight_product_gradients_equal_fp32(weight_trains):
    g = torch.Generator().manual_seed(0)
    w16 = nn.Parameter(torch.randn(6, 8, generator=g).to(torch.bfloat16), requires_grad=weight_trains)
    b16 = nn.Parameter(torch.randn(6, generator=g).to(torch.bfloat16), requires_grad=weight_trains)
    x = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    y = matmul(x, w16, b16)
    assert y.dtype == torch.float32 and y.grad_fn.name().startswith("StoredWeightProduct")
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    x32 = x.detach().clone().requires_grad_()
    w32, b32 = w16.detach().float().requires_grad_(), b16.detach().float().requires_grad_()
    F.linear(x32, w32, b32).backward(gy)
    assert torch.allclose(y, F.linear(x32, w32, b32), atol=1e-5)
    assert torch.allclose(x.grad, x32.grad, atol=1e-5)
    if weight_trains:
        assert w16.grad.dtype == torch.bfloat16 and torch.allclose(w16.grad.float(), w32.grad, rtol=1e-2, atol=1e-2)
        assert torch.allclose(b16.grad.float(), b32.grad, rtol=1e-2, atol=1e-2)
    else:
        assert w16.grad is None and b16.grad is None  # frozen weights never get a .grad


def test_frozen_half_weight_saves_only_the_stored_tensor():
    """A LoRA-style step over a frozen bf16 weight with fp32 activations keeps no fp32 copy of the weight
    for backward (the memory a 7B could not afford); the copy made by the old differentiable cast would."""
    w16 = torch.randn(64, 32).to(torch.bfloat16)
    x = torch.randn(4, 32, requires_grad=True)
    saved = saved_during(lambda: matmul(x, w16).sum())
    weight_copies = lambda ts: [t for t in ts if t.dtype == torch.float32 and t.numel() == w16.numel()]  # noqa: E731
    assert not weight_copies(saved) and any(t is w16 for t in saved)
    old = saved_during(lambda: F.linear(x, w16.float()).sum())  # what a differentiable upcast saves
    assert len(weight_copies(old)) == 1


def test_scratch_buffer_reused_across_weights_and_calls():
    clear_scratch()
    layers = [Linear(8, 6).to(torch.bfloat16) for _ in range(3)]
    x = torch.randn(2, 8)
    with torch.no_grad():
        outs = [lin(x) for lin in layers]
        buffers = dict(linear_buffers._scratch.buffers)
        again = [lin(x) for lin in layers]
    assert set(buffers) == {("cast", (6, 8), torch.float32, torch.device("cpu"))}  # one buffer for every [6, 8] weight
    assert all(b is linear_buffers._scratch.buffers[k] for k, b in buffers.items())  # the second pass wrote into the same memory
    for lin, a, b in zip(layers, outs, again):
        assert torch.equal(a, b) and torch.equal(a, reference(x, lin.weight, lin.bias))
    assert all(lin.weight.dtype == torch.bfloat16 for lin in layers)  # storage untouched
    clear_scratch()
    assert not getattr(linear_buffers._scratch, "buffers", None)


def test_norm_and_conv_follow_the_input_dtype():
    ln = LayerNorm(8).to(torch.bfloat16)
    conv = Conv1d(4, 6, kernel_size=3, padding=1).to(torch.bfloat16)
    with torch.no_grad():
        ln.weight.normal_()
        conv.weight.normal_()
    x = torch.randn(2, 8)
    assert ln(x).dtype == torch.float32
    assert torch.allclose(ln(x), F.layer_norm(x, (8,), ln.weight.float(), ln.bias.float()), atol=1e-6)
    s = torch.randn(1, 4, 10)
    assert torch.allclose(conv(s), F.conv1d(s, conv.weight.float(), conv.bias.float(), padding=1), atol=1e-6)


def test_a_scratch_buffer_made_in_inference_mode_serves_outside_it():
    """The kept cast buffer is shared by every call of its shape: one made under `torch.inference_mode` (generate)
    must not break a later `torch.no_grad` product (an in-place write to an inference tensor is refused)."""
    clear_scratch()
    w = torch.randn(6, 8).to(torch.bfloat16)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        a = matmul(x, w)
    with torch.no_grad():
        b = matmul(x, w)
    assert torch.equal(a, b)
    clear_scratch()
