"""rp.plan: the estimator for every layer that minimises gradient variance under a byte budget.

For each eligible layer l (one that some candidate converts) and candidate setting c, two figures
are measured, never computed by hand:

- bytes: b_l(c) = B(l <- c) - B0, the change of the bytes saved for backward
  (:class:`~randprop.measure.saved.track_saved`) when layer l alone takes c, B0 being the model
  with every eligible layer exact and the compact non-weight ops (1-bit ReLU masks, ...) that
  convert swaps in under a memory-saving method;
- variance: v_l(c) = sum_k |g_hat_k - mean|^2 / ((K - 1) |g_l|^2), the total variance of layer
  l's parameter gradients over K draws, relative to the squared norm of its exact gradient g_l
  (plain PyTorch). The candidates estimate only the weight gradient and pass the input
  gradient back exactly, so one copy with c on every layer it converts measures all layers.

The plan minimises sum_l v_l(c_l) subject to B0 + sum_l b_l(c_l) <= budget: a multiple-choice
knapsack solved exactly by dynamic programming over byte buckets (``resolution_bytes``; each
b_l rounded up, so the predicted total never exceeds the budget; the bucket is the gcd of the
measured sizes, i.e. exact, unless that would need more than ``max_buckets`` buckets). Among
plans of equal variance the one with fewest bytes wins, so as the budget grows the planned total
variance never increases and the planned total bytes never decrease (per layer no order is
promised: a larger budget may move bytes from one layer to another).

Bytes measured one layer at a time are conservative: where several layers read one tensor (the
q, k and v projections of attention), freeing it takes all of them, so the planned model's
measured total is at most the predicted one. It is measured at the end and reported. Each
candidate on every layer it converts (a uniform setting) is also measured whole, and plain
PyTorch too; the plan is the least-variance one of the per-layer choice, the uniform settings and
plain PyTorch that fits (fewest bytes among equal variance), so it is never worse than a uniform
setting that fits, even where layers share inputs.

Not planned: activation checkpointing of blocks (it changes the model's forward, not a layer's
method, and its bytes do not add up per layer), and the methods that also approximate the input
gradient (AOP, CRS, SparseVJP), whose variances would not add up per layer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import reduce

import numpy as np
import torch
from torch import nn

from randprop.config import MethodConfig, check_seed
from randprop.convert import convert, restore
from randprop.measure.saved import track_saved
from randprop.methods import parse_method

LossOf = Callable[[nn.Module], torch.Tensor]

RAD_KEEPS = (0.05, 0.1, 0.2, 0.3, 0.5)
#: the default candidate settings (exact first); each layer gets the ones that convert it
CANDIDATES: tuple[str, ...] = (
    "exact",
    *(f"rad:keep={k},mode={m}" for k in RAD_KEEPS for m in ("sample", "project")),
    *(f"rad:keep={k},bits={b}" for k in RAD_KEEPS for b in (1, 2, 4, 8)),
    *(f"quant:bits={b}" for b in (1, 2, 4, 8)),
    *(f"trace:probes={r}" for r in (4, 8, 16, 32)),
    *(f"trace:probes={r},bits=4" for r in (4, 8, 16, 32)),
)
#: the method named for the compact non-weight ops in a plan's dict (any memory-saving method
#: swaps in the same compact forms; 4 bits is their default width where they store codes)
OPS_METHOD = "quant:bits=4"
NOT_PLANNED = (
    "not planned: activation checkpointing of blocks (a change of the forward, not a per-layer "
    "method); AOP, CRS and SparseVJP (they also approximate the input gradient)"
)


@dataclasses.dataclass
class LayerOption:
    """One candidate for one layer: bytes the layer holds under it, and its relative variance."""

    method: str
    bytes: int
    variance: float


@dataclasses.dataclass
class LayerTable:
    """The measured options of one eligible layer (exact first)."""

    name: str
    kind: str
    options: list[LayerOption]


@dataclasses.dataclass
class Measurements:
    """What :func:`measure` found: per layer its options; B0 and exact's bytes.

    fixed_bytes: B0 less what the eligible layers hold when exact, i.e. the bytes no choice of
    the plan changes (the compact ops' masks, the loss's, inputs held by other modules).
    """

    layers: list[LayerTable]
    ops: list[str]
    exact_bytes: int
    fixed_bytes: int
    draws: int
    seed: int
    #: per candidate: bytes measured with it on every layer it converts at once (exact elsewhere)
    uniform_bytes: dict[str, int] = dataclasses.field(default_factory=dict)

    def layer_minimum_bytes(self) -> int:
        """The least predicted total of a per-layer choice."""
        return self.fixed_bytes + sum(min(o.bytes for o in t.options) for t in self.layers)

    def minimum_bytes(self) -> int:
        """The least total of any plan: per-layer, uniform (measured whole) or plain exact."""
        return min(self.layer_minimum_bytes(), self.exact_bytes, *self.uniform_bytes.values())


@dataclasses.dataclass
class LayerChoice:
    name: str
    kind: str
    method: str
    bytes: int
    exact_bytes: int
    variance: float


@dataclasses.dataclass
class Plan:
    """A plan: ``methods`` for rp.convert, and per layer its choice, bytes and variance.

    ``methods, report = rp.plan(...)`` also works (a Plan unpacks as (methods, itself)).
    predicted_bytes: fixed_bytes + the chosen layers' bytes; measured_bytes: track_saved on the
    converted model. Fractions are of exact_bytes (plain PyTorch).
    """

    methods: dict[str, str]
    layers: list[LayerChoice]
    budget_bytes: int
    exact_bytes: int
    fixed_bytes: int
    minimum_bytes: int
    predicted_bytes: int
    measured_bytes: int | None
    total_variance: float
    resolution_bytes: int
    draws: int
    notes: str = NOT_PLANNED

    def __iter__(self) -> Iterator:
        return iter((self.methods, self))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        rows = [("layer", "type", "method", "bytes", "exact bytes", "rel variance")]
        rows += [
            (c.name, c.kind, c.method, f"{c.bytes:,}", f"{c.exact_bytes:,}", f"{c.variance:.4g}")
            for c in self.layers
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                cell.ljust(w) if i < 3 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )  # fmt: skip
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))

        def frac(b: int | None) -> str:
            return "n/a" if b is None else f"{b:,} B ({b / self.exact_bytes:.4f} of exact)"

        return "\n".join([
            *lines,
            f"fixed (no choice changes it): {self.fixed_bytes:,} B",
            f"budget {frac(self.budget_bytes)}; predicted {frac(self.predicted_bytes)}; "
            f"measured {frac(self.measured_bytes)}; smallest possible {frac(self.minimum_bytes)}",
            f"total relative variance {self.total_variance:.4g} ({self.draws} draws); exact "
            f"{self.exact_bytes:,} B",
            self.notes,
        ])  # fmt: skip


def _loss_of(batch, loss_fn) -> LossOf:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError("plan: batch must be a pair (inputs, targets)")
    if not callable(loss_fn):
        raise TypeError("plan: loss_fn must be callable (output, targets) -> scalar loss")
    # copies: a view (a batch sliced from a dataset) would count as its whole storage
    inputs, targets = (t.clone() if isinstance(t, torch.Tensor) else t for t in batch)
    return lambda m: loss_fn(m(inputs), targets)


def plan(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    budget: int | float,
    *,
    candidates: Sequence[str | MethodConfig] | None = None,
    draws: int = 8,
    seed: int = 0,
    compact_ops: bool = True,
    max_buckets: int = 1 << 18,
) -> Plan:
    """The per-layer methods minimising the total relative gradient variance of ``model`` on
    ``batch`` (inputs, targets; the loss ``loss_fn(model(inputs), targets)``, e.g.
    F.cross_entropy) whose measured saved bytes fit ``budget``: an int of bytes, or a float in
    (0, 1], a fraction of exact's saved bytes.

    candidates: the settings to choose from (default :data:`CANDIDATES`; exact is always one).
    draws: gradient draws per setting. compact_ops: also swap in the compact non-weight ops
    (exact ReLU masks, k-bit smooth activations and norms) as convert does. max_buckets: the
    most byte buckets of the dynamic program (finer plans exactly; see the module docstring).
    The model is not modified. Raises ValueError when the budget is below the smallest
    achievable total (the message names it, in bytes and as a fraction of exact's).
    """
    return plan_loss(
        model, _loss_of(batch, loss_fn), budget, candidates=candidates, draws=draws, seed=seed,
        compact_ops=compact_ops, max_buckets=max_buckets,
    )  # fmt: skip


def plan_loss(
    model: nn.Module,
    loss_of: LossOf,
    budget: int | float,
    *,
    candidates: Sequence[str | MethodConfig] | None = None,
    draws: int = 8,
    seed: int = 0,
    compact_ops: bool = True,
    max_buckets: int = 1 << 18,
) -> Plan:
    """:func:`plan` with the loss given as ``loss_of(model) -> scalar loss`` (any batch form)."""
    _check_budget(budget)
    found = measure(model, loss_of, candidates=candidates, draws=draws, seed=seed,
                    compact_ops=compact_ops)  # fmt: skip
    target = budget_bytes(budget, found.exact_bytes)
    chosen = choose(found, target, max_buckets=max_buckets)
    work = _plain_copy(model)
    for _ in range(4):  # measured above the budget (not expected: see the module docstring)
        measured = _bytes(work, chosen.methods, loss_of, seed)
        if measured <= target:
            break
        chosen = choose(found, target, max_buckets=max_buckets,
                        capacity=chosen.predicted_bytes - (measured - target))  # fmt: skip
    else:
        raise RuntimeError(f"plan: could not fit {target:,} B (measured {measured:,} B)")
    chosen.measured_bytes = measured
    return chosen


def _check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(
            "plan: budget must be an int (bytes) or a float in (0, 1] (a fraction of exact's "
            f"saved bytes); got {type(budget).__name__}"
        )
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"plan: budget in bytes must be a positive int; got {budget}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise ValueError(
            f"plan: a float budget is a fraction of exact's saved bytes in (0, 1]; got {budget}"
        )


def budget_bytes(budget: int | float, exact_bytes: int) -> int:
    """``budget`` in bytes: an int as it is; a float fraction of ``exact_bytes`` (rounded down)."""
    _check_budget(budget)
    return budget if isinstance(budget, int) else math.floor(budget * exact_bytes)


def _plain_copy(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan: model must be an nn.Module; got {type(model).__name__}")
    clone = copy.deepcopy(model)
    restore(clone)
    return clone


def _bytes(model: nn.Module, method, loss_of: LossOf, seed: int) -> int:
    """Saved bytes of one forward (and loss) of ``model`` converted to ``method`` (None: plain):
    the peak of a training step's, reached at the end of the forward. The model is restored
    afterwards."""
    if method is not None:
        convert(model, method, seed=seed)
    try:
        with track_saved(model) as saved:
            loss_of(model)  # the graph is freed on return: no backward needed
        return saved.bytes
    finally:
        restore(model)


def _layer_grads(model: nn.Module, loss_of: LossOf, layers: Sequence[str]) -> list[torch.Tensor]:
    """Per layer: its own parameters' gradients, flattened into one float64 vector."""
    model.zero_grad(set_to_none=True)
    loss_of(model).backward()
    out = []
    for name in layers:
        params = model.get_submodule(name).parameters(recurse=False)
        out.append(torch.cat([p.grad.detach().double().flatten() for p in params
                              if p.grad is not None] or [torch.zeros(0, dtype=torch.float64)]))  # fmt: skip
    model.zero_grad(set_to_none=True)
    return out


def measure(
    model: nn.Module,
    loss_of: LossOf,
    *,
    candidates: Sequence[str | MethodConfig] | None = None,
    draws: int = 8,
    seed: int = 0,
    compact_ops: bool = True,
) -> Measurements:
    """Measure every candidate's bytes and relative variance on every layer it converts (see the
    module docstring); :func:`choose` then plans any budget from them."""
    seed = check_seed(seed, "plan")
    candidates = CANDIDATES if candidates is None else candidates
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(f"plan: draws must be an int >= 2 (to estimate a variance); got {draws!r}")
    if not isinstance(compact_ops, bool):
        raise TypeError(f"plan: compact_ops must be True or False; got {compact_ops!r}")
    if isinstance(candidates, (str, MethodConfig)) or not len(candidates):
        raise ValueError("plan: candidates must be a non-empty list of methods")
    configs = list(dict.fromkeys(parse_method(c) for c in candidates))
    exact = parse_method("exact")
    configs = [exact, *(c for c in configs if c != exact)]
    for c in configs:
        if c.name in ("aop", "crs", "vjp"):
            raise ValueError(f"plan: candidate {c} also approximates the input gradient; "
                             "use exact, rad, trace or quant settings")  # fmt: skip
    work = _plain_copy(model)
    # which layers each candidate converts (weight layers only), and the compact ops
    converts: dict[MethodConfig, list[str]] = {}
    for c in configs[1:]:
        converts[c] = convert(work, c, seed=seed, activation_masks=False).converted
        restore(work)
    names = [n for n, _ in work.named_modules() if any(n in v for v in converts.values())]
    if not names:
        raise ValueError(f"plan: no candidate converts a layer of {type(model).__name__}")
    ops: list[str] = []
    memory_saving = [c for c in configs if c.saves_memory]
    if compact_ops and memory_saving:
        ops = [n for n in convert(work, memory_saving[0], seed=seed).converted if n not in names]
        restore(work)

    def spec(choice: Mapping[str, MethodConfig]) -> dict[str, str]:
        return {**{n: str(choice.get(n, exact)) for n in names}, **dict.fromkeys(ops, OPS_METHOD)}

    exact_bytes = _bytes(work, None, loss_of, seed)
    convert(work, spec({}), seed=seed)
    with track_saved(work) as saved:
        loss_of(work)
    restore(work)
    base, held = saved.bytes, {n: saved.by_module.get(n, 0) for n in names}
    reference = _layer_grads(work, loss_of, names)
    norms = [max(g.square().sum().item(), torch.finfo(torch.float64).tiny) for g in reference]
    options: dict[str, list[LayerOption]] = {n: [] for n in names}
    uniform_bytes: dict[str, int] = {}
    for c in configs:
        layers = names if c == exact else converts[c]
        if not layers:
            continue
        convert(work, spec(dict.fromkeys(layers, c)), seed=seed)
        mean = [torch.zeros_like(g) for g in reference]
        m2 = [torch.zeros_like(g) for g in reference]
        with track_saved(work) as whole:
            first = _layer_grads(work, loss_of, names)
        uniform_bytes[str(c)] = whole.bytes
        for k in range(1, draws + 1):  # Welford
            grads = first if k == 1 else _layer_grads(work, loss_of, names)
            for i, g in enumerate(grads):
                delta = g - mean[i]
                mean[i] += delta / k
                m2[i] += delta * (g - mean[i])
        restore(work)
        for name in layers:
            i = names.index(name)
            variance = m2[i].sum().item() / (draws - 1) / norms[i]
            size = held[name]
            if c != exact:
                size += _bytes(work, spec({name: c}), loss_of, seed) - base
            options[name].append(LayerOption(str(c), size, variance))
    kinds = dict(work.named_modules())
    tables = [LayerTable(n, type(kinds[n]).__name__, options[n]) for n in names]
    fixed = base - sum(held.values())
    return Measurements(tables, ops, exact_bytes, fixed, draws, seed, uniform_bytes)


def choose(
    found: Measurements, budget: int | float, *, max_buckets: int = 1 << 18,
    capacity: int | None = None,
) -> Plan:  # fmt: skip
    """The plan of least total relative variance whose predicted bytes fit ``budget`` (bytes,
    or a fraction of exact's), by dynamic programming over byte buckets (module docstring).
    ``capacity``: plan for this many bytes instead (still reported against ``budget``)."""
    target = budget_bytes(budget, found.exact_bytes)
    minimum = found.minimum_bytes()
    limit = target if capacity is None else capacity
    if limit < minimum:
        raise ValueError(
            f"plan: budget {target:,} B ({target / found.exact_bytes:.4f} of exact's "
            f"{found.exact_bytes:,} B) is below the smallest achievable total, {minimum:,} B "
            f"({minimum / found.exact_bytes:.4f} of exact)"
        )
    alternatives = []  # (variance, bytes, layers, methods, fixed bytes, note)
    if limit >= found.layer_minimum_bytes():
        layers, step = _knapsack(found, limit, max_buckets)
        methods = {c.name: c.method for c in layers} | dict.fromkeys(found.ops, OPS_METHOD)
        alternatives.append((sum(c.variance for c in layers), found.fixed_bytes +
                             sum(c.bytes for c in layers), layers, methods, found.fixed_bytes,
                             ""))  # fmt: skip
    else:
        step = 1
    exact_layers = [_choice(t, t.options[0]) for t in found.layers]
    for text, size in found.uniform_bytes.items():
        # the setting on every layer it converts, measured whole: where layers share an input
        # this is less than the per-layer bytes add up to
        if size <= limit:
            layers = [_choice(t, next((o for o in t.options if o.method == text), t.options[0]))
                      for t in found.layers]  # fmt: skip
            methods = {c.name: c.method for c in layers} | dict.fromkeys(found.ops, OPS_METHOD)
            shared = size != found.fixed_bytes + sum(c.bytes for c in layers)
            note = (f"uniform setting {text}, its total measured whole (layers sharing an input "
                    "free it only together: the per-layer bytes, each measured alone, do not add "
                    "up to it)") if shared else ""  # fmt: skip
            alternatives.append((sum(c.variance for c in layers), size, layers, methods,
                                 found.fixed_bytes, note))  # fmt: skip
    if found.exact_bytes <= limit:
        # plain PyTorch: exact layers without the compact ops (whose masks cost bytes where the
        # next layer keeps its input anyway)
        alternatives.append((0.0, found.exact_bytes, exact_layers,
                             {c.name: c.method for c in exact_layers},
                             found.exact_bytes - sum(c.bytes for c in exact_layers),
                             "plain PyTorch: no compact ops"))  # fmt: skip
    variance, predicted, layers, methods, fixed, note = min(alternatives, key=lambda a: a[:2])
    return Plan(
        methods=methods,
        layers=layers,
        budget_bytes=target,
        exact_bytes=found.exact_bytes,
        fixed_bytes=fixed,
        minimum_bytes=minimum,
        predicted_bytes=predicted,
        measured_bytes=None,
        total_variance=float(variance),
        resolution_bytes=step,
        draws=found.draws,
        notes="; ".join(filter(None, (note, NOT_PLANNED))),
    )


def _choice(table: LayerTable, option: LayerOption) -> LayerChoice:
    return LayerChoice(table.name, table.kind, option.method, option.bytes,
                       table.options[0].bytes, option.variance)  # fmt: skip


def _knapsack(found: Measurements, limit: int, max_buckets: int) -> tuple[list[LayerChoice], int]:
    """The per-layer choice of least total variance whose predicted bytes fit ``limit`` (fewest
    buckets among equal variance), and the bucket size in bytes."""
    minimum = found.layer_minimum_bytes()
    lows = [min(o.bytes for o in t.options) for t in found.layers]
    extra = [[o.bytes - low for o in t.options] for t, low in zip(found.layers, lows, strict=True)]
    span = sum(max(e) for e in extra)
    step = reduce(math.gcd, (e for row in extra for e in row), 0) or 1
    step = max(step, math.ceil(span / max_buckets))
    cap = min((limit - minimum) // step, sum(math.ceil(max(e) / step) for e in extra))
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks = []
    for table, row in zip(found.layers, extra, strict=True):
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int32)
        for j, (option, e) in enumerate(zip(table.options, row, strict=True)):
            k = math.ceil(e / step)
            if k > cap:
                continue
            trial = best[: cap + 1 - k] + option.variance
            better = trial < new[k:]
            new[k:][better] = trial[better]
            pick[k:][better] = j
        best = new
        picks.append(pick)
    j = int(np.argmin(best))  # first minimum: fewest buckets among equal variance
    chosen: list[int] = []
    for row, pick in zip(reversed(extra), reversed(picks), strict=True):
        index = int(pick[j])
        chosen.append(index)
        j -= math.ceil(row[index] / step)
    chosen.reverse()
    layers = [_choice(t, t.options[i]) for t, i in zip(found.layers, chosen, strict=True)]
    return layers, step


def uniform(found: Measurements, method: str | MethodConfig) -> tuple[int, float]:
    """(measured bytes, total relative variance) of ``method`` on every layer it converts
    (exact elsewhere; a candidate of ``found``): the uniform setting a plan is compared with."""
    text = str(parse_method(method))
    if text not in found.uniform_bytes:
        raise ValueError(f"plan: {text} is not among the measured candidates")
    total_var = 0.0
    for table in found.layers:
        option = next((o for o in table.options if o.method == text), table.options[0])
        total_var += option.variance
    return found.uniform_bytes[text], total_var
