"""Max pooling that saves one byte per output for backward (exact).

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

_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _offset_dtype(window: int) -> torch.dtype:
    return torch.uint8 if window <= 256 else torch.int16 if window <= 32767 else torch.int32


def _window_geometry(out_shape, kernel, stride, padding, dilation, device):
    """Per spatial dim: window starts of the outputs, broadcastable to the output grid."""
    dims = len(kernel)
    starts = []
    for i in range(dims):
        q = torch.arange(out_shape[i], device=device) * stride[i] - padding[i]
        starts.append(q.view(*([1] * i), -1, *([1] * (dims - i - 1))))
    return starts


class _CompactMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        dims = len(kernel)
        out, idx = _POOL[dims](x, kernel, stride, padding, dilation, ceil_mode, True)
        in_sizes, out_sizes = x.shape[-dims:], out.shape[-dims:]
        starts = _window_geometry(out_sizes, kernel, stride, padding, dilation, x.device)
        local = torch.zeros_like(idx)
        rest = idx
        for i in reversed(range(dims)):  # unravel the flat input index, one spatial dim each
            pos = rest % in_sizes[i]
            rest = rest // in_sizes[i]
            k = (pos - starts[i]) // dilation[i]
            local = local + k * _stride_of(kernel, i)
        ctx.save_for_backward(local.to(_offset_dtype(math.prod(kernel))))
        ctx.geometry = (x.shape, kernel, stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (local,) = ctx.saved_tensors
        x_shape, kernel, stride, padding, dilation = ctx.geometry
        dims = len(kernel)
        in_sizes = x_shape[-dims:]
        starts = _window_geometry(
            grad_out.shape[-dims:], kernel, stride, padding, dilation, grad_out.device
        )
        local = local.long()
        flat = torch.zeros_like(local)
        for i in range(dims):
            k = (local // _stride_of(kernel, i)) % kernel[i]
            flat = flat * in_sizes[i] + starts[i] + k * dilation[i]
        planes = x_shape[:-dims].numel()
        grad_x = grad_out.new_zeros(planes, in_sizes.numel())
        grad_x.scatter_add_(1, flat.reshape(planes, -1), grad_out.reshape(planes, -1))
        return grad_x.view(x_shape), None, None, None, None, None


def _stride_of(kernel: tuple[int, ...], i: int) -> int:
    """Row-major stride of kernel dim ``i`` in the flattened window."""
    return math.prod(kernel[i + 1 :])


def compact_max_pool(
    x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False
) -> torch.Tensor:
    """F.max_pool{1,2,3}d (dimension from ``kernel_size`` length or the module) saving one byte
    per output for backward."""
    dims = len(kernel_size)
    stride = _tuple(stride if stride is not None else kernel_size, dims)
    args = (_tuple(padding, dims), _tuple(dilation, dims))
    return _CompactMaxPool.apply(x, tuple(kernel_size), stride, *args, ceil_mode)


class _CompactMaxPoolNd:
    _dims: int

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


COMPACT_POOLS = {
    nn.MaxPool1d: CompactMaxPool1d,
    nn.MaxPool2d: CompactMaxPool2d,
    nn.MaxPool3d: CompactMaxPool3d,
}
