"""Quant: activation quantization (as ActNN), for Linear and Conv layers.

The forward is exact. In place of the layer's input X the forward stores Q(X), its k-bit codes
with stochastic rounding (randprop.quantize: one scale and minimum per group of elements,
E[Q(X)] = X), and the weight gradient is computed from the dequantized input:

    Linear: dW = D^T Q(X),    Conv: dW = conv_weight_grad(Q(X), D),

unbiased because both are linear in Q(X). The input gradient (D W, the transposed convolution)
and the bias gradient never read X and are exact. The rounding noise is drawn from
``generator(subseed(seed, SUBSEED_QUANT))`` of the call's seed.

Stored bytes per element: bits / 8, plus 8 bytes (float32 scale and minimum) per group. The
default grouping (group 0) is one group per row of a Linear input's last dimension, and one group
per (sample, channel) plane of a convolution input (chosen by measurement, see :class:`Quant`).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from randprop import random as rnd
from randprop.config import CONV1D, MethodConfig, register, register_layers
from randprop.methods.base import (
    RandomizedConvNd,
    RandomizedLayer,
    autocast_inputs,
    conv_backward,
    conv_forward,
    conv_nd,
    method_config,
    saved_weight,
    weight_to_save,
)
from randprop.methods.projections import Conv1DLayer, MultiheadAttentionLayer
from randprop.quantize import QuantizedTensor, check_bits, quantize_seeded


@register
@dataclasses.dataclass(frozen=True)
class Quant(MethodConfig):
    """Store the layer input in ``bits``-bit codes (stochastic rounding) for the weight gradient.

    bits: 1, 2, 4 or 8 bits per stored element.
    group: elements sharing one scale and minimum (consecutive in the input's row-major order);
    0, the default, is one group per row of a Linear input's last dimension and one per (sample,
    channel) plane of a convolution input. Planes were chosen over fixed groups of 256 by
    measurement (benchmarks/results/quant/groups.md: all convolutions of a model, MNIST batch
    of 64, 2 bits; relative variance E|dW_hat - dW|^2 / |dW|^2): trace-cnn, planes 112,896
    bytes at 0.149 against 98,784 at 0.241; rad-cnn, planes 455,424 bytes at 0.101 against
    465,696 at 0.111 (fp32: 1,404,928 and 6,623,232 bytes).
    """

    name = "quant"
    bits: int = 2
    group: int = 0

    def __post_init__(self) -> None:
        check_bits(self.bits, "quant: bits")
        group = self.group
        if isinstance(group, bool) or not isinstance(group, int) or group < 0:
            raise ValueError(
                "quant: group must be 0 (per row of a Linear input, per (sample, channel) plane "
                f"of a convolution input) or a positive int of elements; got {group!r}"
            )


def linear_group_size(x_shape: torch.Size, cfg: Quant) -> int:
    """Elements per group of a Linear input: ``cfg.group``, or its last dimension (per row)."""
    return cfg.group or max(x_shape[-1], 1)


def conv_group_size(x_shape: torch.Size, cfg: Quant) -> int:
    """Elements per group of a batched convolution input (B, C, *S): ``cfg.group``, or one
    (sample, channel) plane, S's element count."""
    return cfg.group or max(x_shape[2:].numel(), 1)


def _store(
    x: torch.Tensor, cfg: Quant, seed: int | torch.Tensor, group_size: int
) -> QuantizedTensor:
    """Q(x): ``x`` in ``cfg.bits``-bit codes, rounding noise drawn from ``seed``'s quant subseed
    (``seed`` a compiled layer's tensor seed too)."""
    return quantize_seeded([x], cfg.bits, group_size, seed=seed, tag=rnd.SUBSEED_QUANT)[0]


def _save(ctx, weight: torch.Tensor, stored: QuantizedTensor | None) -> None:
    """Save the weight (where D W needs it) and the quantized input's tensors on ``ctx``."""
    ctx.meta = None if stored is None else stored.meta
    ctx.save_for_backward(weight_to_save(ctx, weight), *(() if stored is None else stored.tensors))


def _saved(ctx) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the saved weight, the dequantized input or None)."""
    weight, *tensors = ctx.saved_tensors
    x_hat = QuantizedTensor.rebuild(tensors, ctx.meta).dequantize() if tensors else None
    return weight, x_hat


# --- Linear ---------------------------------------------------------------------------------


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cfg: Quant, seed: int):
        out = F.linear(x, weight, bias)
        stored = None
        if ctx.needs_input_grad[1]:
            stored = _store(x, cfg, seed, linear_group_size(x.shape, cfg))
        _save(ctx, weight, stored)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, x_hat = _saved(ctx)
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad_rows.T @ x_hat.reshape(-1, ctx.x_shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b, None, None


def quant_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    method: Quant | str = "quant",
    seed: int = 0,
) -> torch.Tensor:
    """F.linear whose weight gradient is D^T Q(input), the input stored in k-bit codes rounded
    stochastically with noise drawn from ``seed`` (``method``: a Quant config or its string)."""
    cfg = method_config(method, Quant, "quant_linear")
    x, weight, bias = autocast_inputs(input, weight, bias)
    if x.numel() == 0 or weight.numel() == 0:  # nothing to store: the plain op is exact
        return F.linear(x, weight, bias)
    return _QuantLinearFn.apply(x, weight, bias, cfg, seed)


class QuantLinear(RandomizedLayer, nn.Linear):
    """nn.Linear storing its input in k-bit codes for the weight gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rp_linear(x, self.weight, self.bias)

    def rp_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x weight^T + bias with a k-bit input for the weight gradient (plain F.linear when
        none is needed)."""
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return F.linear(x, weight, bias)
        return quant_linear(x, weight, bias, method=self.rp_method, seed=self.rp_next_seed())


class QuantConv1D(Conv1DLayer):
    """transformers' Conv1D with a k-bit input (combined with the model's Conv1D class)."""

    rp_linear = QuantLinear.rp_linear


class QuantMultiheadAttention(MultiheadAttentionLayer, nn.MultiheadAttention):
    """nn.MultiheadAttention whose in-projection stores a k-bit input (its out_proj is
    converted as a Linear)."""

    rp_linear = QuantLinear.rp_linear


# --- Conv -----------------------------------------------------------------------------------


class _QuantConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cfg: Quant, seed: int, stride, padding, dilation, groups):
        out = conv_forward(ctx, x, weight, bias, stride, padding, dilation, groups)
        stored = None
        if ctx.needs_input_grad[1]:
            stored = _store(x, cfg, seed, conv_group_size(x.shape, cfg))
        _save(ctx, weight, stored)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, x_hat = _saved(ctx)
        weight = saved_weight(ctx, weight, grad_out)
        need_x, need_w = ctx.needs_input_grad[:2]
        need_b = ctx.bias_shape is not None and ctx.needs_input_grad[2]
        # the input and bias gradients never read the input's values: exact whatever x_hat is
        grad_x, grad_w, grad_b = conv_backward(
            grad_out, x_hat, ctx.x_shape, weight, ctx.bias_shape, ctx.conv, [need_x, need_w, need_b]
        )
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _quant_conv(x, weight, bias, stride, padding, dilation, groups, *, cfg: Quant, seed: int):
    """The batched convolution with a quantized stored input (lists of ints, zero padding)."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    if x.numel() == 0 or weight.numel() == 0:  # nothing to store: the plain op is exact
        zeros = [0] * (x.dim() - 2)
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, zeros, groups)
    return _QuantConvFn.apply(x, weight, bias, cfg, seed, stride, padding, dilation, groups)


def _conv(dims: int | None, input, weight, bias, stride, padding, dilation, groups, method, seed):
    core = functools.partial(_quant_conv, cfg=method_config(method, Quant, "quant_conv"), seed=seed)
    return conv_nd(core, dims, input, weight, bias, stride, padding, dilation, groups)


def quant_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: Quant | str = "quant",
    seed: int = 0,
) -> torch.Tensor:
    """Convolution (1d/2d/3d by the rank of ``weight``; arguments as F.conv2d's) whose weight
    gradient reads the input from k-bit codes rounded stochastically with noise from ``seed``."""
    return _conv(None, input, weight, bias, stride, padding, dilation, groups, method, seed)


def quant_conv1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: Quant | str = "quant",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv1d with a quantized stored input (see :func:`quant_conv`)."""
    return _conv(1, input, weight, bias, stride, padding, dilation, groups, method, seed)


def quant_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: Quant | str = "quant",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv2d with a quantized stored input (see :func:`quant_conv`)."""
    return _conv(2, input, weight, bias, stride, padding, dilation, groups, method, seed)


def quant_conv3d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: Quant | str = "quant",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv3d with a quantized stored input (see :func:`quant_conv`)."""
    return _conv(3, input, weight, bias, stride, padding, dilation, groups, method, seed)


class _QuantConvNd(RandomizedConvNd):
    rp_conv = staticmethod(quant_conv)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """nn.Conv1d storing its input in k-bit codes for the weight gradient."""


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """nn.Conv2d storing its input in k-bit codes for the weight gradient."""


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """nn.Conv3d storing its input in k-bit codes for the weight gradient."""


register_layers(
    Quant,
    {
        nn.Linear: QuantLinear,
        nn.Conv1d: QuantConv1d,
        nn.Conv2d: QuantConv2d,
        nn.Conv3d: QuantConv3d,
        CONV1D: QuantConv1D,
        nn.MultiheadAttention: QuantMultiheadAttention,
    },
)
