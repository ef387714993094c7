"""Unbiased approximate vector-Jacobian products: sketch the signal flowing backward.

The forward pass is exact. In backward the incoming gradient G of a layer's output is replaced
by S G with E[S] = I, so every VJP and weight gradient computed from it is unbiased, and the
noise propagates down to the layers below (unlike RAD, which only sketches stored inputs).

Sketches at density q (expected fraction of the signal kept), over n "units":
- uniform: keep each unit with probability q, S = diag(m_i / q).
- optimal: p_i = min(1, lambda a_i) with sum_i p_i = q n, a_i = |v_i| (or the norm of a row /
  column); S = diag(m_i / p_i), unit i kept (m_i = 1) with probability p_i. Its expected
  squared error sum_i a_i^2 (1/p_i - 1) is the smallest of all diagonal sketches with that
  expected density.
  Single entries are kept independently (m_i ~ Bernoulli(p_i)); rows and columns by systematic
  sampling over a random order in K = ceil(q n) slots (the same marginals p_i, so the same
  unbiasedness and expected squared error, and every shape independent of the draw: no host
  synchronisation on a GPU).
- lowrank: S = (n/k) P P^T, P a Haar-random n x k orthonormal frame, k = ceil(q n).
- gaussian: S = R R^T / k, R an n x k standard Gaussian matrix.

Units (structure): "element" = single entries (diagonal sketches only), "row" = whole examples
(dim 0), "column" = whole features (last dim of a Linear output) or channels (dim 1 of a conv
output). Rows and columns make the layer's backward GEMMs smaller: with k of n rows kept,
dW = G_k^T X_k and dX_k = G_k W run on k rows only; with columns, on k output features. For
data-independent row sketches (uniform, lowrank, gaussian) the pattern is drawn in the forward
pass, so only the kept rows (or the k projected rows P^T X) of the input are stored; ``bits`` < 32
keeps them in k bits with unbiased stochastic rounding (:mod:`randprop.methods.kbit`).

Every draw is regenerated from the integer seed saved in ctx.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from randprop import random as rnd
from randprop.config import (
    CONV1D,
    MethodConfig,
    check_choice,
    check_fraction,
    parse_method,
    quiet_field,
    register,
    register_layers,
)
from randprop.methods import kbit
from randprop.methods.base import (
    ConvArgs,
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

SKETCHES = ("uniform", "optimal", "lowrank", "gaussian")
PROJECTIONS = ("lowrank", "gaussian")
STRUCTURES = ("element", "row", "column")


@register(aliases=("sparsevjp",))
@dataclasses.dataclass(frozen=True)
class SparseVJP(MethodConfig):
    """Unbiased sketch S (E[S] = I) of the gradient at the outputs of converted layers.

    density: expected fraction q of the backward signal kept, in (0, 1].
    sketch: "uniform", "optimal" (minimal variance), "lowrank" or "gaussian".
    structure: "element", "row" (examples) or "column" (features / channels); the projection
        sketches mix rows or columns, so they need "row" or "column".
    budget: where "optimal" element sketches spend q n: over the whole "tensor" or per "row".
    bits: the stored rows of a row sketch drawn in forward (structure "row", sketch "uniform",
        "lowrank" or "gaussian") in 1, 2, 4 or 8 bits with stochastic rounding (still
        unbiased), or 32 (full precision); group: values per scale and minimum (0: per row).
        See :mod:`randprop.methods.kbit`.
    """

    name = "vjp"
    density: float = 0.25
    sketch: str = "uniform"
    structure: str = "element"
    budget: str = "tensor"
    bits: int = quiet_field(32)
    group: int = quiet_field(0)

    def __post_init__(self) -> None:
        check_fraction("vjp", "density", self.density)
        check_choice("vjp", "sketch", self.sketch, SKETCHES)
        check_choice("vjp", "structure", self.structure, STRUCTURES)
        check_choice("vjp", "budget", self.budget, ("tensor", "row"))
        if self.sketch in PROJECTIONS and self.structure == "element":
            raise ValueError(
                f"vjp: structure must be one of 'row', 'column' with sketch={self.sketch!r}; "
                "got 'element'"
            )
        if self.budget == "row" and (self.sketch, self.structure) != ("optimal", "element"):
            raise ValueError(
                "vjp: budget='row' applies to sketch='optimal', structure='element' only; "
                f"got sketch={self.sketch!r}, structure={self.structure!r}"
            )
        kbit.check_storage("vjp", self.bits, self.group)
        if self.bits != kbit.FULL and not _row_pattern(self):
            raise ValueError(
                "vjp: bits < 32 applies to the stored rows of structure='row' with sketch one of "
                f"'uniform', 'lowrank', 'gaussian'; got sketch={self.sketch!r}, "
                f"structure={self.structure!r}"
            )


# --- the sketches ---------------------------------------------------------------------------


def minimal_variance_probabilities(
    a: torch.Tensor, budget: float, max_steps: int = 16
) -> torch.Tensor:
    """p = min(1, lambda a) along the last dim with sum p = min(budget, #nonzero a), a >= 0.

    This p minimises sum_i a_i^2 (1/p_i - 1) subject to sum p = budget. Vectorised solve by
    Newton's method on the increasing, concave, piecewise-linear f(lambda) = sum_i min(1,
    lambda a_i) - budget from lambda_0 = budget / sum a (where f <= 0): with C the clipped set
    {lambda a >= 1}, lambda <- (budget - |C|) / sum_{i not in C} a_i. Concavity keeps every
    iterate at or below the root, C only grows, and the iteration ends, exact, when C stops
    changing (a few steps in practice: at most 11 on heavy-tailed magnitudes, 10^6 of them).
    It runs ``max_steps`` steps, a fixed count so that nothing is read back to the host (once C
    stops changing, a step changes nothing); where C still grows after them, sum p <= budget:
    the sketch stays unbiased, only slightly short of the budget.
    """
    n = a.shape[-1]
    if not 0 < budget <= n:
        raise ValueError(f"budget must be in (0, n={n}]; got {budget}")
    tiny = torch.finfo(a.dtype).tiny
    support = (a > 0).sum(-1, keepdim=True).to(a.dtype)
    target = support.clamp_max(budget)
    lam = target / a.sum(-1, keepdim=True).clamp_min(tiny)
    clipped = (lam * a >= 1) | ((support <= budget) & (a > 0))  # budget covers the support
    for _ in range(max_steps):
        rest = torch.where(clipped, 0.0, a).sum(-1, keepdim=True)
        lam = (target - clipped.sum(-1, keepdim=True)) / rest.clamp_min(tiny)
        clipped = clipped | (lam * a >= 1)  # monotone also under rounding
    return torch.where(clipped, 1.0, (lam * a).clamp_max(1.0))


def _bernoulli_weights(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """m / p with m ~ Bernoulli(p) elementwise (0 where dropped)."""
    kept = rnd.bernoulli_mask(p.shape, p, gen, p.device)
    return torch.where(kept, p.reciprocal(), 0.0)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else the dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def kept_units(
    n: int, scores: torch.Tensor | None, cfg: SparseVJP, gen: torch.Generator, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of a row / column sketch over n units in K = ceil(q n) slots: unit i
    is kept with probability p_i = q (uniform) or minimal variance for the magnitudes
    ``scores`` (optimal), weighted 1 / p_i, by systematic sampling over a random order
    (:func:`randprop.random.systematic_slots`; sum p <= K); slots left empty have weight 0.
    The fixed K keeps every shape independent of the draw: no host synchronisation."""
    if cfg.sketch == "uniform":
        p = torch.full((n,), cfg.density, dtype=torch.float64, device=device)
    else:
        p = minimal_variance_probabilities(scores.unsqueeze(0), cfg.density * n)[0]
    idx, valid = rnd.systematic_slots(p, min(n, math.ceil(cfg.density * n)), gen)
    return idx, torch.where(valid, p[idx].reciprocal(), 0.0)


def unit_weights(
    n: int, scores: torch.Tensor | None, cfg: SparseVJP, gen: torch.Generator, device
) -> torch.Tensor:
    """Diagonal of S over n units: the weights of :func:`kept_units`, 0 for the others."""
    idx, weights = kept_units(n, scores, cfg, gen, device)
    return weights.new_zeros(n).index_add_(0, idx, weights)


def frame(n: int, cfg: SparseVJP, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """n x k matrix F with E[F F^T] = I, k = ceil(q n): sqrt(n/k) Q (Q Haar orthonormal, for
    lowrank) or R / sqrt(k) (R standard Gaussian)."""
    k = rnd.kept_count(n, cfg.density)
    if cfg.sketch == "gaussian":
        return rnd.projection(n, k, gen, like.device, like.dtype, kind="gaussian")
    q, r = torch.linalg.qr(rnd.gaussian((n, k), gen, like.device, _work_dtype(like.dtype)))
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    return (q * math.sqrt(n / k)).to(like.dtype)


def _norms_except(g: torch.Tensor, dim: int) -> torch.Tensor:
    return g.movedim(dim, 0).reshape(g.shape[dim], -1).to(_work_dtype(g.dtype)).norm(dim=1)


def sketch(g: torch.Tensor, cfg: SparseVJP, seed: int, channel_dim: int = -1) -> torch.Tensor:
    """S g for the sketch of ``cfg`` drawn from ``seed`` (dense result, same shape as ``g``).

    Rows are dim 0 of ``g``, columns ``channel_dim``.
    """
    if g.numel() == 0:
        return g
    gen = rnd.generator(seed, g.device)
    if cfg.structure == "element":
        if cfg.sketch == "uniform":
            mask = rnd.bernoulli_mask(g.shape, cfg.density, gen, g.device)
            return g * mask / cfg.density
        rows = g.reshape(g.shape[0], -1) if cfg.budget == "row" else g.reshape(1, -1)
        a = rows.abs().to(_work_dtype(g.dtype))
        p = minimal_variance_probabilities(a, cfg.density * a.shape[-1])
        return g * _bernoulli_weights(p, gen).to(g.dtype).view_as(g)
    dim = 0 if cfg.structure == "row" else channel_dim % g.dim()
    n = g.shape[dim]
    if cfg.sketch in PROJECTIONS:
        f = frame(n, cfg, gen, g)
        return ((g.movedim(dim, -1) @ f) @ f.T).movedim(-1, dim)
    scores = None if cfg.sketch == "uniform" else _norms_except(g, dim)
    shape = [1] * g.dim()
    shape[dim] = n
    return g * unit_weights(n, scores, cfg, gen, g.device).to(g.dtype).view(shape)


class _SketchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cfg: SparseVJP, seed: int, channel_dim: int):
        ctx.cfg, ctx.seed, ctx.channel_dim = cfg, seed, channel_dim
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return sketch(grad, ctx.cfg, ctx.seed, ctx.channel_dim), None, None, None


def sparse_vjp(
    x: torch.Tensor, method: SparseVJP | str, seed: int, channel_dim: int = -1
) -> torch.Tensor:
    """Identity in forward; backward applies the unbiased sketch S of ``method`` (a SparseVJP
    config or its string form, seeded by ``seed``) to the incoming gradient. Rows are dim 0,
    columns ``channel_dim``."""
    cfg = method_config(method, SparseVJP, "sparse_vjp")
    return _SketchFn.apply(x, cfg, seed, channel_dim)


def _row_pattern(cfg: SparseVJP) -> bool:
    """Row sketches whose pattern does not depend on the gradient, so forward can draw it."""
    return cfg.structure == "row" and cfg.sketch != "optimal"


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, idx)


def _project_rows(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """F^T x over dim 0: (n x k), (n, ...) -> (k, ...)."""
    return (f.T @ x.reshape(x.shape[0], -1)).view(f.shape[1], *x.shape[1:])


def _lift_rows(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F y over dim 0: (n x k), (k, ...) -> (n, ...)."""
    return (f @ y.reshape(y.shape[0], -1)).view(f.shape[0], *y.shape[1:])


def _stored_input(x: torch.Tensor, cfg: SparseVJP, seed: int | torch.Tensor) -> torch.Tensor:
    """What a fused layer keeps of its input: the kept rows, P^T X, or all of X (drawn inside
    the custom op ``randprop::vjp_stored_input`` for a compiled layer's tensor seed)."""
    if not _row_pattern(cfg):
        return x
    if isinstance(seed, torch.Tensor):
        return torch.ops.randprop.vjp_stored_input(x, seed, str(cfg))
    gen = rnd.generator(seed, x.device)
    if cfg.sketch == "uniform":
        return _rows(x, kept_units(x.shape[0], None, cfg, gen, x.device)[0])
    return _project_rows(frame(x.shape[0], cfg, gen, x), x)


# --- Linear ---------------------------------------------------------------------------------


class _VJPLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cfg: SparseVJP, seed: int):
        out = F.linear(x, weight, bias)
        stored = _stored_input(x, cfg, seed) if ctx.needs_input_grad[1] else None
        stored, ctx.stored_meta = kbit.pack(stored, cfg.bits, cfg.group, seed)
        ctx.save_for_backward(*stored, weight_to_save(ctx, weight))
        ctx.cfg, ctx.seed, ctx.x_shape = cfg, seed, x.shape
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        *stored, weight = ctx.saved_tensors
        stored = kbit.unpack(stored, ctx.stored_meta)
        weight = saved_weight(ctx, weight, grad)
        need = [*ctx.needs_input_grad[:2], ctx.has_bias and ctx.needs_input_grad[2]]
        if isinstance(ctx.seed, torch.Tensor):  # compiled: the draws inside an opaque op
            grads = torch.ops.randprop.vjp_linear_backward(
                grad, stored, weight, list(ctx.x_shape), need, ctx.seed, str(ctx.cfg))  # fmt: skip
            return *_placed(grads, need), None, None
        grads = linear_backward(grad, stored, weight, ctx.x_shape, need, ctx.cfg, ctx.seed)
        return *grads, None, None


def linear_backward(
    grad: torch.Tensor,
    stored: torch.Tensor | None,
    weight: torch.Tensor,
    x_shape: Sequence[int],
    need: Sequence[bool],
    cfg: SparseVJP,
    seed: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX, dW, db) of :func:`vjp_linear`, each where ``need`` says, from the output gradient
    ``grad`` sketched with ``seed`` and what forward stored of the input."""
    need_x, need_w, need_b = need
    n_out, n_in = weight.shape
    gen = rnd.generator(seed, grad.device)
    grad_x = grad_w = grad_b = None
    if cfg.structure == "element":
        g = sketch(grad, cfg, seed)
        x = stored
    elif cfg.structure == "row" and cfg.sketch in PROJECTIONS:
        f = frame(grad.shape[0], cfg, gen, grad)
        gp = _project_rows(f, grad)  # F^T G: (k, ..., out); S G = F gp
        if need_x:
            grad_x = _lift_rows(f, gp @ weight)
        if need_w:
            grad_w = gp.reshape(-1, n_out).T @ stored.reshape(-1, n_in)
        if need_b:
            grad_b = (f.sum(0) @ gp.reshape(f.shape[1], -1)).view(-1, n_out).sum(0)
        return grad_x, grad_w, grad_b
    elif cfg.structure == "row":
        scores = None if cfg.sketch == "uniform" else _norms_except(grad, 0)
        idx, scale = kept_units(grad.shape[0], scores, cfg, gen, grad.device)
        g = _rows(grad, idx) * scale.to(grad.dtype).view(-1, *[1] * (grad.dim() - 1))
        x = stored if cfg.sketch == "uniform" or stored is None else _rows(stored, idx)
        if need_x:
            grad_x = grad.new_zeros(x_shape).index_add_(0, idx, g @ weight)
        need_x = False
    elif cfg.sketch in PROJECTIONS:  # columns: S = F F^T over output features
        f = frame(n_out, cfg, gen, grad)
        gp = grad @ f
        if need_x:
            grad_x = gp @ (f.T @ weight)
        if need_w:
            grad_w = f @ (gp.reshape(-1, f.shape[1]).T @ stored.reshape(-1, n_in))
        if need_b:
            grad_b = f @ gp.reshape(-1, f.shape[1]).sum(0)
        return grad_x, grad_w, grad_b
    else:  # columns, diagonal: only the kept output features
        scores = None if cfg.sketch == "uniform" else _norms_except(grad, grad.dim() - 1)
        idx, scale = kept_units(n_out, scores, cfg, gen, grad.device)
        g = grad.index_select(-1, idx) * scale.to(grad.dtype)
        g2 = g.flatten(0, -2)
        if need_x:
            grad_x = g @ weight.index_select(0, idx)
        if need_w:
            grad_w = weight.new_zeros(weight.shape).index_add_(
                0, idx, g2.T @ stored.reshape(-1, n_in)
            )
        if need_b:
            grad_b = grad.new_zeros(n_out).index_add_(0, idx, g2.sum(0))
        return grad_x, grad_w, grad_b
    g2 = g.reshape(-1, n_out)
    if need_x:
        grad_x = g @ weight
    if need_w:
        grad_w = g2.T @ x.reshape(-1, n_in)
    if need_b:
        grad_b = g2.sum(0)
    return grad_x, grad_w, grad_b


def vjp_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    method: SparseVJP | str = "vjp",
    seed: int = 0,
) -> torch.Tensor:
    """F.linear whose output gradient is sketched (``sparse_vjp``) before its own backward,
    which then runs only on the kept rows / columns. Rows are dim 0 of ``input``."""
    cfg = method_config(method, SparseVJP, "vjp_linear")
    x, weight, bias = autocast_inputs(input, weight, bias)
    if x.numel() == 0 or weight.numel() == 0:  # nothing to sketch: the plain op is exact
        return F.linear(x, weight, bias)
    if x.dim() == 1:
        return _VJPLinearFn.apply(x.unsqueeze(0), weight, bias, cfg, seed)[0]
    return _VJPLinearFn.apply(x, weight, bias, cfg, seed)


def _needs_sketch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """False in eval / no_grad or when nothing upstream wants a gradient: then the plain
    forward runs and no seed is drawn."""
    params = (p for p in (weight, bias) if p is not None)
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


class VJPLinear(RandomizedLayer, nn.Linear):
    """nn.Linear whose output gradient passes through an unbiased SparseVJP sketch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rp_linear(x, self.weight, self.bias)

    def rp_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x weight^T + bias with its output gradient sketched (plain F.linear when no
        gradient is needed)."""
        if not _needs_sketch(x, weight, bias):
            return F.linear(x, weight, bias)
        seed = self.rp_next_seed()
        return vjp_linear(x, weight, bias, method=self.rp_method, seed=seed)


class VJPConv1D(Conv1DLayer):
    """transformers' Conv1D whose output gradient passes through an unbiased SparseVJP sketch
    (combined with the model's Conv1D class)."""

    rp_linear = VJPLinear.rp_linear


class VJPMultiheadAttention(MultiheadAttentionLayer, nn.MultiheadAttention):
    """nn.MultiheadAttention whose in-projection's output gradient passes through an unbiased
    SparseVJP sketch (its out_proj is converted as a Linear)."""

    rp_linear = VJPLinear.rp_linear


# --- Conv -----------------------------------------------------------------------------------


class _VJPConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cfg: SparseVJP, seed: int, stride, padding, dilation, groups):
        out = conv_forward(ctx, x, weight, bias, stride, padding, dilation, groups)
        stored = _stored_input(x, cfg, seed) if ctx.needs_input_grad[1] else None
        stored, ctx.stored_meta = kbit.pack(stored, cfg.bits, cfg.group, seed)
        ctx.save_for_backward(*stored, weight_to_save(ctx, weight))
        ctx.cfg, ctx.seed = cfg, seed
        return out

    @staticmethod
    def backward(ctx, grad):
        *stored, weight = ctx.saved_tensors
        stored = kbit.unpack(stored, ctx.stored_meta)
        weight = saved_weight(ctx, weight, grad)
        need = [*ctx.needs_input_grad[:2], ctx.bias_shape is not None and ctx.needs_input_grad[2]]
        rest = (None,) * 7
        if isinstance(ctx.seed, torch.Tensor):  # compiled: the draws inside an opaque op
            stride, padding, dilation, _, groups = ctx.conv
            grads = torch.ops.randprop.vjp_conv_backward(
                grad, stored, weight, list(ctx.x_shape), ctx.bias_shape, stride, padding,
                dilation, groups, need, ctx.seed, str(ctx.cfg))  # fmt: skip
            return *_placed(grads, need), *rest
        args = (ctx.x_shape, ctx.bias_shape, ctx.conv, need, ctx.cfg, ctx.seed)
        return *conv_backward_sketched(grad, stored, weight, *args), *rest


def conv_backward_sketched(
    grad: torch.Tensor,
    stored: torch.Tensor | None,
    weight: torch.Tensor,
    x_shape: Sequence[int],
    bias_shape: Sequence[int] | None,
    conv: ConvArgs,
    need: Sequence[bool],
    cfg: SparseVJP,
    seed: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX, dW, db) of :func:`vjp_conv`, each where ``need`` says, from the output gradient
    ``grad`` sketched with ``seed`` and what forward stored of the input."""
    need_x, need_w, need_b = need
    gen = rnd.generator(seed, grad.device)
    if cfg.structure == "element" or (cfg.structure == "column" and conv[4] != 1):
        g = sketch(grad, cfg, seed, channel_dim=1)
        out = conv_backward(g, stored, x_shape, weight, bias_shape, conv, [need_x, need_w, need_b])
        return out
    if cfg.structure == "row" and cfg.sketch in PROJECTIONS:
        f = frame(grad.shape[0], cfg, gen, grad)
        gp = _project_rows(f, grad)
        k_shape = (f.shape[1], *x_shape[1:])
        gx, gw, _ = conv_backward(gp, stored, k_shape, weight, None, conv, [need_x, need_w, False])
        gb = None
        if need_b:
            gb = (f.sum(0) @ gp.reshape(f.shape[1], -1)).view(gp.shape[1], -1).sum(1)
        return (None if gx is None else _lift_rows(f, gx), gw, gb)
    if cfg.structure == "row":
        scores = None if cfg.sketch == "uniform" else _norms_except(grad, 0)
        idx, scale = kept_units(grad.shape[0], scores, cfg, gen, grad.device)
        g = _rows(grad, idx) * scale.to(grad.dtype).view(-1, *[1] * (grad.dim() - 1))
        x = stored if cfg.sketch == "uniform" or stored is None else _rows(stored, idx)
        gx, gw, gb = conv_backward(
            g,
            x,
            (idx.numel(), *x_shape[1:]),
            weight,
            bias_shape,
            conv,
            [need_x, need_w, need_b],
        )
        if gx is not None:
            gx = grad.new_zeros(x_shape).index_add_(0, idx, gx)
        return (gx, gw, gb)
    n_out = weight.shape[0]
    if cfg.sketch in PROJECTIONS:  # columns (channels), S = F F^T
        f = frame(n_out, cfg, gen, grad)
        gp = (grad.movedim(1, -1) @ f).movedim(-1, 1)
        wp = (f.T @ weight.reshape(n_out, -1)).view(f.shape[1], *weight.shape[1:])
        bias_k = None if not need_b else [f.shape[1]]
        gx, gw, gb = conv_backward(gp, stored, x_shape, wp, bias_k, conv, [need_x, need_w, need_b])
        if gw is not None:
            gw = (f @ gw.reshape(f.shape[1], -1)).view_as(weight)
        return (gx, gw, None if gb is None else f @ gb)
    scores = None if cfg.sketch == "uniform" else _norms_except(grad, 1)
    idx, scale = kept_units(n_out, scores, cfg, gen, grad.device)
    g = grad.index_select(1, idx) * scale.to(grad.dtype).view(-1, *[1] * (grad.dim() - 2))
    gx, gw, gb = conv_backward(
        g,
        stored,
        x_shape,
        weight.index_select(0, idx),
        None if not need_b else [idx.numel()],
        conv,
        [need_x, need_w, need_b],
    )
    if gw is not None:
        gw = torch.zeros_like(weight).index_add_(0, idx, gw)
    if gb is not None:
        gb = grad.new_zeros(n_out).index_add_(0, idx, gb)
    return (gx, gw, gb)


def _vjp_conv(x, weight, bias, stride, padding, dilation, groups, *, cfg: SparseVJP, seed: int):
    """The batched convolution with a sketched output gradient (lists of ints, zero padding)."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    if x.numel() == 0 or weight.numel() == 0:  # nothing to sketch: the plain op is exact
        zeros = [0] * (x.dim() - 2)
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, zeros, groups)
    return _VJPConvFn.apply(x, weight, bias, cfg, seed, stride, padding, dilation, groups)


def _conv(dims: int | None, input, weight, bias, stride, padding, dilation, groups, method, seed):
    cfg = method_config(method, SparseVJP, "vjp_conv")
    core = functools.partial(_vjp_conv, cfg=cfg, seed=seed)
    return conv_nd(core, dims, input, weight, bias, stride, padding, dilation, groups)


def vjp_conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: SparseVJP | str = "vjp",
    seed: int = 0,
) -> torch.Tensor:
    """Convolution (1d/2d/3d by the rank of ``weight``; arguments as F.conv2d's) whose output gradient is sketched before its own backward; rows are examples, columns output channels (channel structure needs groups=1 for the smaller GEMMs; with groups > 1 the sketch is applied densely)."""
    return _conv(None, input, weight, bias, stride, padding, dilation, groups, method, seed)


def vjp_conv1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: SparseVJP | str = "vjp",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv1d whose output gradient is sketched before its own backward (see :func:`vjp_conv`)."""
    return _conv(1, input, weight, bias, stride, padding, dilation, groups, method, seed)


def vjp_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: SparseVJP | str = "vjp",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv2d whose output gradient is sketched before its own backward (see :func:`vjp_conv`)."""
    return _conv(2, input, weight, bias, stride, padding, dilation, groups, method, seed)


def vjp_conv3d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: str | int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    *,
    method: SparseVJP | str = "vjp",
    seed: int = 0,
) -> torch.Tensor:
    """F.conv3d whose output gradient is sketched before its own backward (see :func:`vjp_conv`)."""
    return _conv(3, input, weight, bias, stride, padding, dilation, groups, method, seed)


class _VJPConvNd(RandomizedConvNd):
    rp_conv = staticmethod(vjp_conv)

    def rp_active(self, x: torch.Tensor) -> bool:
        return _needs_sketch(x, self.weight, self.bias)


class VJPConv1d(_VJPConvNd, nn.Conv1d):
    """nn.Conv1d whose output gradient passes through an unbiased SparseVJP sketch."""


class VJPConv2d(_VJPConvNd, nn.Conv2d):
    """nn.Conv2d whose output gradient passes through an unbiased SparseVJP sketch."""


class VJPConv3d(_VJPConvNd, nn.Conv3d):
    """nn.Conv3d whose output gradient passes through an unbiased SparseVJP sketch."""


register_layers(
    SparseVJP,
    {
        nn.Linear: VJPLinear,
        nn.Conv1d: VJPConv1d,
        nn.Conv2d: VJPConv2d,
        nn.Conv3d: VJPConv3d,
        CONV1D: VJPConv1D,
        nn.MultiheadAttention: VJPMultiheadAttention,
    },
)


# --- the draws as custom ops, for torch.compile ----------------------------------------------
#
# While torch.compile traces, a layer's seed is a 0-dim int64 tensor (see
# RandomizedLayer.rp_next_seed). The forward's row draw and the whole sketched backward run
# inside these ops, opaque to the compiler; each reads the seed and calls the eager function
# above, so compiled and eager runs draw bitwise the same numbers. The config travels as a string.

_config = functools.lru_cache(maxsize=None)(parse_method)


def _placed(grads: list[torch.Tensor], need: Sequence[bool]) -> tuple[torch.Tensor | None, ...]:
    """An op's gradients (those needed, in order) in their slots, None in the others."""
    it = iter(grads)
    return tuple(next(it) if n else None for n in need)


def _needed(grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    return [g for g in grads if g is not None]


@torch.library.custom_op("randprop::vjp_stored_input", mutates_args=())
def _stored_input_op(x: torch.Tensor, seed: torch.Tensor, method: str) -> torch.Tensor:
    return _stored_input(x, _config(method), int(seed))


@_stored_input_op.register_fake
def _(x, seed, method) -> torch.Tensor:
    cfg, n = _config(method), x.shape[0]
    k = min(n, math.ceil(cfg.density * n)) if cfg.sketch == "uniform" else None
    return x.new_empty(k or rnd.kept_count(n, cfg.density), *x.shape[1:])


@torch.library.custom_op("randprop::vjp_linear_backward", mutates_args=())
def _linear_backward_op(
    grad: torch.Tensor,
    stored: torch.Tensor | None,
    weight: torch.Tensor,
    x_shape: list[int],
    need: list[bool],
    seed: torch.Tensor,
    method: str,
) -> list[torch.Tensor]:
    return _needed(linear_backward(grad, stored, weight, x_shape, need, _config(method), int(seed)))


@_linear_backward_op.register_fake
def _(grad, stored, weight, x_shape, need, seed, method) -> list[torch.Tensor]:
    shapes = (x_shape, weight.shape, weight.shape[:1])
    return [grad.new_empty(shape) for shape, n in zip(shapes, need, strict=True) if n]


@torch.library.custom_op("randprop::vjp_conv_backward", mutates_args=())
def _conv_backward_op(
    grad: torch.Tensor,
    stored: torch.Tensor | None,
    weight: torch.Tensor,
    x_shape: list[int],
    bias_shape: list[int] | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    need: list[bool],
    seed: torch.Tensor,
    method: str,
) -> list[torch.Tensor]:
    conv = (stride, padding, dilation, [0] * len(stride), groups)
    grads = conv_backward_sketched(grad, stored, weight, x_shape, bias_shape, conv, need,
                                   _config(method), int(seed))  # fmt: skip
    return _needed(grads)


@_conv_backward_op.register_fake
def _(grad, stored, weight, x_shape, bias_shape, stride, padding, dilation, groups, need, seed,
      method) -> list[torch.Tensor]:  # fmt: skip
    shapes = (x_shape, weight.shape, bias_shape)
    return [grad.new_empty(shape) for shape, n in zip(shapes, need, strict=True) if n]
