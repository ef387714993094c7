"""Pooling with compact storage for backward (exact): max pooling saves one byte per output,
average pooling saves nothing but the input shape.

PyTorch's max pooling saves its float input and int64 indices (12 bytes per output of a 2x2 pool
plus 4 per input). Its gradient needs only which window element won: for output q of a window of
K <= 256 elements that is a number in [0, K), stored as uint8 (int16 / int32 for larger
windows). Backward rebuilds the input position start(q) + dilation * offset and scatters the
output gradient there, which is exactly what max pooling's backward does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from randprop.methods.base import ConvertedLayer

_POOL = {2: F.max_pool2d, 3: F.max_pool3d}
_POOL_BACKWARD = {
    2: torch.ops.aten.max_pool2d_with_indices_backward,
    3: torch.ops.aten.max_pool3d_with_indices_backward,
}


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _offset_dtype(window: int) -> torch.dtype:
    return torch.uint8 if window <= 256 else torch.int16 if window <= 32767 else torch.int32


def _starts(out_sizes, stride, padding, device) -> list[torch.Tensor]:
    """Per spatial dim: the first input position of each output's window, broadcastable to the
    output grid."""
    dims = len(out_sizes)
    return [
        (torch.arange(o, device=device) * s - p).view(-1, *([1] * (dims - i - 1)))
        for i, (o, s, p) in enumerate(zip(out_sizes, stride, padding, strict=True))
    ]


def _work_dtype(numel: int) -> torch.dtype:
    """Float arithmetic on indices is exact below 2^23 in float32 (2^52 in float64) and far
    faster on CPU than integer division."""
    return torch.float32 if numel < 2**23 else torch.float64


class _CompactMaxPool(torch.autograd.Function):
    """Max pooling over the last 2 or 3 dims; saves the window offset of each maximum."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        dims = len(kernel)
        out, idx = _POOL[dims](x, kernel, stride, padding, dilation, ceil_mode, True)
        in_sizes = x.shape[-dims:]
        starts = _starts(out.shape[-dims:], stride, padding, x.device)
        rest = idx.to(_work_dtype(in_sizes.numel()))
        local = torch.zeros_like(rest)
        for i in reversed(range(dims)):  # unravel the flat index: position in dim i ...
            above = torch.floor(rest / in_sizes[i]) if i else None
            pos = rest - above * in_sizes[i] if i else rest
            # ... minus the window start is an exact multiple of the dilation
            local += (pos - starts[i]) * (math.prod(kernel[i + 1 :]) / dilation[i])
            rest = above
        ctx.save_for_backward(local.to(_offset_dtype(math.prod(kernel))))
        ctx.geometry = (x.shape, kernel, stride, padding, dilation, ceil_mode)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (local,) = ctx.saved_tensors
        x_shape, kernel, stride, padding, dilation, ceil_mode = ctx.geometry
        dims = len(kernel)
        in_sizes = x_shape[-dims:]
        starts = _starts(grad_out.shape[-dims:], stride, padding, grad_out.device)
        rest = local.to(_work_dtype(in_sizes.numel()))
        idx = torch.zeros_like(rest)
        for i in reversed(range(dims)):  # the input position of each window's maximum
            above = torch.floor(rest / kernel[i]) if i else None
            k = rest - above * kernel[i] if i else rest
            idx += (starts[i] + k * dilation[i]) * math.prod(in_sizes[i + 1 :])
            rest = above
        shape_only = grad_out.new_zeros(()).expand(x_shape)  # read for its shape only
        grad_x = _POOL_BACKWARD[dims](
            grad_out, shape_only, kernel, stride, padding, dilation, ceil_mode, idx.long()
        )
        return grad_x, None, None, None, None, None


def compact_max_pool(
    x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False
) -> torch.Tensor:
    """F.max_pool{1,2,3}d (dimension from ``kernel_size`` length or the module) saving one byte
    per output for backward."""
    dims = len(kernel_size)
    stride = _tuple(stride if stride is not None else kernel_size, dims)
    padding, dilation = _tuple(padding, dims), _tuple(dilation, dims)
    if dims == 1:  # as a 2d pool over (1, length)
        args = ((1, *kernel_size), (1, *stride), (0, *padding), (1, *dilation), ceil_mode)
        return _CompactMaxPool.apply(x.unsqueeze(-2), *args).squeeze(-2)
    return _CompactMaxPool.apply(x, tuple(kernel_size), stride, padding, dilation, ceil_mode)


class _CompactMaxPoolNd(ConvertedLayer):
    _dims: int
    rp_storage = "exact, 1-byte window offsets"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.return_indices:  # the caller wants int64 indices anyway
            return super().forward(x)
        d = self._dims
        return compact_max_pool(
            x,
            _tuple(self.kernel_size, d),
            _tuple(self.stride if self.stride else self.kernel_size, d),
            self.padding,
            self.dilation,
            self.ceil_mode,
        )


class CompactMaxPool1d(_CompactMaxPoolNd, nn.MaxPool1d):
    """nn.MaxPool1d saving a 1-byte window offset per output for backward."""

    _dims = 1


class CompactMaxPool2d(_CompactMaxPoolNd, nn.MaxPool2d):
    """nn.MaxPool2d saving a 1-byte window offset per output for backward."""

    _dims = 2


class CompactMaxPool3d(_CompactMaxPoolNd, nn.MaxPool3d):
    """nn.MaxPool3d saving a 1-byte window offset per output for backward."""

    _dims = 3


_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}
_AVG_POOL_BACKWARD = {
    2: torch.ops.aten.avg_pool2d_backward,
    3: torch.ops.aten.avg_pool3d_backward,
}


class _ShapeOnlyAvgPool(torch.autograd.Function):
    """Average pooling is linear: its backward needs the input's shape, never its values
    (PyTorch's own saves the whole float input)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor):
        ctx.geometry = (x.shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
        return _AVG_POOL[len(kernel)](
            x, kernel, stride, padding, ceil_mode, count_include_pad, divisor
        )

    @staticmethod
    def backward(ctx, grad_out):
        x_shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor = ctx.geometry
        shape_only = grad_out.new_zeros(()).expand(x_shape)
        grad_x = _AVG_POOL_BACKWARD[len(kernel)](
            grad_out, shape_only, kernel, stride, padding, ceil_mode, count_include_pad, divisor
        )
        return grad_x, None, None, None, None, None, None


def shape_only_avg_pool(
    x: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> torch.Tensor:
    """F.avg_pool{1,2,3}d (dimension from ``kernel_size`` length) storing nothing for backward."""
    dims = len(kernel_size)
    stride = _tuple(stride if stride else kernel_size, dims)
    padding = _tuple(padding, dims)
    if dims == 1:  # as a 2d pool over (1, length)
        args = ((1, *kernel_size), (1, *stride), (0, *padding), ceil_mode, count_include_pad, None)
        return _ShapeOnlyAvgPool.apply(x.unsqueeze(-2), *args).squeeze(-2)
    args = (ceil_mode, count_include_pad, divisor_override)
    return _ShapeOnlyAvgPool.apply(x, tuple(kernel_size), stride, padding, *args)


class _ShapeOnlyAvgPoolNd(ConvertedLayer):
    _dims: int
    rp_storage = "exact, input shape only"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self._dims
        return shape_only_avg_pool(
            x,
            _tuple(self.kernel_size, d),
            _tuple(self.stride if self.stride else self.kernel_size, d),
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            getattr(self, "divisor_override", None),
        )


class ShapeOnlyAvgPool1d(_ShapeOnlyAvgPoolNd, nn.AvgPool1d):
    """nn.AvgPool1d saving nothing for backward."""

    _dims = 1


class ShapeOnlyAvgPool2d(_ShapeOnlyAvgPoolNd, nn.AvgPool2d):
    """nn.AvgPool2d saving nothing for backward."""

    _dims = 2


class ShapeOnlyAvgPool3d(_ShapeOnlyAvgPoolNd, nn.AvgPool3d):
    """nn.AvgPool3d saving nothing for backward."""

    _dims = 3


COMPACT_POOLS = {
    nn.MaxPool1d: CompactMaxPool1d,
    nn.MaxPool2d: CompactMaxPool2d,
    nn.MaxPool3d: CompactMaxPool3d,
    nn.AvgPool1d: ShapeOnlyAvgPool1d,
    nn.AvgPool2d: ShapeOnlyAvgPool2d,
    nn.AvgPool3d: ShapeOnlyAvgPool3d,
}
