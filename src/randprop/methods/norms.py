"""Normalisation layers storing the normalised input in k bits for backward.

LayerNorm, RMSNorm (torch's and LLaMA's), BatchNorm 1d/2d/3d and GroupNorm all compute
y = x_hat w + b with x_hat = (x - mean) rstd (RMSNorm: x rstd, no mean), the statistics taken
per row (LayerNorm, RMSNorm), per channel over batch and space (BatchNorm) or per sample and
group (GroupNorm). Forward runs PyTorch's own kernels (native_layer_norm, _fused_rms_norm,
native_batch_norm, native_group_norm: bitwise PyTorch's output and running statistics) and
stores for backward Q(x_hat), the ``bits``-bit code of x_hat from
:func:`randprop.quantize.quantize` (stochastic rounding, seeded), plus rstd per row / channel /
group in float32. PyTorch keeps the whole float input instead (LLaMA's RMSNorm: two float
copies). With g = dY w and the means M[.] over the n elements each statistic covers:

    dW = sum dY x_hat,  dB = sum dY                        (over all but the weight's dims)
    dX = rstd (g - M[g] - x_hat M[g x_hat])                 (RMSNorm: without M[g])

dW and dB are linear in x_hat, so with Q(x_hat) in place of x_hat they are unbiased. dX multiplies
x_hat by a mean that contains x_hat again: with Q = x_hat + e, E[Q_j M[g Q]] = x_hat_j M[g x_hat]
+ g_j Var(e_j) / n, a second-order bias -rstd g_j Var(e_j) / n, of relative size about
Var(e) / n (Var(e) <= s^2 / 4, s the quantization step). Measured (benchmarks/norm_bias.py,
benchmarks/results/quant/norm-bias.md; float64 inputs, 20000 draws): relative bias norm
|E dX - dX| / |dX| over n = 64 is 7e-3 at 2 bits, 3.1e-4 at 4 bits (noise 1.4e-4) and not
resolved at 8 bits (4e-6, noise 9e-6); over n = 768, 1e-3, 6e-5 (unresolved) and 1.2e-5 (noise
7e-6). ``paired=True`` stores two independent codes of x_hat, one for each factor, which makes
dX unbiased (no bias resolved anywhere) for twice the bytes; one code of twice the width is the
better use of those bytes (lower variance, bias unmeasurable), so it is off by default.

Default width :data:`DEFAULT_BITS` = 4, by the same measurement: the rounding adds a variance of
4e-4 of |dX|^2 and 2e-2 of |dW|^2 (n = 64; 6e-5 and 3e-2 at n = 768) and a dX bias of 3e-4
(falling as 1 / n), all far below the variance of the randomized weight-layer estimators beside
it (about 1 to 10), at 0.129 of PyTorch's LayerNorm bytes; 8 bits gives 2e-6 / 7e-5 for 0.254.
Quantization groups are runs of consecutive elements: a row of the normalised dims when it has
at least 64 elements, else the fewest trailing dims that reach 64.

The layers are :class:`~randprop.methods.base.RandomizedLayer`s: rp.convert seeds them from its
seed and their name, activation checkpointing replays their draws (same gradients with and
without checkpointing), and their width is ``bits=`` (construction), else the converting
method's ``bits`` when it has one, else the default. BatchNorm in eval mode (running statistics
used, not updated) is the plain F.batch_norm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from randprop.config import check_seed
from randprop.methods.base import QuantizedLayer, autocast_dtype, needs_grad
from randprop.quantize import QuantizedTensor, check_bits, quantize_seeded
from randprop.random import SUBSEED_QUANT

#: code width of the stored normalised input when none is given (chosen by measurement)
DEFAULT_BITS = 4
#: smallest quantization group (elements sharing one scale and minimum, 8 bytes)
MIN_GROUP = 64


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _group_size(shape: torch.Size) -> int:
    """The product of the fewest trailing dims of ``shape`` that reaches :data:`MIN_GROUP`."""
    size = 1
    for d in reversed(shape):
        size *= d
        if size >= MIN_GROUP:
            break
    return max(size, 1)


class _Layout:
    """How a norm's statistics and weight sit on the input viewed as ``view``: ``reduce``, the
    dims each statistic is taken over; ``stat`` and ``weight``, the shapes rstd and the weight
    broadcast to; ``center``: whether the mean is subtracted (not for RMSNorm)."""

    __slots__ = ("view", "reduce", "stat", "weight", "center")

    def __init__(self, view, reduce, stat, weight, center):
        self.view, self.reduce, self.stat, self.weight = view, reduce, stat, weight
        self.center = center


def _layout(kind: str, shape: torch.Size, norm_dims: int, groups: int) -> _Layout:
    if kind in ("layer", "rms", "llama"):
        n = math.prod(shape[len(shape) - norm_dims :])
        rows = math.prod(shape) // max(n, 1)
        return _Layout((rows, n), (1,), (rows, 1), (1, n), kind == "layer")
    b, c = shape[0], shape[1]
    s = math.prod(shape[2:])
    if kind == "batch":
        return _Layout((b, c, s), (0, 2), (1, c, 1), (1, c, 1), True)
    return _Layout(
        (b, groups, c // groups, s), (2, 3), (b, groups, 1, 1), (1, groups, c // groups, 1), True
    )


def _check_seed(seed: int | torch.Tensor, owner: str) -> int | torch.Tensor:
    """``seed`` as an int (:func:`check_seed`), or a compiled layer's 0-dim tensor seed as it is."""
    return seed if isinstance(seed, torch.Tensor) else check_seed(seed, owner)


class _QuantNorm(torch.autograd.Function):
    """The exact norm forward; saves Q(x_hat) (twice with ``paired``) and rstd; backward by the
    formulas of the module docstring with Q(x_hat) for x_hat."""

    @staticmethod
    def forward(ctx, x, weight, bias, kind, args, bits, seed, stochastic, paired):
        if kind == "layer":
            y, mean, rstd = torch.native_layer_norm(x, args[0], weight, bias, args[1])
            x_hat = torch.sub(_work(x), mean).mul_(rstd)
        elif kind == "rms":
            y, rstd = _rms_norm(x, args[0], weight, args[1])
            x_hat = _work(x) * rstd
        elif kind == "llama":
            x_hat = x.to(torch.float32)
            rstd = torch.rsqrt(x_hat.pow(2).mean(-1, keepdim=True) + args[1])
            x_hat = x_hat * rstd
            y = weight * x_hat.to(x.dtype)
        elif kind == "batch":
            running_mean, running_var, momentum, eps = args
            y, mean, rstd = torch.native_batch_norm(
                x, weight, bias, running_mean, running_var, True, momentum, eps
            )
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x_hat = torch.sub(_work(x), mean.view(shape)).mul_(rstd.view(shape))
        else:  # group
            b, c, groups, eps = x.shape[0], x.shape[1], args[0], args[1]
            s = math.prod(x.shape[2:])
            y, mean, rstd = torch.native_group_norm(x, weight, bias, b, c, s, groups, eps)
            view = _work(x).reshape(b, groups, -1)
            x_hat = torch.sub(view, mean[..., None]).mul_(rstd[..., None]).reshape(x.shape)
        norm_dims = len(args[0]) if kind in ("layer", "rms") else 1
        layout = _layout(kind, x.shape, norm_dims, args[0] if kind == "group" else 1)
        codes = quantize_seeded([x_hat] * (2 if paired else 1), bits, _group_size(x.shape),
                                seed=seed, tag=SUBSEED_QUANT, stochastic=stochastic)  # fmt: skip
        rstd = rstd.to(x_hat.dtype).reshape(layout.stat)
        ctx.save_for_backward(rstd, weight, *(t for q in codes for t in q.tensors))
        ctx.metas = [q.meta for q in codes]
        ctx.layout, ctx.x_dtype, ctx.kind = layout, x.dtype, kind
        ctx.bias = None if bias is None else (bias.shape, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        rstd, weight, *saved = ctx.saved_tensors
        lay: _Layout = ctx.layout
        x_hats = [
            QuantizedTensor.rebuild(saved[3 * i : 3 * i + 3], meta).dequantize().reshape(lay.view)
            for i, meta in enumerate(ctx.metas)
        ]
        dy = grad_out.to(x_hats[0].dtype).reshape(lay.view)
        if ctx.kind == "layer" and len(x_hats) == 1:
            grads = _layer_norm_backward(ctx, dy, x_hats[0], rstd, weight, grad_out.shape)
            return (*grads, *[None] * 6)
        weight_dims = [d for d, size in enumerate(lay.weight) if size == 1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            g = dy if weight is None else dy * weight.to(dy.dtype).reshape(lay.weight)
            inner = x_hats[-1]  # the second, independent code when paired
            mean_gx = (g * inner).mean(lay.reduce, keepdim=True)
            centred = g - g.mean(lay.reduce, keepdim=True) if lay.center else g
            grad_x = (x_hats[0] * mean_gx).neg_().add_(centred).mul_(rstd)  # rstd (c - x m)
            grad_x = grad_x.reshape(grad_out.shape).to(ctx.x_dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            x_hat = x_hats[0] if len(x_hats) == 1 else (x_hats[0] + x_hats[1]) / 2
            grad_w = (dy * x_hat).sum(weight_dims).reshape(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = dy.sum(weight_dims).reshape(ctx.bias[0]).to(ctx.bias[1])
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _layer_norm_backward(ctx, dy, x_hat, rstd, weight, shape):
    """LayerNorm's (dX, dW, dB) by the formulas of the module docstring with Q(x_hat) for x_hat,
    through PyTorch's fused LayerNorm backward fed x = Q(x_hat), mean 0 and rstd 1 (so its
    x_hat is Q(x_hat) and its dX lacks only the factor rstd, applied after): one pass instead
    of about ten."""
    needs = ctx.needs_input_grad
    rows, n = ctx.layout.view
    w = None if weight is None else weight.to(dy.dtype).reshape(n)
    unit = dy.new_ones((rows, 1))
    need_b = ctx.bias is not None and needs[2]
    grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
        dy, x_hat, [n], unit.new_zeros((rows, 1)), unit, w,
        dy.new_empty(n) if need_b else None,  # its shape only: dB = sum dY
        [needs[0], w is not None and needs[1], need_b],
    )  # fmt: skip
    if grad_x is not None:
        grad_x = grad_x.mul_(rstd).reshape(shape).to(ctx.x_dtype)
    if grad_w is not None:
        grad_w = grad_w.reshape(weight.shape).to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.reshape(ctx.bias[0]).to(ctx.bias[1])
    return grad_x, grad_w, grad_b


def _rms_norm(x, normalized_shape, weight, eps):
    """(F.rms_norm's output, rstd) by PyTorch's fused kernel where it exists."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if hasattr(torch.ops.aten, "_fused_rms_norm"):
        return torch.ops.aten._fused_rms_norm(x, list(normalized_shape), weight, eps)
    dims = tuple(range(-len(normalized_shape), 0))
    rstd = torch.rsqrt(_work(x).pow(2).mean(dims, keepdim=True) + eps)
    y = (_work(x) * rstd).to(x.dtype)
    return (y if weight is None else y * weight), rstd


def _apply(x, weight, bias, kind, args, bits, seed, stochastic, paired):
    return _QuantNorm.apply(x, weight, bias, kind, args, bits, seed, stochastic, paired)


def _fp32_under_autocast(*tensors):
    """Autocast runs layer_norm, group_norm and rms_norm in float32: the same casts."""
    first = tensors[0]
    if autocast_dtype(first.device.type) is None:
        return tensors
    return tuple(t if t is None else t.float() for t in tensors)


# --- functional forms ---------------------------------------------------------------------------


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | tuple[int, ...] | list[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    bits: int = DEFAULT_BITS,
    seed: int = 0,
    stochastic: bool = True,
    paired: bool = False,
) -> torch.Tensor:
    """F.layer_norm storing x_hat in ``bits`` bits (stochastic rounding from ``seed``; with
    ``stochastic=False`` round to nearest, biased, for comparison; ``paired``: two independent
    codes, dX unbiased) and rstd per row. Without a gradient to compute it is F.layer_norm."""
    check_bits(bits)
    seed = _check_seed(seed, "layer_norm")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not needs_grad(input, weight, bias) or input.numel() == 0:
        return F.layer_norm(input, shape, weight, bias, eps)
    input, weight, bias = _fp32_under_autocast(input, weight, bias)
    with torch.autocast(input.device.type, enabled=False):
        return _apply(input, weight, bias, "layer", (list(shape), eps), bits, seed, stochastic,
                      paired)  # fmt: skip


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | tuple[int, ...] | list[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    bits: int = DEFAULT_BITS,
    seed: int = 0,
    stochastic: bool = True,
    paired: bool = False,
) -> torch.Tensor:
    """F.rms_norm storing x_hat = x rstd in ``bits`` bits and rstd per row (``seed``,
    ``stochastic``, ``paired`` as in :func:`layer_norm`)."""
    check_bits(bits)
    seed = _check_seed(seed, "rms_norm")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not needs_grad(input, weight) or input.numel() == 0:
        return F.rms_norm(input, shape, weight, eps)
    input, weight = _fp32_under_autocast(input, weight)
    with torch.autocast(input.device.type, enabled=False):
        return _apply(input, weight, None, "rms", (list(shape), eps), bits, seed, stochastic,
                      paired)  # fmt: skip


def llama_rms_norm(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    bits: int = DEFAULT_BITS,
    seed: int = 0,
    stochastic: bool = True,
    paired: bool = False,
) -> torch.Tensor:
    """LLaMA's RMSNorm, ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`` with x32 the
    input in float32, storing x_hat in ``bits`` bits and rstd per row."""
    check_bits(bits)
    seed = _check_seed(seed, "llama_rms_norm")
    if not needs_grad(input, weight) or input.numel() == 0:
        x32 = input.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(input.dtype)
    return _apply(input, weight, None, "llama", ((input.shape[-1],), eps), bits, seed,
                  stochastic, paired)  # fmt: skip


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    bits: int = DEFAULT_BITS,
    seed: int = 0,
    stochastic: bool = True,
    paired: bool = False,
) -> torch.Tensor:
    """F.batch_norm; in training, storing x_hat in ``bits`` bits and rstd per channel, the
    running statistics updated by PyTorch's own kernel (momentum, unbiased running variance).
    Not training (the running statistics used) it is F.batch_norm itself."""
    check_bits(bits)
    seed = _check_seed(seed, "batch_norm")
    if not training or not needs_grad(input, weight, bias) or input.numel() == 0:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.dim() < 2 or input.numel() == input.shape[1]:  # F.batch_norm's own error
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    args = (running_mean, running_var, momentum, eps)
    return _apply(input, weight, bias, "batch", args, bits, seed, stochastic, paired)


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    bits: int = DEFAULT_BITS,
    seed: int = 0,
    stochastic: bool = True,
    paired: bool = False,
) -> torch.Tensor:
    """F.group_norm storing x_hat in ``bits`` bits and rstd per sample and group."""
    check_bits(bits)
    seed = _check_seed(seed, "group_norm")
    plain = not needs_grad(input, weight, bias) or input.numel() == 0 or input.dim() < 2
    if plain or input.shape[1] % num_groups:  # F.group_norm's own error for the latter
        return F.group_norm(input, num_groups, weight, bias, eps)
    input, weight, bias = _fp32_under_autocast(input, weight, bias)
    with torch.autocast(input.device.type, enabled=False):
        return _apply(input, weight, bias, "group", (num_groups, eps), bits, seed, stochastic,
                      paired)  # fmt: skip


# --- layers -------------------------------------------------------------------------------------


class QuantizedNorm(QuantizedLayer):
    """Base of the converted normalisation layers: the normalised input in ``rp_bits()``
    bits."""

    rp_default_bits = DEFAULT_BITS

    @property
    def rp_storage(self) -> str:
        return f"{self.rp_bits()}-bit normalised input + rstd, stochastic rounding"

    def rp_active(self, x: torch.Tensor) -> bool:
        """Stores codes whenever a gradient through the layer is needed."""
        params = (getattr(self, "weight", None), getattr(self, "bias", None))
        return x.is_floating_point() and x.numel() > 0 and needs_grad(x, *params)


class QuantLayerNorm(QuantizedNorm, nn.LayerNorm):
    """nn.LayerNorm storing the normalised input in k bits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rp_active(x):
            return super().forward(x)
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                          bits=self.rp_bits(), seed=self.rp_next_seed())  # fmt: skip


class QuantRMSNorm(QuantizedNorm, nn.RMSNorm):
    """nn.RMSNorm storing the normalised input in k bits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rp_active(x):
            return super().forward(x)
        return rms_norm(x, self.normalized_shape, self.weight, self.eps,
                        bits=self.rp_bits(), seed=self.rp_next_seed())  # fmt: skip


class QuantBatchNorm(QuantizedNorm):
    """BatchNorm (1d/2d/3d) storing the normalised input in k bits in training; the module
    logic (momentum=None cumulative average, num_batches_tracked, batch statistics when no
    running ones are tracked) is nn.BatchNorm's, and eval mode is the plain layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.training or self.running_mean is None and self.running_var is None
        if not training or not self.rp_active(x):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = not self.training or self.track_running_stats
        return batch_norm(
            x,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            True,
            factor,
            self.eps,
            bits=self.rp_bits(),
            seed=self.rp_next_seed(),
        )


class QuantBatchNorm1d(QuantBatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d storing the normalised input in k bits."""


class QuantBatchNorm2d(QuantBatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d storing the normalised input in k bits."""


class QuantBatchNorm3d(QuantBatchNorm, nn.BatchNorm3d):
    """nn.BatchNorm3d storing the normalised input in k bits."""


class QuantGroupNorm(QuantizedNorm, nn.GroupNorm):
    """nn.GroupNorm storing the normalised input in k bits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rp_active(x):
            return super().forward(x)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                          bits=self.rp_bits(), seed=self.rp_next_seed())  # fmt: skip


class QuantLlamaRMSNorm(QuantizedNorm):
    """LLaMA's RMSNorm (and the RMSNorms of the models sharing its code: a 1-d ``weight`` and
    a float ``variance_epsilon``), recognised by :func:`is_llama_rms_norm` and mixed into the
    class it converts (rp.convert's combined_class), storing x_hat in k bits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rp_active(x):
            return super().forward(x)
        return llama_rms_norm(x, self.weight, self.variance_epsilon, bits=self.rp_bits(),
                              seed=self.rp_next_seed())  # fmt: skip


#: torch norm type -> its converted class
NORMS: dict[type, type] = {
    nn.LayerNorm: QuantLayerNorm,
    nn.RMSNorm: QuantRMSNorm,
    nn.BatchNorm1d: QuantBatchNorm1d,
    nn.BatchNorm2d: QuantBatchNorm2d,
    nn.BatchNorm3d: QuantBatchNorm3d,
    nn.GroupNorm: QuantGroupNorm,
}


def is_llama_rms_norm(module: nn.Module) -> bool:
    """Duck typing (transformers is not imported): a class named ``*RMSNorm`` with no
    children, a 1-d Parameter ``weight`` and a float ``variance_epsilon``, as LlamaRMSNorm,
    MistralRMSNorm, Qwen2RMSNorm. (Gemma's, computing with 1 + weight, has ``eps`` instead.)"""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and not isinstance(module, nn.RMSNorm)
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and next(module.children(), None) is None
    )


def norm_class(module: nn.Module) -> type | None:
    """The class rp.convert swaps in for ``module`` (a subclass of its type, or for a norm
    known by duck typing a mixin for combined_class), or None when it is no norm known here."""
    if isinstance(module, QuantizedNorm):
        return None
    if type(module) in NORMS:
        return NORMS[type(module)]
    return QuantLlamaRMSNorm if is_llama_rms_norm(module) else None
