"""What the frozen quantized layers (`nf4.NF4Linear`, `weight_only.Int8Linear` / `Int4Linear`) share: they are
built empty on the meta device (`empty_like`) and filled with their quantized buffers and the dense layer's
bias (`filled`), or filled from a checkpoint like any other module.
"""

from __future__ import annotations

import torch
from torch import nn


def filled(q: nn.Module, buffers: dict[str, torch.Tensor], linear: nn.Module) -> nn.Module:
    """A quantized linear built empty (on meta) given its quantized `buffers` and `linear`'s bias, frozen."""
    for name, t in buffers.items():
        setattr(q, name, t)
    q.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
    return q
