"""Unbiased column-row sampling (CRS) with winners kept exactly (as WTA-CRS), for Linear layers.

Every leading position of the input is one row: dW = D^T X = sum_i d_i x_i^T over N rows. The
rows are chosen in forward, before D is known, on the scores s_i = |x_i| h_t(i), where h is a
running estimate of the output-gradient norm |d_i| at position t (positions: the leading
dimensions after the first, e.g. the tokens of a (B, T, n) input; a single value for (B, n),
where the scores reduce to |x_i|). With K = ceil(keep x N):

- winners: the W highest-score rows, W >= floor(winners x K) and just large enough that no
  probability below exceeds 1; they are kept with weight 1 (W < K: with winners in [0, 1) at
  least one row is sampled; a top-K without sampled rows would be biased);
- the other K - W rows are drawn without replacement from the rest R with inclusion
  probabilities p_i = (K - W) s_i / sum_R s (systematic sampling), each weighted by 1 / p_i.

So dW_hat = sum_winners d_i x_i^T + sum_sampled d_i x_i^T / p_i and E[dW_hat | h] = dW. Only the
K chosen rows of X are stored (with their indices and weights), about keep x the bytes of X, and
the weight gradient is one GEMM over those K rows. Forward, input and bias gradients are exact.

The estimate h is the buffer ``crs_grad_norm`` (one value per position, created on the first
training forward): an exponential moving average, with ``momentum``, of the batch mean of |d_i|
per position, updated when the weight's gradient is computed (``loss.backward()``, not
``torch.autograd.grad(loss, x)``). Until the first update it is zero and the scores are |x_i|;
it is floored at 1% of its mean, so that a stale estimate never makes a probability vanish. A
batch whose positions have another shape resets it. It is layer state out of the state_dict
(which keeps the plain layer's keys; loading one resets it), carried by ``rp.method_state``.
``reset_memory()`` forgets it; ``rp.restore`` removes it. Under no_grad or for a frozen weight
the layer is a plain nn.Linear: no seed is drawn, nothing is stored.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from randprop import random as rnd
from randprop.config import (
    CONV1D,
    MethodConfig,
    check_fraction,
    quiet_field,
    register,
    register_layers,
)
from randprop.methods import kbit
from randprop.methods.base import (
    Handoff,
    LayerState,
    RandomizedLayer,
    autocast_inputs,
    method_config,
    weight_node,
)
from randprop.methods.projections import Conv1DLayer


@register
@dataclasses.dataclass(frozen=True)
class CRS(MethodConfig):
    """Unbiased column-row sampling: store K = keep x N rows of X, winners kept exactly.

    keep: fraction of rows stored, in (0, 1].
    winners: least fraction of the K rows kept deterministically (highest scores), in [0, 1).
        The default 0 keeps exactly the rows whose probability K s_i / sum s would exceed 1:
        p_i = min(1, lambda s_i) minimises sum_i a_i^2 / p_i at sum_i p_i = K, the variance
        when the scores are proportional to a_i = |x_i| |d_i|, so more winners can only add
        variance there (measured: benchmarks/results/transformer-layer-speed.md; 0.5 doubled
        it on rows of similar norm).
    momentum: of the running estimate of output-gradient norms, in [0, 1).
    bits: the K stored rows in 1, 2, 4 or 8 bits with stochastic rounding (still unbiased), or
        32 (full precision); group: values per scale and minimum (0: per row). See
        :mod:`randprop.methods.kbit`.
    """

    name = "crs"
    keep: float = 0.3
    winners: float = 0.0
    momentum: float = 0.9
    bits: int = quiet_field(32)
    group: int = quiet_field(0)

    def __post_init__(self) -> None:
        check_fraction("crs", "keep", self.keep)
        for field, value, why in (
            ("winners", self.winners, " (1 keeps only the top K rows: a biased estimate)"),
            ("momentum", self.momentum, ""),
        ):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not 0 <= value < 1:
                raise ValueError(f"crs: {field} must be a number in [0, 1){why}; got {value!r}")
        kbit.check_storage("crs", self.bits, self.group)


class CRSState(LayerState):
    """Holder of the running gradient-norm estimate for the functional form :func:`crs_linear`."""

    rp_buffers = ("crs_grad_norm",)


def choose_rows(
    scores: torch.Tensor, k: int, winners: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of the K rows stored: the winners with weight 1, then the sampled rows
    with weight 1 / p_i (``scores``: 1-D, non-negative; ``winners``: the least winner count).
    The winner count W stays on the device and the K slots are fixed (slot j < W: winner j,
    else the sampled point j - W), so nothing is read back to the host."""
    n = scores.numel()
    s, order = scores.double().sort(descending=True)
    suffix = s.flip(0).cumsum(0).flip(0)
    j = torch.arange(n, device=s.device)
    # the least W >= winners with (K - W) s_W <= sum_{i >= W} s_i: no probability above 1
    fits = ((k - j) * s <= suffix) & (j >= winners) & (j <= k)
    w = torch.where(fits.any(), fits.int().argmax(), k)
    rest = k - w
    total = suffix.index_select(0, w.clamp_max(n - 1).view(1))
    # every remaining row zero: any probabilities are unbiased, take them equal
    p_rest = torch.where(total > 0, rest * s / total, rest / (n - w).clamp_min(1))
    p = torch.where(j >= w, p_rest, 0.0)
    picked, _ = rnd.systematic_slots(p, k, gen)  # points u + i, i < K - W, are the sample
    slot = torch.arange(k, device=s.device)
    sampled = picked[(slot - w).clamp_min(0)]
    winner = slot < w
    idx = order[torch.where(winner, slot, sampled)]
    weights = torch.where(winner, 1.0, p[sampled].reciprocal())
    return idx, weights.float()


def _positions(shape: torch.Size) -> int:
    """Positions per example: the leading dimensions after the first (1 for a 2-D input)."""
    return math.prod(shape[1:-1]) if len(shape) > 2 else 1


def _estimate(state: nn.Module | None, positions: int, device) -> torch.Tensor | None:
    """The state's gradient-norm estimate, created (zero) or reset if ``positions`` changed."""
    if state is None:
        return None
    h = state._buffers.get("crs_grad_norm")
    if h is None or h.numel() != positions:
        h = torch.zeros(positions, device=device)
        state.register_buffer("crs_grad_norm", h, persistent=False)
    return h


def _has_estimate(state: nn.Module | None, positions: int) -> bool:
    """Whether :func:`_estimate` returns the state's estimate as it is (or None)."""
    h = None if state is None else state._buffers.get("crs_grad_norm")
    return state is None or (h is not None and h.numel() == positions)


@torch.no_grad()
def _sample(x: torch.Tensor, cfg: CRS, seed: int | torch.Tensor, estimate: torch.Tensor | None):
    """(stored rows, indices, weights): the K rows of ``x`` kept for the weight gradient (the
    rows at full precision; :func:`crs_linear` stores them in ``cfg.bits``)."""
    rows = x.reshape(-1, x.shape[-1])
    n_rows, positions = rows.shape[0], _positions(x.shape)
    if estimate is None:
        h = torch.ones(positions, device=x.device)
    else:
        floor = 0.01 * estimate.mean()
        h = torch.where(floor > 0, estimate.clamp_min(floor), torch.ones_like(estimate))
    scores = rows.float().norm(dim=1) * h.repeat(n_rows // positions)
    k = rnd.kept_count(n_rows, cfg.keep)
    winners = min(math.floor(cfg.winners * k + 1e-9), k - 1)  # at least one sampled row
    if isinstance(seed, torch.Tensor):  # compiled: the draw inside an opaque op
        idx, weights = torch.ops.randprop.crs_choose_rows(scores, k, winners, seed)
    else:
        idx, weights = choose_rows(scores, k, winners, rnd.generator(seed, x.device))
    return rows.index_select(0, idx), idx, weights


@torch.library.custom_op("randprop::crs_choose_rows", mutates_args=())
def _choose_rows_op(
    scores: torch.Tensor, k: int, winners: int, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`choose_rows` drawn from a compiled layer's tensor seed, opaque to torch.compile
    (the same draw as eager for the same seed)."""
    return choose_rows(scores, k, winners, rnd.generator(int(seed), scores.device))


@_choose_rows_op.register_fake
def _(scores, k, winners, seed) -> tuple[torch.Tensor, torch.Tensor]:
    return scores.new_empty(k, dtype=torch.int64), scores.new_empty(k, dtype=torch.float32)


def _weight_grad(
    cfg: CRS, estimate: torch.Tensor | None, positions: int, meta: kbit.Meta, grad_out, *saved
) -> torch.Tensor:
    """The weight gradient over the stored rows (run by the call's WeightNode; ``saved``: the
    rows as kbit.pack saved them with ``meta``, the indices, the weights); updates the running
    estimate of the output-gradient norms."""
    *stored, idx, weights = saved
    stored = kbit.unpack(stored, meta)
    d = grad_out.reshape(-1, grad_out.shape[-1])
    if estimate is not None:
        norms = d.detach().float().norm(dim=1).view(-1, positions).mean(0)
        m = cfg.momentum
        estimate.copy_(torch.where(estimate == 0, norms, m * estimate + (1 - m) * norms))
    return (d.index_select(0, idx) * weights.to(d.dtype)[:, None]).T @ stored


class _CRSLinearFn(torch.autograd.Function):
    """Forward, input and bias gradients; the weight gradient is its WeightNode's."""

    @staticmethod
    def forward(ctx, x, weight, bias, token, handoff: Handoff):
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None)  # read by D W only
        ctx.handoff, ctx.has_bias = handoff, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        ctx.handoff.grad_out = grad_out
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_b, grad_out.new_zeros(()), None


class _CRSCompiledFn(torch.autograd.Function):
    """While torch.compile traces: forward and all three gradients in one node, the weight
    gradient (and the estimate's update) by ``grad_fn``; a compiled graph has no place for the
    side channel of a WeightNode, so there the estimate is updated whenever the weight's
    gradient was wanted at forward, even by a backward pass that does not compute it."""

    @staticmethod
    def forward(ctx, x, weight, bias, grad_fn, *saved):
        ctx.save_for_backward(weight, *saved)
        ctx.grad_fn, ctx.has_bias = grad_fn, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, *saved = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        if ctx.needs_input_grad[1]:
            grad_w = ctx.grad_fn(grad_out, *saved)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None, *(None for _ in saved)


def crs_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    method: CRS | str = "crs",
    seed: int = 0,
    state: nn.Module | None = None,
) -> torch.Tensor:
    """F.linear whose weight gradient comes from K = keep x N rows of ``input`` sampled with
    ``seed`` (``method``: a CRS config or its string form).

    state: the module holding the running gradient-norm estimate (a :class:`CRSState`, or the
    layer itself); without it the rows are scored by |x_i| alone. Under no_grad or when the
    weight needs no gradient this is F.linear.
    """
    cfg = method_config(method, CRS, "crs_linear")
    x, weight, bias = autocast_inputs(input, weight, bias)
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    if x.numel() == 0 or weight.numel() == 0:  # nothing to sample: the plain op is exact
        return F.linear(x, weight, bias)
    positions = _positions(x.shape)
    # a compiled graph cannot create the estimate and update it in backward: that first call
    # takes the eager form (a graph break), the later ones compile
    one_node = torch.compiler.is_compiling() and _has_estimate(state, positions)
    estimate = _estimate(state, positions, weight.device)
    rows, idx, weights = _sample(x.detach(), cfg, seed, estimate)
    rows, meta = kbit.pack(rows, cfg.bits, cfg.group, seed)
    grad_fn = functools.partial(_weight_grad, cfg, estimate, positions, meta)
    if one_node:
        return _CRSCompiledFn.apply(x, weight, bias, grad_fn, *rows, idx, weights)
    token, handoff = weight_node(weight, grad_fn, *rows, idx, weights)
    return _CRSLinearFn.apply(x, weight, bias, token, handoff)


class CRSLinear(LayerState, RandomizedLayer, nn.Linear):
    """nn.Linear whose weight gradient is unbiased column-row sampling over its input rows."""

    rp_buffers = CRSState.rp_buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rp_linear(x, self.weight, self.bias)

    def rp_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x weight^T + bias with CRS's weight gradient (plain F.linear when none is needed)."""
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return F.linear(x, weight, bias)
        seed = self.rp_next_seed()
        return crs_linear(x, weight, bias, method=self.rp_method, seed=seed, state=self)


class CRSConv1D(LayerState, Conv1DLayer):
    """transformers' Conv1D with CRS weight gradients (combined with the model's Conv1D class)."""

    rp_buffers = CRSState.rp_buffers
    rp_linear = CRSLinear.rp_linear


register_layers(CRS, {nn.Linear: CRSLinear, CONV1D: CRSConv1D})
