"""Trace: multi-channel randomized trace estimation for convolutions (Louboutin et al., 2021).

A convolution's weight gradient is dW[o,c,k] = sum_b sum_p D[b,o,p] X[b,c,s*p+d*k] (stride s,
dilation d, X the zero-padded input). With probes z_1..z_r and E[z z^T] = I,
X_hat = (1/r) sum_j <z_j, X> z_j has E[X_hat] = X, and dW(X_hat) is unbiased because dW is linear
in X. Forward and input gradient are exact; forward stores only the projections and the seed.

- channels="multi": z_j spans channels and pixels of one example (n = C * spatial); stores
  Xbar[b,j] = <z_j, X[b]> (B x r). dW = (1/r) conv_weight_grad(input=Z, grad=Dt) with
  Dt[j,o,p] = sum_b Xbar[b,j] D[b,o,p]: the r probes are the batch of one weight-gradient call.
- channels="independent": z_j spans the pixels and is shared by the channels; stores
  Xbar[b,c,j] = <z_j, X[b,c]> (B x C x r). dW[o,c,k] = (1/r) sum_{j,b} Xbar[b,c,j] G[b,o,j,k] with
  G[b,o,j,k] = sum_p D[b,o,p] z_j[s*p+d*k], one weight-gradient call with the probes as input
  channels; or, when cheaper, the contraction over b is done first (see _independent_weight_grad).

Probes live on the unpadded grid: zero padding contributes nothing to <z, X>, and the
weight-gradient routine pads the probes with zeros itself, so X_hat is exactly zero on the border
(unbiased, with less variance than probing the padding too). Reflect / replicate / circular padding
are applied to the input first, so the probes span every value the convolution reads ('same'
pads symmetrically, as zero padding, plus one zero column by F.pad where its total is odd). Groups (depthwise included), stride, dilation and bias are passed to the
same routine as the exact convolution uses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from randprop import random as rnd
from randprop.config import (
    MethodConfig,
    check_choice,
    parse_method,
    quiet_field,
    register,
    register_layers,
)
from randprop.methods import kbit
from randprop.methods.base import (
    ConvArgs,
    RandomizedConvNd,
    autocast_inputs,
    conv_backward,
    conv_forward,
    conv_nd,
    method_config,
    saved_weight,
    weight_to_save,
)


@register
@dataclasses.dataclass(frozen=True)
class Trace(MethodConfig):
    """Randomized trace estimation of convolution weight gradients.

    probes: number r of probing vectors (stored values per example: r, or C * r).
    probe: "gaussian", "rademacher" or "orthogonal" (Haar frames, rows orthogonal: less variance).
    channels: "multi" (probes span channels: B x r stored) or "independent" (per channel).
    bits: the stored projections in 1, 2, 4 or 8 bits with stochastic rounding (still unbiased),
        or 32 (full precision); group: values per scale and minimum (0: per row, the r
        projections of an example or channel). See :mod:`randprop.methods.kbit`.
    """

    name = "trace"
    probes: int = 16
    probe: str = "gaussian"
    channels: str = "multi"
    bits: int = quiet_field(32)
    group: int = quiet_field(0)

    def __post_init__(self) -> None:
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 1:
            raise ValueError(f"trace: probes must be a positive integer; got {self.probes!r}")
        check_choice("trace", "probe", self.probe, rnd.PROBES)
        check_choice("trace", "channels", self.channels, ("multi", "independent"))
        kbit.check_storage("trace", self.bits, self.group)


def probe_tensor(
    x_shape: torch.Size, cfg: Trace, seed: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The probes Z for an input of ``x_shape`` (B, C, *S): (r, C, *S) for multi-channel
    probes, (r, 1, *S) for probes shared by the channels. Regenerated from ``seed``."""
    c, spatial = x_shape[1], tuple(x_shape[2:])
    per_probe = (c, *spatial) if cfg.channels == "multi" else (1, *spatial)
    n = torch.Size(per_probe).numel()
    gen = rnd.generator(seed, device)
    return rnd.probes(cfg.probe, (cfg.probes, n), gen, device, dtype).view(cfg.probes, *per_probe)


def _probe_tensor(x_shape, cfg: Trace, seed: int | torch.Tensor, like: torch.Tensor):
    """:func:`probe_tensor` on ``like``'s device and dtype; while compiling (the seed a tensor)
    drawn inside the custom op ``randprop::trace_probes``, opaque to the compiler."""
    if isinstance(seed, torch.Tensor):
        return torch.ops.randprop.trace_probes(like, list(x_shape), seed, str(cfg))
    return probe_tensor(x_shape, cfg, seed, like.device, like.dtype)


_config = functools.lru_cache(maxsize=None)(parse_method)


@torch.library.custom_op("randprop::trace_probes", mutates_args=())
def _probes_op(
    like: torch.Tensor, x_shape: list[int], seed: torch.Tensor, method: str
) -> torch.Tensor:
    return probe_tensor(x_shape, _config(method), int(seed), like.device, like.dtype)


@_probes_op.register_fake
def _(like, x_shape, seed, method) -> torch.Tensor:
    cfg = _config(method)
    per_probe = (x_shape[1], *x_shape[2:]) if cfg.channels == "multi" else (1, *x_shape[2:])
    return like.new_empty(cfg.probes, *per_probe)


def project(x: torch.Tensor, z: torch.Tensor, cfg: Trace) -> torch.Tensor:
    """The stored projections: B x r (multi) or B x C x r (independent)."""
    r = z.shape[0]
    if cfg.channels == "multi":
        return x.reshape(x.shape[0], -1) @ z.reshape(r, -1).T
    return x.reshape(x.shape[0], x.shape[1], -1) @ z.reshape(r, -1).T


def _weight_grad(
    grad: torch.Tensor, inp: torch.Tensor, weight_shape: Sequence[int], conv: ConvArgs
) -> torch.Tensor:
    """conv_weight_grad: dW[o,c,k] = sum_n sum_p grad[n,o,p] inp[n,c,s*p+d*k] (with groups)."""
    stride, padding, dilation, zeros, groups = conv
    dummy = grad.new_zeros(()).expand(weight_shape)
    return torch.ops.aten.convolution_backward(
        grad,
        inp,
        dummy,
        None,
        stride,
        padding,
        dilation,
        False,
        zeros,
        groups,
        [False, True, False],
    )[1]


def multi_weight_grad(
    grad_out: torch.Tensor,
    stored: torch.Tensor,
    z: torch.Tensor,
    weight_shape: Sequence[int],
    conv: ConvArgs,
) -> torch.Tensor:
    """(1/r) conv_weight_grad(Z, Dt), Dt[j] = sum_b Xbar[b,j] D[b]."""
    r, b = z.shape[0], grad_out.shape[0]
    dt = (stored.T @ grad_out.reshape(b, -1)).view(r, *grad_out.shape[1:])
    return _weight_grad(dt, z, weight_shape, conv) / r


def independent_weight_grad(
    grad_out: torch.Tensor,
    stored: torch.Tensor,
    z: torch.Tensor,
    weight_shape: Sequence[int],
    conv: ConvArgs,
    path: str | None = None,
) -> torch.Tensor:
    """(1/r) sum_{j,b} Xbar[b,c,j] sum_p D[b,o,p] z_j[s*p+d*k], restricted to o's group.

    path "probe-input" computes G[b,o,j,k] (probes as the r input channels of one example, the
    B*O output channels from D) and then contracts b and j: about B*O*r*K*(P + C/groups) flops.
    path "batch-first" contracts b first, H[j,(c,o),p] = sum_b Xbar[b,c,j] D[b,o,p], then one
    weight-gradient call with the probes as a batch of r single-channel inputs: about
    O*(C/groups)*r*P*(B + K) flops. None picks the cheaper.
    """
    stride, padding, dilation, zeros, groups = conv
    b, o = grad_out.shape[:2]
    r, c = z.shape[0], stored.shape[1]
    og, cg = o // groups, c // groups
    taps = tuple(weight_shape[2:])
    k, p = math.prod(taps), grad_out.shape[2:].numel()
    if path is None:
        path = "probe-input" if b * (p + cg) < cg * p * (b + k) / k else "batch-first"
    one = (stride, padding, dilation, zeros, 1)
    xbar = stored.view(b, groups, cg, r)
    if path == "probe-input":
        g = _weight_grad(
            grad_out.reshape(1, b * o, *grad_out.shape[2:]),
            z.view(1, r, *z.shape[2:]),
            (b * o, r, *taps),
            one,
        )
        dw = torch.einsum("bgojk,bgcj->gock", g.view(b, groups, og, r, k), xbar)
    elif path == "batch-first":
        d = grad_out.reshape(b, groups, og, p)
        h = torch.einsum("bgcj,bgop->jgcop", xbar, d).reshape(r, groups * cg * og, -1)
        g = _weight_grad(h.view(r, -1, *grad_out.shape[2:]), z, (groups * cg * og, 1, *taps), one)
        dw = g.view(groups, cg, og, k).transpose(1, 2)
    else:
        raise ValueError(f"path must be 'probe-input', 'batch-first' or None; got {path!r}")
    return (dw / r).reshape(weight_shape)


def reconstruct(stored: torch.Tensor, z: torch.Tensor, cfg: Trace) -> torch.Tensor:
    """X_hat = (1/r) sum_j Xbar_j z_j of the input's shape (reference for tests; backward never
    builds it)."""
    r = z.shape[0]
    if cfg.channels == "multi":
        return (stored @ z.reshape(r, -1)).view(stored.shape[0], *z.shape[1:]) / r
    x_hat = stored @ z.reshape(r, -1) / r
    return x_hat.view(*stored.shape[:2], *z.shape[2:])


class _TraceConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cfg: Trace, seed: int, stride, padding, dilation, groups):
        out = conv_forward(ctx, x, weight, bias, stride, padding, dilation, groups)
        stored = None
        if ctx.needs_input_grad[1]:
            stored = project(x, _probe_tensor(x.shape, cfg, seed, x), cfg)
        stored, ctx.stored_meta = kbit.pack(stored, cfg.bits, cfg.group, seed)
        ctx.save_for_backward(*stored, weight_to_save(ctx, weight))
        ctx.cfg, ctx.seed = cfg, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *stored, weight = ctx.saved_tensors
        stored = kbit.unpack(stored, ctx.stored_meta)
        weight = saved_weight(ctx, weight, grad_out)
        need_x, need_w = ctx.needs_input_grad[:2]
        need_b = ctx.bias_shape is not None and ctx.needs_input_grad[2]
        grad_x = grad_w = grad_b = None
        if need_x:
            mask = [True, False, False]
            grad_x = conv_backward(grad_out, None, ctx.x_shape, weight, None, ctx.conv, mask)[0]
        if need_b:
            grad_b = grad_out.sum([0, *range(2, grad_out.dim())])
        if need_w:
            z = _probe_tensor(ctx.x_shape, ctx.cfg, ctx.seed, stored)
            if ctx.cfg.channels == "multi":
                grad_w = multi_weight_grad(grad_out, stored, z, weight.shape, ctx.conv)
            else:
                grad_w = independent_weight_grad(grad_out, stored, z, weight.shape, ctx.conv)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _trace_conv(x, weight, bias, stride, padding, dilation, groups, *, cfg: Trace, seed: int):
    """The batched convolution with trace-estimated weight gradients (lists of ints, zero
    padding)."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    if x.numel() == 0 or weight.numel() == 0:  # nothing to sketch: the plain op is exact
        zeros = [0] * (x.dim() - 2)
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, zeros, groups)
    return _TraceConvFn.apply(x, weight, bias, cfg, seed, stride, padding, dilation, groups)


def _conv(dims: int | None, input, weight, bias, stride, padding, dilation, groups, method, seed):
    cfg = method_config(method, Trace, "trace_conv")
    core = functools.partial(_trace_conv, cfg=cfg, seed=seed)
    return conv_nd(core, dims, input, weight, bias, stride, padding, dilation, groups)


def trace_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: Trace | str = "trace",
    seed: int = 0,
) -> torch.Tensor:
    """Convolution (1d/2d/3d by the rank of ``weight``; arguments as F.conv2d's) whose weight gradient is a trace estimate with probes drawn from ``seed``."""
    return _conv(None, input, weight, bias, stride, padding, dilation, groups, method, seed)


def trace_conv1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: Trace | str = "trace",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv1d whose weight gradient is a trace estimate with probes drawn from ``seed`` (see :func:`trace_conv`)."""
    return _conv(1, input, weight, bias, stride, padding, dilation, groups, method, seed)


def trace_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: Trace | str = "trace",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv2d whose weight gradient is a trace estimate with probes drawn from ``seed`` (see :func:`trace_conv`)."""
    return _conv(2, input, weight, bias, stride, padding, dilation, groups, method, seed)


def trace_conv3d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: Trace | str = "trace",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv3d whose weight gradient is a trace estimate with probes drawn from ``seed`` (see :func:`trace_conv`)."""
    return _conv(3, input, weight, bias, stride, padding, dilation, groups, method, seed)


class _TraceConvNd(RandomizedConvNd):
    rp_conv = staticmethod(trace_conv)


class TraceConv1d(_TraceConvNd, nn.Conv1d):
    """nn.Conv1d with trace-estimated weight gradients."""


class TraceConv2d(_TraceConvNd, nn.Conv2d):
    """nn.Conv2d with trace-estimated weight gradients."""


class TraceConv3d(_TraceConvNd, nn.Conv3d):
    """nn.Conv3d with trace-estimated weight gradients."""


register_layers(Trace, {nn.Conv1d: TraceConv1d, nn.Conv2d: TraceConv2d, nn.Conv3d: TraceConv3d})
