"""Mem-AOP-GD: approximate outer products with memory, for Linear layers (SEEDS.md section 3).

Every leading position of the input is one row: X (N x n), D = dL/dY (N x m) and the weight
gradient dW = D^T X = sum_i d_i x_i^T is a sum of N outer products. AOP keeps K of them, chosen
on the scores s_i = |a_i| |g_i| of the candidate rows (a_i, g_i):

- topk: the K largest s_i;
- weighted: K without replacement, drawn successively with probability proportional to s_i^2;
- random: K uniformly.

Nothing is reweighted, so the estimate is biased; memory (error feedback) corrects the bias.
The weight gradient is one dense GEMM G_S^T A_S over the K selected rows (index_select, then
matmul): it costs K/N of the exact GEMM. Forward, bias gradient and (by default) input
gradient are exact.

Memory, held in buffers of the layer:

- rows (the authors' slot-wise memory): A = A_mem + X, G = G_mem + D, dW ~ G_S^T A_S, then
  (A_mem, G_mem) = sqrt(decay) (A, G) with the rows in S zeroed. Adding slot by slot mixes an
  old row with a new example (cross terms), so the unused outer products are not kept exactly.
- queue: the unused rows (a_i, g_i) are offered again next step beside the new ones, scaled by
  sqrt(decay). With decay = 1, applied updates plus G_q^T A_q equal the sum of the exact
  gradients, exactly, as long as the queue has room: it holds ceil(capacity x rows of the first
  batch) rows, and when more are left over the lowest-score ones are dropped (counted in the
  layer's ``aop_dropped``, a 0-dim tensor on the layer's device). Every step works on the whole
  queue (its rows past the count are zero and never chosen before a filled one), so that no
  shape depends on the count and nothing is read back to the host.
- off: no memory.

target="input" applies the same selection to dX = D W = sum_j D[:, j] W[j, :] over the m output
features (scores |D[:, j]| |W[j, :]|, no memory); "both" does both.

State. The buffers ``aop_memory_x`` (rows x in_features), ``aop_memory_d`` (rows x
out_features) and, for the queue, ``aop_memory_count`` are created on the first training
forward. They are not persistent: the state_dict has the plain layer's keys, so it loads into a
plain model and a plain one loads into a converted model (strict); loading a state_dict replaces
the weights and resets the memory. ``rp.method_state`` / ``rp.load_method_state`` carry it
(with the step counters) for an exact resume. ``reset_memory()`` (or ``rp.reset_memory(model)``)
forgets them; ``rp.restore`` removes them.

The memory is updated only when the weight's gradient is computed: by ``loss.backward()`` or
``torch.autograd.grad`` with respect to the weight, not by ``torch.autograd.grad(loss, x)``
(see :class:`WeightNode`). Under no_grad, or when neither the weight nor (for target "input"
/ "both") the input needs a gradient, the layer is a plain nn.Linear: no seed is drawn.

Batch size. "rows" has one slot per row of the first batch: a batch with fewer rows uses the
first slots and the other slots wait unchanged; a batch with more rows grows the memory with
empty slots (changing the buffers' shapes in the state_dict). "queue" takes any batch size; its
capacity is fixed on first use. K = k, or ceil(keep x rows); k larger than a batch's rows is an
error (drop the last incomplete batch, or use keep).

Gradient accumulation. Memory is updated once per backward pass (and call), so over M micro-batches each
one sees the rows left by the previous one, an optimizer step applies M K outer products, and for
the queue the accumulated .grad plus the memory still equals the exact accumulated gradient.
A backward pass run twice over one graph updates the memory twice.
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
    check_choice,
    check_fraction,
    register,
    register_layers,
)
from randprop.methods.base import (
    LayerState,
    RandomizedLayer,
    autocast_inputs,
    method_config,
    weight_node,
)
from randprop.methods.projections import Conv1DLayer

POLICIES = ("topk", "weighted", "random")
MEMORIES = ("rows", "queue", "off")
TARGETS = ("weight", "input", "both")


@register
@dataclasses.dataclass(frozen=True)
class AOP(MethodConfig):
    """Mem-AOP-GD: keep K of the outer products of the weight gradient, memory corrects the bias.

    k: outer products kept per step (a count), or keep: the fraction of rows (default 0.125).
    policy: "topk", "weighted" (p ~ (|x_i||d_i|)^2, without replacement) or "random".
    memory: "rows" (authors' slot-wise), "queue" (conserving) or "off".
    decay: memory is scaled by sqrt(decay) per step, in (0, 1].
    target: "weight", "input" (dX over output features, no memory) or "both".
    capacity: queue size in multiples of the first batch's rows.
    """

    name = "aop"
    saves_memory = False
    k: int | None = None
    keep: float | None = None
    policy: str = "topk"
    memory: str = "rows"
    decay: float = 1.0
    target: str = "weight"
    capacity: float = 1.0

    def __post_init__(self) -> None:
        if self.k is None and self.keep is None:
            object.__setattr__(self, "keep", 0.125)
        if self.k is not None and self.keep is not None:
            raise ValueError(f"aop: give k or keep, not both; got k={self.k}, keep={self.keep}")
        if self.k is not None and (
            not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1
        ):
            raise ValueError(f"aop: k must be a positive integer; got {self.k!r}")
        if self.keep is not None:
            check_fraction("aop", "keep", self.keep)
        check_choice("aop", "policy", self.policy, POLICIES)
        check_choice("aop", "memory", self.memory, MEMORIES)
        check_choice("aop", "target", self.target, TARGETS)
        check_fraction("aop", "decay", self.decay)
        ok = isinstance(self.capacity, (int, float)) and not isinstance(self.capacity, bool)
        if not ok or not self.capacity > 0:
            raise ValueError(f"aop: capacity must be a number > 0; got {self.capacity!r}")
        if self.target == "input" and self.memory != "off":
            raise ValueError(
                "aop: memory applies to the weight gradient only; use memory='off' with "
                f"target='input' (got memory={self.memory!r})"
            )

    def count(self, rows: int, what: str = "rows") -> int:
        """K for ``rows`` candidates: k, or ceil(keep x rows); a clear error if k > rows."""
        k = self.k if self.k is not None else rnd.kept_count(rows, self.keep)
        if k > rows:
            raise ValueError(
                f"aop: k={k} exceeds the {rows} {what} of this batch; choose k <= {rows} "
                "or a keep fraction"
            )
        return k

    @property
    def selects_weight(self) -> bool:
        return self.target in ("weight", "both")

    @property
    def selects_input(self) -> bool:
        return self.target in ("input", "both")


# --- memory buffers ---------------------------------------------------------------------------


class AOPMemory(LayerState):
    """Holder of AOP memory for the functional form :func:`aop_linear` (AOPLinear is its own)."""

    rp_buffers = ("aop_memory_x", "aop_memory_d", "aop_memory_count")
    rp_counters = ("aop_dropped",)


def _ensure_memory(
    owner: nn.Module, cfg: AOP, rows: int, shape: tuple[int, int], dtype: torch.dtype, device
) -> None:
    """Create (or, for "rows", grow) the memory buffers of ``owner`` for a batch of ``rows``."""
    n, m = shape
    mem_x = owner._buffers.get("aop_memory_x")
    if mem_x is not None and (mem_x.shape[1], owner.aop_memory_d.shape[1]) != (n, m):
        raise ValueError(
            f"aop: memory holds rows of {mem_x.shape[1]} -> {owner.aop_memory_d.shape[1]} "
            f"features, this layer has {n} -> {m}; call reset_memory() first"
        )
    if cfg.memory == "queue":
        if mem_x is None or "aop_memory_count" not in owner._buffers:
            cap = max(1, math.ceil(cfg.capacity * rows))
            owner.register_buffer(
                "aop_memory_x", torch.zeros(cap, n, dtype=dtype, device=device), False
            )
            owner.register_buffer(
                "aop_memory_d", torch.zeros(cap, m, dtype=dtype, device=device), False
            )
            owner.register_buffer(
                "aop_memory_count", torch.zeros((), dtype=torch.long, device=device), False
            )
        return
    if mem_x is None or mem_x.shape[0] < rows:
        grown = [torch.zeros(rows, k, dtype=dtype, device=device) for k in (n, m)]
        if mem_x is not None:
            grown[0][: mem_x.shape[0]] = mem_x
            grown[1][: mem_x.shape[0]] = owner.aop_memory_d
        owner.register_buffer("aop_memory_x", grown[0], persistent=False)
        owner.register_buffer("aop_memory_d", grown[1], persistent=False)
    owner._buffers.pop("aop_memory_count", None)


# --- selection and the estimated gradients ----------------------------------------------------


def select(
    scores: torch.Tensor,
    k: int,
    policy: str,
    gen: torch.Generator,
    filled: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the ``k`` outer products kept, given their scores |a_i| |g_i| (1-D); with the
    mask ``filled``, the others only after every filled one (an empty queue slot)."""
    if policy == "topk":
        if filled is not None:
            scores = scores.where(filled, -1.0)
        return scores.topk(k, sorted=False).indices
    if policy == "weighted":
        weights = scores.square()
        if filled is not None:
            weights = weights.where(filled, 0.0)
        return rnd.weighted_indices(weights, k, gen)
    if filled is None:
        return rnd.sample_indices(scores.numel(), k, gen, scores.device)
    keys = torch.rand(scores.numel(), generator=gen, device=scores.device)  # as sample_indices
    return keys.where(filled, -1.0).topk(k, sorted=False).indices


def _row_scores(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return a.norm(dim=1) * g.norm(dim=1)


def _gemm(a: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_{i in idx} g_i a_i^T as one dense GEMM over the selected rows."""
    return g.index_select(0, idx).T @ a.index_select(0, idx)


def weight_grad(
    x: torch.Tensor, d: torch.Tensor, cfg: AOP, k: int, gen: torch.Generator, owner
) -> torch.Tensor:
    """The AOP estimate of D^T X (x: N x n, d: N x m), updating ``owner``'s memory."""
    if cfg.memory == "off":
        return _gemm(x, d, select(_row_scores(x, d), k, cfg.policy, gen))
    mem_x, mem_d = owner.aop_memory_x, owner.aop_memory_d
    scale = math.sqrt(cfg.decay)
    if cfg.memory == "rows":
        a = mem_x[: x.shape[0]].add_(x)  # views: the memory is updated in place
        g = mem_d[: x.shape[0]].add_(d)
        idx = select(_row_scores(a, g), k, cfg.policy, gen)
        grad = _gemm(a, g, idx)
        for rows in (a, g):
            rows.index_fill_(0, idx, 0)
            if scale != 1:
                rows.mul_(scale)
        return grad
    count = owner.aop_memory_count
    a = torch.cat([x.to(mem_x.dtype), mem_x])
    g = torch.cat([d.to(mem_d.dtype), mem_d])
    scores = _row_scores(a, g)
    filled = torch.arange(a.shape[0], device=a.device) < x.shape[0] + count
    idx = select(scores, k, cfg.policy, gen, filled)
    grad = _gemm(a, g, idx)
    unused = filled.index_fill(0, idx, False)
    left = unused.sum()
    capacity = mem_x.shape[0]
    # the unused rows, the lowest scores dropped past the capacity, in their order in (a, g)
    best = scores.where(unused, -1.0).topk(capacity, sorted=False).indices
    rest = best.where(unused[best], best + a.shape[0]).sort().values.remainder(a.shape[0])
    kept = left.clamp_max(capacity)
    owner.aop_dropped = getattr(owner, "aop_dropped", 0) + (left - kept)
    keep = (torch.arange(capacity, device=a.device) < kept)[:, None]
    for mem, rows in ((mem_x, a), (mem_d, g)):
        mem.copy_(rows.index_select(0, rest).where(keep, 0.0))  # rows past the count: zero
        if scale != 1:
            mem.mul_(scale)
    count.copy_(kept)
    return grad


def input_grad(
    d: torch.Tensor, weight: torch.Tensor, cfg: AOP, k: int, gen: torch.Generator
) -> torch.Tensor:
    """The AOP estimate of D W over K of the m output features (d: N x m, weight: m x n)."""
    idx = select(d.norm(dim=0) * weight.norm(dim=1), k, cfg.policy, gen)
    return d.index_select(1, idx) @ weight.index_select(0, idx)


class _AOPLinearFn(torch.autograd.Function):
    """Forward, input and bias gradients; the weight gradient is its :class:`WeightNode`'s."""

    @staticmethod
    def forward(ctx, x, weight, bias, token, handoff, cfg: AOP, seed: int, k_features: int):
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None)  # W: for D W only
        ctx.handoff, ctx.cfg, ctx.seed, ctx.k_features = handoff, cfg, seed, k_features
        ctx.has_bias, ctx.has_token = bias is not None, token is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_x = grad_b = token = None
        if ctx.has_token:
            ctx.handoff.grad_out = grad_out
            token = grad_out.new_zeros(())
        if ctx.needs_input_grad[0]:
            if ctx.k_features:  # its own draws: a sub-stream of the call's seed
                gen = rnd.generator(rnd.derive_seed(ctx.seed, step=1), grad_out.device)
                d = grad_out.reshape(-1, grad_out.shape[-1])
                grad_x = input_grad(d, weight, ctx.cfg, ctx.k_features, gen).view(
                    grad_out.shape[:-1] + weight.shape[1:]
                )
            else:
                grad_x = grad_out @ weight
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_b, token, None, None, None, None


def _weight_grad(
    cfg: AOP, seed: int, k_rows: int, owner, grad_out: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """The weight gradient of one call (run by its WeightNode): AOP's estimate, updating
    ``owner``'s memory, or the exact D^T X when only the input gradient is approximated."""
    d, rows = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    if not k_rows:
        return d.T @ rows
    gen = rnd.generator(seed, d.device)
    return weight_grad(rows, d, cfg, k_rows, gen, owner).to(grad_out.dtype)


def aop_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    method: AOP | str = "aop",
    seed: int = 0,
    memory: nn.Module | None = None,
) -> torch.Tensor:
    """F.linear with Mem-AOP-GD gradients drawn with ``seed`` (``method``: an AOP config or its
    string form).

    memory: the module holding the memory buffers (an :class:`AOPMemory`, or the layer itself);
    required unless the method's memory is "off" or its target "input". Under no_grad, or when
    neither the weight nor (for target "input" / "both") ``input`` needs a gradient, this is
    F.linear.
    """
    cfg = method_config(method, AOP, "aop_linear")
    state_dtype = weight.dtype
    x, weight, bias = autocast_inputs(input, weight, bias)
    if not _active(cfg, x, weight):
        return F.linear(x, weight, bias)
    if x.numel() == 0 or weight.numel() == 0:  # no outer products: the plain op is exact
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    k_features = 0
    if cfg.selects_input and x.requires_grad:
        k_features = cfg.count(weight.shape[0], "output features")
    token = handoff = None
    if weight.requires_grad:
        k_rows = cfg.count(rows) if cfg.selects_weight else 0
        if k_rows and cfg.memory != "off":
            if memory is None:
                raise ValueError(
                    f"aop: memory={cfg.memory!r} needs a module to hold its buffers: pass "
                    "memory=AOPMemory(), use AOPLinear, or set memory='off'"
                )
            shape = (weight.shape[1], weight.shape[0])
            _ensure_memory(memory, cfg, rows, shape, state_dtype, weight.device)
        grad_fn = functools.partial(_weight_grad, cfg, seed, k_rows, memory)
        token, handoff = weight_node(weight, grad_fn, x.detach())
    return _AOPLinearFn.apply(x, weight, bias, token, handoff, cfg, seed, k_features)


def _active(cfg: AOP, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a gradient AOP estimates (or whose memory it updates) may be needed."""
    wanted = weight.requires_grad or (cfg.selects_input and x.requires_grad)
    return torch.is_grad_enabled() and wanted


class AOPLinear(LayerState, RandomizedLayer, nn.Linear):
    """nn.Linear with Mem-AOP-GD gradients; its memory buffers are layer state, out of the
    state_dict (see the module docstring)."""

    rp_buffers = AOPMemory.rp_buffers
    rp_counters = AOPMemory.rp_counters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rp_linear(x, self.weight, self.bias)

    def rp_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x weight^T + bias with AOP's gradients (plain F.linear when none is needed)."""
        if not _active(self.rp_method, x, weight):
            return F.linear(x, weight, bias)
        seed = self.rp_next_seed()
        return aop_linear(x, weight, bias, method=self.rp_method, seed=seed, memory=self)


class AOPConv1D(LayerState, Conv1DLayer):
    """transformers' Conv1D with Mem-AOP-GD gradients (combined with the model's Conv1D
    class); its memory is layer state as AOPLinear's."""

    rp_buffers = AOPMemory.rp_buffers
    rp_counters = AOPMemory.rp_counters
    rp_linear = AOPLinear.rp_linear


register_layers(AOP, {nn.Linear: AOPLinear, CONV1D: AOPConv1D})
