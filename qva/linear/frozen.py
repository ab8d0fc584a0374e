"""What the frozen quantized layers (`nf4.NF4Linear`, `weight_only.Int8Linear` / `Int4Linear`) share: each is
built empty on the meta device shaped like a dense linear (`empty_like`), then either filled from a checkpoint
like any other module or given the buffers its `quantize` makes of a weight and the dense layer's bias
(`from_linear`). The product (`forward`, `dequantized`) is each format's own.
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


class FrozenQuantizedLinear(nn.Module):
    """The base of the frozen quantized layers: a subclass's `__init__(in, out, bias, device, dtype, **options)`
    makes empty buffers, `quantize(weight, **options)` the filled ones; `OPTIONS` names its format options."""

    OPTIONS: tuple[str, ...] = ()

    @staticmethod
    def quantize(weight: torch.Tensor, **options) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def empty_like(cls, linear: nn.Linear, **options) -> "FrozenQuantizedLinear":
        opts = {k: options[k] for k in cls.OPTIONS if k in options}
        return cls(linear.in_features, linear.out_features, linear.bias is not None, "meta", linear.weight.dtype, **opts)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor | None = None, **options) -> "FrozenQuantizedLinear":
        """Quantize `linear`'s weight, or `weight` (read for it: `linear` may be on the meta device); the
        high-precision weight is not kept. The bias is taken as it is."""
        w = (linear.weight if weight is None else weight).detach()
        opts = {k: options[k] for k in cls.OPTIONS if k in options}
        return filled(cls.empty_like(linear, **opts), cls.quantize(w, **opts), linear)
