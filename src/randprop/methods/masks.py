"""1-bit activation masks: ReLU and LeakyReLU that save 8 mask elements per byte.

Both are exact: the derivative of ReLU at x is 1[x > 0] and of LeakyReLU 1[x > 0] + a 1[x <= 0],
so one bit per element is all that backward needs instead of a float tensor.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from randprop.methods.base import ConvertedLayer
from randprop.methods.dropout import COMPACT_DROPOUT
from randprop.methods.pooling import COMPACT_POOLS

_SPREAD = 0x0102040810204080


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8, 8 elements per byte (element i of a group is bit i).

    Each group of 8 bools (bytes 0/1) is read as one little-endian int64 with byte k at bit 8k;
    multiplying by 0x0102040810204080 moves byte k to bit 56 + k with no carries (all partial
    products land on distinct bits), so bits 56..63 are the packed byte.
    """
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(torch.uint8).view(-1, 8)
    if torch.compiler.is_compiling():  # the same bytes as shifts and ORs, which fuse
        packed = groups[:, 0]
        for i in range(1, 8):  # (a uint8 sum over the 8 columns compiles to a slow reduction)
            packed = packed | (groups[:, i] << i)
        return packed
    if groups.storage_offset() % 8:  # an int64 view needs 8-byte alignment
        groups = groups.clone()
    if sys.byteorder != "little":
        packed = groups[:, 0].clone()
        for i in range(1, 8):
            packed |= groups[:, i] << i
        return packed
    words = groups.view(torch.int64).squeeze(1)
    return ((words * _SPREAD) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a boolean tensor of ``shape``."""
    numel = shape.numel()
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)  # made there: no copy
    bits = packed.unsqueeze(1) >> shifts
    bits &= 1  # in place, and read as bool without a copy: one byte per element in all
    return bits.view(-1)[:numel].view(shape).view(torch.bool)


class _MaskedLeakyReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, negative_slope: float, inplace: bool) -> torch.Tensor:
        positive = x > 0
        ctx.save_for_backward(pack_bits(positive))
        ctx.shape, ctx.negative_slope = x.shape, negative_slope
        if inplace:
            ctx.mark_dirty(x)
            return F.leaky_relu_(x, negative_slope) if negative_slope else x.relu_()
        return torch.where(positive, x, x * negative_slope) if negative_slope else x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (packed,) = ctx.saved_tensors
        positive = unpack_bits(packed, ctx.shape)
        if not ctx.negative_slope:  # as threshold_backward: the gradient where x > 0, else 0
            return torch.where(positive, grad_out, 0), None, None
        # PyTorch's own backward kernel, fed 1.0 / 0.0 for x > 0 / x <= 0: same semantics
        positive = positive.to(grad_out.dtype)
        grad = torch.ops.aten.leaky_relu_backward(grad_out, positive, ctx.negative_slope, False)
        return grad, None, None


def leaky_relu(
    x: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False
) -> torch.Tensor:
    """LeakyReLU saving a 1-bit mask for backward; same values, gradients and in-place
    behaviour as ``F.leaky_relu``. When no gradient is needed it is ``F.leaky_relu`` itself
    (nothing packed)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.leaky_relu(x, negative_slope, inplace)
    return _MaskedLeakyReLU.apply(x, float(negative_slope), inplace)


def relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """ReLU saving a 1-bit mask for backward; same as ``F.relu`` (in place when ``inplace``).
    When no gradient is needed it is ``F.relu`` itself (nothing packed)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.relu(x, inplace)
    return _MaskedLeakyReLU.apply(x, 0.0, inplace)


class MaskedReLU(ConvertedLayer, nn.ReLU):
    """nn.ReLU whose backward uses a packed 1-bit mask (``inplace`` as in nn.ReLU)."""

    rp_storage = "exact, 1-bit mask"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu(x, self.inplace)


class MaskedLeakyReLU(ConvertedLayer, nn.LeakyReLU):
    """nn.LeakyReLU whose backward uses a packed 1-bit mask (``inplace`` as in nn.LeakyReLU)."""

    rp_storage = "exact, 1-bit mask"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return leaky_relu(x, self.negative_slope, self.inplace)


# exact activation layers with compact storage, swapped in by convert under memory-saving methods
MASKED = {nn.ReLU: MaskedReLU, nn.LeakyReLU: MaskedLeakyReLU, **COMPACT_POOLS, **COMPACT_DROPOUT}
