"""The dtype policy (`qva/linear/policy.py`): which dtype products over half weights run in."""


from __future__ import annotations

import pytest
import torch

from qva.demo import random_whisper_encoder
from qva.linear import (
    dtype_policy,
    large_matmul_dtype,
    set_policy,
)
from qva.whisper_encoder import WhisperEncoderConfig


def test_policy_choices(monkeypatch):
    cpu = torch.device("cpu")
    set_policy("float32")
    assert large_matmul_dtype(torch.bfloat16, cpu) == torch.float32
    set_policy("storage")
    assert large_matmul_dtype(torch.bfloat16, cpu) == torch.bfloat16
    set_policy("auto")
    monkeypatch.setattr(dtype_policy, "cpu_has_fast_half_matmul", lambda: False)
    assert large_matmul_dtype(torch.float16, cpu) == torch.float32
    monkeypatch.setattr(dtype_policy, "cpu_has_fast_half_matmul", lambda: True)
    assert large_matmul_dtype(torch.float16, cpu) == torch.float16
    assert large_matmul_dtype(torch.float32, cpu) == torch.float32  # fp32 weights: nothing to decide
    with pytest.raises(ValueError, match="policy must be one of"):
        set_policy("fast")
    set_policy(None)
    monkeypatch.setenv("QVA_COMPUTE_DTYPE", "storage")
    assert large_matmul_dtype(torch.bfloat16, cpu) == torch.bfloat16


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
