"""1-bit activation masks: ReLU and LeakyReLU that save 8 mask elements per byte.

Both are exact: the derivative of ReLU at x is 1[x > 0] and of LeakyReLU 1[x > 0] + a 1[x <= 0],
so one bit per element is all that backward needs instead of a float tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from randprop.methods.pooling import COMPACT_POOLS

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8, 8 elements per byte (little-endian bit order)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8)
    packed = bits[:, 0].clone()
    for i in range(1, 8):
        packed |= bits[:, i] << i
    return packed


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a boolean tensor of ``shape``."""
    numel = shape.numel()
    bits = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.view(-1)[:numel].view(shape).bool()


class _MaskedLeakyReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, negative_slope: float) -> torch.Tensor:
        positive = x > 0
        out = torch.where(positive, x, x * negative_slope) if negative_slope else x.clamp_min(0)
        ctx.save_for_backward(pack_bits(positive))
        ctx.shape, ctx.negative_slope = x.shape, negative_slope
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (packed,) = ctx.saved_tensors
        positive = unpack_bits(packed, ctx.shape)
        slope = ctx.negative_slope
        grad = torch.where(positive, grad_out, grad_out * slope if slope else 0.0)
        return grad, None


def relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU saving a 1-bit mask for backward; same values and gradients as ``torch.relu``."""
    return _MaskedLeakyReLU.apply(x, 0.0)


def leaky_relu(x: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    """LeakyReLU saving a 1-bit mask for backward; same as ``F.leaky_relu``."""
    return _MaskedLeakyReLU.apply(x, float(negative_slope))


class MaskedReLU(nn.ReLU):
    """nn.ReLU whose backward uses a packed 1-bit mask (``inplace`` is ignored: the mask is
    what saves memory)."""

    rp_storage = "exact, 1-bit mask"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu(x)


class MaskedLeakyReLU(nn.LeakyReLU):
    """nn.LeakyReLU whose backward uses a packed 1-bit mask."""

    rp_storage = "exact, 1-bit mask"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return leaky_relu(x, self.negative_slope)


# exact activation layers with compact storage, swapped in by convert under memory-saving methods
MASKED = {nn.ReLU: MaskedReLU, nn.LeakyReLU: MaskedLeakyReLU, **COMPACT_POOLS}
