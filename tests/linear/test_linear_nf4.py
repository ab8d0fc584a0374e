"""NF4 (`qva/linear/nf4.py`): codes and absmax equal bitsandbytes', piecewise dequantization, backward saves only the codes."""


from __future__ import annotations

import pytest
import torch
from conftest import bnb_plain_torch, saved_during
from torch import nn

from qva.linear import (
    Linear,
    nf4,
)


@pytest.mark.parametrize("shape", [(96, 320), (64, 64), (33, 62), (512, 1024)])  # blocks that divide the weight, and ones that do not
def test_nf4_codes_and_absmax_equal_bitsandbytes(shape):
    bnb = pytest.importorskip("bitsandbytes.functional")
    from qva.linear import dynamic_map, nf4_dequantize, nf4_quantize

    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    ours = nf4_quantize(w)
    packed, absmax = bnb_plain_torch("quantize_4bit", w, 64, "nf4", torch.uint8)  # bitsandbytes' quantize_4bit,
    offset = absmax.mean()  # compress_statistics=True: its double quantization of the absmax
    absmax_codes, absmax_scale = bnb_plain_torch("quantize_blockwise", absmax - offset, bnb.create_dynamic_map(), 256)
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map())
    assert torch.equal(ours["weight_nf4"], packed.reshape(-1))
    assert torch.equal(ours["weight_absmax"], absmax_codes)
    assert torch.equal(ours["weight_absmax_scale"], absmax_scale) and torch.equal(ours["weight_absmax_offset"], offset.reshape(1))
    state = bnb.QuantState(absmax=absmax_codes, shape=w.shape, code=bnb.get_4bit_type("nf4", device="cpu"), blocksize=64,
                           quant_type="nf4", dtype=torch.float32, offset=offset,
                           state2=bnb.QuantState(absmax=absmax_scale, code=bnb.create_dynamic_map(), blocksize=256, dtype=torch.float32))
    assert torch.equal(nf4_dequantize(*ours.values(), shape, torch.float32), bnb.dequantize_4bit(packed, state))


def test_nf4_dequantizes_in_pieces_bit_for_bit(monkeypatch):
    """A CPU dequantizes in cache-sized pieces into a kept buffer: the same bits as in one piece, whatever the
    piece size (here 3 blocks, which does not divide the weight's 210), in fp32 and bf16."""
    from qva.linear import nf4_dequantize, nf4_quantize

    w = torch.randn(70, 192, generator=torch.Generator().manual_seed(3)) * 0.05
    q = nf4_quantize(w)
    whole = {dt: nf4_dequantize(*q.values(), w.shape, dt) for dt in (torch.float32, torch.bfloat16)}
    monkeypatch.setattr(nf4, "NF4_CHUNK", 3 * 64)
    for dt, ref in whole.items():
        out = torch.full(w.shape, float("nan"), dtype=dt)
        assert nf4_dequantize(*q.values(), w.shape, dt, out) is out and torch.equal(out, ref)


def test_nf4_requantizing_is_idempotent_and_close():
    from qva.linear import nf4_dequantize, nf4_quantize

    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    q = nf4_quantize(w)
    deq = nf4_dequantize(*q.values(), w.shape, torch.float32)
    again = nf4_quantize(deq)
    assert torch.equal(q["weight_nf4"], again["weight_nf4"])  # every value sits on its level: the same 4-bit codes
    deq2 = nf4_dequantize(*again.values(), w.shape, torch.float32)
    # the absmax are re-quantized around a slightly different mean: within one 8-bit step of the absmax code
    assert (deq2 - deq).abs().max() <= 2e-4 * deq.abs().max()
    assert (again["weight_absmax"].int() - q["weight_absmax"].int()).abs().max() <= 2
    rel = ((deq - w).norm() / w.norm()).item()
    assert 0.03 < rel < 0.15  # 4 bits: ~10% relative error, not exact and not garbage


def test_nf4_saves_only_codes_for_backward_and_stores_about_4_bits():
    from qva.linear import NF4Linear, quantize_nf4_

    lin = NF4Linear.from_linear(Linear(512, 384))
    x = torch.randn(3, 512, requires_grad=True)
    saved = saved_during(lambda: lin(x).sum())
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 512 * 384 // 4]  # no dequantized weight kept
    bits = sum(b.numel() * b.element_size() * 8 for n, b in lin.named_buffers()) / (512 * 384)
    assert 4.1 < bits < 4.2
    model = nn.Sequential(Linear(256, 256), nn.ReLU(), Linear(256, 64))
    x = torch.randn(4, 256)
    want = model(x)
    quantize_nf4_(model)
    assert [type(m).__name__ for m in model] == ["NF4Linear", "ReLU", "NF4Linear"]
    assert ((model(x) - want).norm() / want.norm()) < 0.2
