"""What every converted layer shares: its method config, its seed stream, autocast handling."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from randprop.random import current_rank, derive_seed

if TYPE_CHECKING:
    from randprop.config import MethodConfig


class RandomizedLayer(nn.Module):
    """Mixin of converted layers; ``convert`` swaps a layer's class and sets these attributes.

    The layer keeps its parameters and state_dict keys. A forward call whose gradient the
    method estimates may be needed (grad enabled and the weight requires grad; SparseVJP and
    AOP's input target: also when only the input does) draws a fresh seed
    ``derive_seed(rp_seed, rp_layer, rp_step, rank)`` and advances ``rp_step``; any other call
    (no_grad, inference_mode, a frozen weight) is the plain layer: no seed drawn, nothing
    extra stored. Train / eval mode plays no part: eval() with grad enabled (fine-tuning with
    frozen batch-norm statistics, saliency maps) still estimates. ``rp_layer`` is the stable
    hash of the layer's qualified name (see ``rp.convert``).
    """

    rp_method: MethodConfig
    rp_seed: int = 0
    rp_layer: int = 0
    rp_step: int = 0
    rp_original_class: type

    def rp_next_seed(self) -> int:
        seed = derive_seed(self.rp_seed, self.rp_layer, self.rp_step, current_rank())
        self.rp_step += 1
        return seed

    def rp_needs_weight_grad(self) -> bool:
        """False under no_grad or for a frozen weight (whatever the train / eval mode): then
        the plain forward runs, no seed is drawn and nothing random is stored."""
        return torch.is_grad_enabled() and self.weight.requires_grad

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.rp_method}"


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None when autocast is off."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast floating tensors to the active autocast dtype, as autocast does for matmul and conv.

    The casts are differentiable, so gradients reach the original (e.g. float32) tensors.
    """
    first = next(t for t in tensors if t is not None)
    dtype = autocast_dtype(first.device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


#: (stride, padding, dilation, output_padding, groups) as aten.convolution takes them
ConvArgs = tuple[list[int], list[int], list[int], list[int], int]


def conv_forward(ctx, x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """The exact convolution (1d/2d/3d by the rank of ``x``); records on ``ctx`` what a converted
    convolution's backward needs: ctx.conv, ctx.x_shape, ctx.bias_shape."""
    zeros = [0] * (x.dim() - 2)
    ctx.conv = (stride, padding, dilation, zeros, groups)
    ctx.x_shape = x.shape
    ctx.bias_shape = None if bias is None else list(bias.shape)
    return torch.ops.aten.convolution(
        x, weight, bias, stride, padding, dilation, False, zeros, groups
    )


def conv_backward(grad, x, x_shape, weight, bias_shape, conv: ConvArgs, mask):
    """aten.convolution_backward; when ``x`` is None only its shape is used (the input and bias
    gradients never read the input's values)."""
    stride, padding, dilation, zeros, groups = conv
    if x is None:
        x = grad.new_zeros(()).expand(x_shape)
    return torch.ops.aten.convolution_backward(
        grad, x, weight, bias_shape, stride, padding, dilation, False, zeros, groups, mask
    )


def explicit_padding(conv: nn.modules.conv._ConvNd, x: torch.Tensor):
    """(input, padding) with non-zero padding modes and 'same' applied to the input by F.pad,
    so that the convolution itself only ever sees symmetric zero padding."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return x, (0,) * (x.dim() - 2)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x, (0,) * (x.dim() - 2)
        return F.pad(x, conv._reversed_padding_repeated_twice), (0,) * (x.dim() - 2)
    return x, conv.padding


class RandomizedConvNd(RandomizedLayer):
    """Forward shared by converted convolutions: the plain convolution when no estimate is
    needed, else unbatched input and padding modes handled, then the method's functional form
    ``rp_conv(x, weight, bias, cfg, seed, stride, padding, dilation, groups)``."""

    rp_conv: staticmethod

    def rp_active(self, x: torch.Tensor) -> bool:
        return self.rp_needs_weight_grad()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rp_active(x):
            return self._conv_forward(x, self.weight, self.bias)
        unbatched = x.dim() == self.weight.dim() - 1
        x, padding = explicit_padding(self, x.unsqueeze(0) if unbatched else x)
        seed = self.rp_next_seed()
        conv = type(self).rp_conv
        out = conv(x, self.weight, self.bias, self.rp_method, seed, self.stride, padding,
                   self.dilation, self.groups)  # fmt: skip
        return out.squeeze(0) if unbatched else out
