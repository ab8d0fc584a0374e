"""Compute-dtype policy: half-precision weights stay stored as they are; large products may run in fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qva import compute_dtype
from qva.compute_dtype import large_matmul_dtype, set_policy, upcast
from qva.demo import random_whisper_encoder
from qva.whisper_encoder import WhisperEncoderConfig


@pytest.fixture(autouse=True)
def restore_policy():
    yield
    compute_dtype._policy = None


def test_policy_choices(monkeypatch):
    cpu = torch.device("cpu")
    set_policy("float32")
    assert large_matmul_dtype(torch.bfloat16, cpu) == torch.float32
    set_policy("storage")
    assert large_matmul_dtype(torch.bfloat16, cpu) == torch.bfloat16
    set_policy("auto")
    monkeypatch.setattr(compute_dtype, "cpu_has_fast_half_matmul", lambda: False)
    assert large_matmul_dtype(torch.float16, cpu) == torch.float32
    monkeypatch.setattr(compute_dtype, "cpu_has_fast_half_matmul", lambda: True)
    assert large_matmul_dtype(torch.float16, cpu) == torch.float16
    assert large_matmul_dtype(torch.float32, cpu) == torch.float32  # fp32 weights: nothing to decide
    with pytest.raises(ValueError, match="policy must be one of"):
        set_policy("fast")
    compute_dtype._policy = None
    monkeypatch.setenv("QVA_COMPUTE_DTYPE", "storage")
    assert large_matmul_dtype(torch.bfloat16, cpu) == torch.bfloat16


def test_upcast_restores_stored_weights_and_passes_gradients():
    lin = nn.Linear(4, 3).to(torch.bfloat16)
    stored = lin.weight
    x = torch.randn(2, 4)
    with upcast(lin, dtype=torch.float32):
        assert lin.weight.dtype == torch.float32
        lin(x).sum().backward()
    assert lin.weight is stored and lin.weight.dtype == torch.bfloat16
    assert stored.grad is not None and stored.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("policy,out_dtype", [("float32", torch.float32), ("storage", torch.bfloat16)])
def test_whisper_bf16_weights_both_policies_close_to_fp32(policy, out_dtype):
    cfg = WhisperEncoderConfig(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
    enc32 = random_whisper_encoder(cfg, seed=0, std=0.05)
    enc16 = random_whisper_encoder(cfg, seed=0, std=0.05).to(torch.bfloat16)
    x = torch.randn(1, 80, 3000)
    set_policy(policy)
    with torch.no_grad():
        ref, out = enc32(x), enc16(x)
    assert out.dtype == out_dtype
    assert enc16.conv1.weight.dtype == torch.bfloat16  # storage untouched
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < (0.01 if policy == "float32" else 0.05)  # fp32 compute only suffers the weights' rounding


def test_workspace_reuses_buffers_across_layers_without_autograd():
    layers = [nn.Linear(8, 6).to(torch.bfloat16) for _ in range(3)]
    x = torch.randn(2, 8)
    ws = compute_dtype.Workspace()
    ptrs = []
    with torch.no_grad():
        for lin in layers:
            stored = lin.weight
            with upcast(lin, dtype=torch.float32, workspace=ws):
                assert lin.weight.dtype == torch.float32 and torch.equal(lin.weight, stored.float())
                got = lin(x)
                ptrs.append(lin.weight.data_ptr())
            assert lin.weight is stored
            assert torch.equal(got, torch.nn.functional.linear(x, stored.float(), lin.bias.float()))
    assert len(set(ptrs)) == 1 and len(ws.buffers) == 2  # weight and bias buffers, reused by every layer
    with torch.no_grad(), upcast(nn.Linear(4, 6).to(torch.bfloat16), dtype=torch.float32, workspace=ws):
        pass
    assert ws.buffers[0].shape == (6, 4)  # a different shape replaces the buffer


def test_workspace_not_used_when_recording_gradients():
    lin = nn.Linear(8, 6).to(torch.bfloat16)
    ws = compute_dtype.Workspace()
    with upcast(lin, dtype=torch.float32, workspace=ws):
        lin(torch.randn(2, 8)).sum().backward()
    assert ws.buffers == [] and lin.weight.grad is not None


def test_stack_keeps_its_workspace_between_forwards():
    cfg = WhisperEncoderConfig(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
    enc = random_whisper_encoder(cfg, seed=0, std=0.05).to(torch.bfloat16)
    x = torch.randn(1, 80, 3000)
    set_policy("float32")
    with torch.no_grad():
        first = enc(x)
        ptrs = [b.data_ptr() for b in enc.workspace.buffers]
        second = enc(x)
    assert len(ptrs) == 15  # one layer: q, k (no bias), v, out, fc1, fc2 weights and biases; two layer norms
    assert [b.data_ptr() for b in enc.workspace.buffers] == ptrs  # the second forward wrote into the same memory
    assert torch.equal(first, second)
    enc.workspace.clear()
    assert enc.workspace.buffers == []
