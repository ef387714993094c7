"""rp.plan: the estimator for every layer that minimises gradient variance under a byte budget.

For each eligible layer l (one that some candidate converts) and candidate setting c, two figures
are measured, never computed by hand:

- bytes: b_l(c) = B(l <- c) - B0, the change of the bytes saved for backward
  (:class:`~randprop.measure.saved.track_saved`) when layer l alone takes c, B0 being the model
  with every eligible layer exact and the compact non-weight ops (1-bit ReLU masks, ...) that
  convert swaps in under a memory-saving method;
- variance: v_l(c) = sum_k |g_hat_k - mean|^2 / ((K - 1) |g_l|^2), the total variance of layer
  l's parameter gradients over K draws, relative to the squared norm of its exact gradient g_l
  (plain PyTorch). PyTorch's generators are seeded alike for every draw, so the model's own
  randomness (dropout) is fixed and v_l is the estimators' (exact's: only what the compact ops'
  stochastic codes add). The candidates estimate only the weight gradient and pass the input
  gradient back exactly, so one copy with c on every layer it converts measures all layers.

The plan minimises sum_l v_l(c_l) subject to B0 + sum_l b_l(c_l) <= budget: a multiple-choice
knapsack solved exactly by dynamic programming over byte buckets (``resolution_bytes``; each
b_l rounded up, so the predicted total never exceeds the budget; the bucket is the gcd of the
measured sizes, i.e. exact, unless that would need more than ``max_buckets`` buckets). Among
plans of equal variance the one with fewest bytes wins, so as the budget grows the planned total
variance never increases and the planned total bytes never decrease (without checkpointing; per
layer no order is promised: a larger budget may move bytes from one layer to another).

Bytes measured one layer at a time are conservative: where several layers read one tensor (the
q, k and v projections of attention), freeing it takes all of them, so the planned model's
measured total is at most the predicted one. It is measured at the end and reported. Each
candidate on every layer it converts (a uniform setting) is also measured whole, and plain
PyTorch too; the plan is the least-variance one of the per-layer choice, the uniform settings and
plain PyTorch that fits (fewest bytes among equal variance), so it is never worse than a uniform
setting that fits, even where layers share inputs.

Checkpointing of blocks (``checkpointing=True``, where the model has blocks: an nn.Sequential or
a list of blocks, as ``randprop train --method checkpoint`` finds them) is planned too. Then
backward recomputes block k once the blocks after it are done (their inputs freed) and what the
forward saved after the last block is freed, so the peak is

    max(S, H - sum_{j > k} I_j + R_k over the blocks k),

S the forward's peak, H the bytes held when the last block returns (the blocks' inputs and what
the layers before them keep), I_j block j's input bytes and R_k block k's recomputed saved bytes
(``randprop.checkpointing.checkpointed_peak``). Each layer's choice changes H (a layer before
the blocks) or its block's R_k (a layer inside), by d_l, measured one layer at a time on the
checkpointed model: with every layer exact as the reference, the H-term is
H + sum_{l outside} d_l + max_k (R_k - sum_{j > k} I_j + sum_{l in k} d_l). For a given share e of
the bytes outside the blocks, each block is a separate knapsack with capacity
budget - H - e - (R_k - sum_{j > k} I_j): the plan takes the e of least total variance, then
checks S (S + the layers' measured changes to it; where it does not fit, the H-term's capacity
shrinks by the excess). With blocks checkpointed every block's forward runs twice, so that plan
is taken only where it divides the least variance without checkpointing by more than
``checkpoint_gain`` (:data:`CHECKPOINT_GAIN`), or where nothing else fits; the planned variance
then never rises with the budget by more than that factor.

Not planned: the methods that also approximate the input gradient (AOP, CRS, SparseVJP), whose
variances would not add up per layer.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import reduce

import numpy as np
import torch
from torch import nn

from randprop.checkpointing import (
    checkpointed_peak,
    install_checkpointing,
    recording_blocks,
    remove_checkpointing,
)
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
#: a plan checkpoints the blocks only where that divides the least variance without it by more
#: than this: recomputing costs about one forward of each block per step (1.3-1.9x exact's step
#: time on the GPT-2 of ``randprop bench plan``), worth it for a clearly better estimate
CHECKPOINT_GAIN = 1.1
#: the method named for the compact non-weight ops in a plan's dict (any memory-saving method
#: swaps in the same compact forms; 4 bits is their default width where they store codes)
OPS_METHOD = "quant:bits=4"
NOT_PLANNED = "not planned: AOP, CRS and SparseVJP (they also approximate the input gradient)"


@dataclasses.dataclass
class LayerOption:
    """One candidate for one layer: bytes the layer holds under it, and its relative variance."""

    method: str
    bytes: int
    variance: float
    #: with the blocks checkpointed: the change this choice makes to the H-term (its block's
    #: R_k for a layer inside a block, H for one outside; module docstring) and to S
    checkpointed_delta: int | None = None
    checkpointed_forward_delta: int | None = None


@dataclasses.dataclass
class BlockBytes:
    """One checkpointed block, every layer exact: its eligible layers, input bytes and the bytes
    its recomputation saves for backward."""

    name: str
    layers: list[str]
    input_bytes: int
    recompute_bytes: int


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
    #: with the blocks checkpointed (empty: not measured or no blocks): the blocks, S and H
    #: with every layer exact (module docstring)
    blocks: list[BlockBytes] = dataclasses.field(default_factory=list)
    checkpointed_forward_bytes: int = 0
    checkpointed_held_bytes: int = 0

    def layer_minimum_bytes(self) -> int:
        """The least predicted total of a per-layer choice."""
        return self.fixed_bytes + sum(min(o.bytes for o in t.options) for t in self.layers)

    def checkpointed_minimum_bytes(self) -> int | None:
        """The least predicted peak with the blocks checkpointed (None: no blocks measured)."""
        if not self.blocks:
            return None
        forward = self.checkpointed_forward_bytes + sum(
            min(o.checkpointed_forward_delta for o in t.options) for t in self.layers
        )  # fmt: skip
        return max(_checkpoint_groups(self).minimum(), forward)

    def minimum_bytes(self) -> int:
        """The least total of any plan: per-layer, uniform (measured whole), plain exact or
        with the blocks checkpointed."""
        checkpointed = self.checkpointed_minimum_bytes()
        return min(self.layer_minimum_bytes(), self.exact_bytes, *self.uniform_bytes.values(),
                   *([checkpointed] if checkpointed is not None else []))  # fmt: skip


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
    predicted_bytes: fixed_bytes + the chosen layers' bytes (with checkpointing: the peak of the
    module docstring, fixed_bytes then H with every layer exact); measured_bytes: the converted
    model's (:func:`measured_bytes`). Fractions are of exact_bytes (plain PyTorch).
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
    #: the blocks are checkpointed too (recomputed in backward): :meth:`apply` installs it
    checkpointing: bool = False

    def __iter__(self) -> Iterator:
        return iter((self.methods, self))

    def apply(self, model: nn.Module, *, seed: int = 0):
        """Convert ``model`` in place to the plan's methods and, where the plan says so,
        checkpoint its blocks; returns convert's report."""
        report = convert(model, self.methods, seed=seed)
        if self.checkpointing:
            install_checkpointing(model)
        return report

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
            ("blocks checkpointed (recomputed in backward: one more forward of each per step; "
             "a layer's bytes are held while its block runs); held when the last block returns, "
             f"every layer exact: {self.fixed_bytes:,} B" if self.checkpointing else
             f"fixed (no choice changes it): {self.fixed_bytes:,} B"),
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
    checkpointing: bool = True,
    checkpoint_gain: float = CHECKPOINT_GAIN,
    max_buckets: int = 1 << 18,
) -> Plan:
    """The per-layer methods minimising the total relative gradient variance of ``model`` on
    ``batch`` (inputs, targets; the loss ``loss_fn(model(inputs), targets)``, e.g.
    F.cross_entropy) whose measured saved bytes fit ``budget``: an int of bytes, or a float in
    (0, 1], a fraction of exact's saved bytes.

    candidates: the settings to choose from (default :data:`CANDIDATES`; exact is always one).
    draws: gradient draws per setting. compact_ops: also swap in the compact non-weight ops
    (exact ReLU masks, k-bit smooth activations and norms) as convert does. checkpointing: also
    plan with the model's blocks checkpointed where it has blocks (``Plan.checkpointing`` says
    whether the plan does; :meth:`Plan.apply` installs it), taken only where it divides the
    least variance without it by more than ``checkpoint_gain`` (1: wherever it lowers it; see
    :data:`CHECKPOINT_GAIN`) or nothing else fits. max_buckets: the most byte buckets
    of the dynamic program (finer plans exactly; see the module docstring).
    The model is not modified. Raises ValueError when the budget is below the smallest
    achievable total (the message names it, in bytes and as a fraction of exact's).
    """
    return plan_loss(
        model, _loss_of(batch, loss_fn), budget, candidates=candidates, draws=draws, seed=seed,
        compact_ops=compact_ops, checkpointing=checkpointing, checkpoint_gain=checkpoint_gain,
        max_buckets=max_buckets,
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
    checkpointing: bool = True,
    checkpoint_gain: float = CHECKPOINT_GAIN,
    max_buckets: int = 1 << 18,
) -> Plan:
    """:func:`plan` with the loss given as ``loss_of(model) -> scalar loss`` (any batch form)."""
    _check_budget(budget)
    _check_gain(checkpoint_gain)
    found = measure(model, loss_of, candidates=candidates, draws=draws, seed=seed,
                    compact_ops=compact_ops, checkpointing=checkpointing)  # fmt: skip
    target = budget_bytes(budget, found.exact_bytes)
    chosen = choose(found, target, max_buckets=max_buckets, checkpoint_gain=checkpoint_gain)
    for _ in range(4):  # measured above the budget (not expected: see the module docstring)
        measured = measured_bytes(model, chosen, loss_of, seed=seed)
        if measured <= target:
            break
        chosen = choose(found, target, max_buckets=max_buckets, checkpoint_gain=checkpoint_gain,
                        capacity=chosen.predicted_bytes - (measured - target))  # fmt: skip
    else:
        raise RuntimeError(f"plan: could not fit {target:,} B (measured {measured:,} B)")
    chosen.measured_bytes = measured
    return chosen


def _check_gain(gain) -> None:
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain >= 1:
        raise ValueError(f"plan: checkpoint_gain must be a number >= 1; got {gain!r}")


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


def measured_bytes(model: nn.Module, planned: Plan, loss_of: LossOf, *, seed: int = 0) -> int:
    """The peak saved bytes of a training step of a copy of ``model`` with ``planned`` applied:
    the forward's with the blocks plain; with them checkpointed, the peak of the module
    docstring (each block's recomputation measured)."""
    work = _plain_copy(model)
    if not planned.checkpointing:
        return _bytes(work, planned.methods, loss_of, seed)
    convert(work, planned.methods, seed=seed)
    measured = _checkpointed(work, loss_of)
    if measured is None:
        raise ValueError(f"plan: cannot checkpoint the blocks of {type(model).__name__}")
    return measured.peak


@dataclasses.dataclass
class _CheckpointedStep:
    forward: int  # S
    held: int  # H
    blocks: list[BlockBytes]
    peak: int


def _checkpointed(model: nn.Module, loss_of: LossOf) -> _CheckpointedStep | None:
    """S, H, the blocks and the peak of a checkpointed copy of ``model`` (converted as it is;
    module docstring). None when the model has no blocks to checkpoint, or calls a block other
    than once."""
    step = _measure_checkpointed(model, loss_of)
    # the checkpointed step leaves young reference cycles, garbage once the call has returned:
    # collected at once (about 1 ms), else a planning run's memory grew by about 3 MB per
    # measurement (2-layer GPT-2)
    gc.collect(1)
    return step


def _measure_checkpointed(model: nn.Module, loss_of: LossOf) -> _CheckpointedStep | None:
    clone = copy.deepcopy(model)
    try:
        units = install_checkpointing(clone)
    except ValueError:
        return None
    names = {id(m): n for n, m in clone.named_modules()}
    try:
        with torch.random.fork_rng(devices=[]):
            with track_saved(clone) as saved, recording_blocks(units, saved) as records:
                # backward too: a checkpointed forward whose graph is dropped unused keeps memory
                loss_of(clone).backward()
    finally:
        remove_checkpointing(clone)  # the wrappers and the model refer to each other
    if len(records) != len(units):
        return None
    blocks = []
    for k, (unit, record) in enumerate(zip(units, records, strict=True)):
        owner = unit.fn.__self__
        members = [names[id(m)] for m in owner.modules() if id(m) in names]
        blocks.append(BlockBytes(names.get(id(owner), f"segment {k}"), members,
                                 record.input_bytes, record.recompute_bytes))  # fmt: skip
    return _CheckpointedStep(saved.bytes, records[-1].held_after, blocks,
                             checkpointed_peak(saved.bytes, records))  # fmt: skip


def _bytes(model: nn.Module, method, loss_of: LossOf, seed: int, *, keep: bool = False) -> int:
    """Saved bytes of one forward (and loss) of ``model`` converted to ``method`` (None: as it
    is): the peak of a training step's, reached at the end of the forward. The model is restored
    afterwards unless ``keep``."""
    if method is not None:
        convert(model, method, seed=seed)
    try:
        with track_saved(model) as saved:
            loss_of(model)  # the graph is freed on return: no backward needed
        return saved.bytes
    finally:
        if not keep:
            restore(model)


def _layer_grads(
    model: nn.Module, loss_of: LossOf, layers: Sequence[str], seed: int
) -> list[torch.Tensor]:
    """Per layer: its own parameters' gradients, flattened into one float64 vector. PyTorch's
    generators are seeded with ``seed`` for the call (and restored after): the model's own
    randomness (dropout) is the same in every draw, so the draws differ by the estimators' own
    seeded draws alone."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
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
    checkpointing: bool = True,
) -> Measurements:
    """Measure every candidate's bytes and relative variance on every layer it converts (see the
    module docstring), and with ``checkpointing`` (where the model has blocks) its bytes with
    the blocks checkpointed; :func:`choose` then plans any budget from them."""
    seed = check_seed(seed, "plan")
    candidates = CANDIDATES if candidates is None else candidates
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(f"plan: draws must be an int >= 2 (to estimate a variance); got {draws!r}")
    for flag, value in (("compact_ops", compact_ops), ("checkpointing", checkpointing)):
        if not isinstance(value, bool):
            raise TypeError(f"plan: {flag} must be True or False; got {value!r}")
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
    checkpointed = _checkpointed(work, loss_of) if checkpointing else None
    restore(work)
    base, held = saved.bytes, {n: saved.by_module.get(n, 0) for n in names}
    reference = _layer_grads(work, loss_of, names, seed)
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
            first = _layer_grads(work, loss_of, names, seed)
        uniform_bytes[str(c)] = whole.bytes
        for k in range(1, draws + 1):  # Welford
            grads = first if k == 1 else _layer_grads(work, loss_of, names, seed)
            for i, g in enumerate(grads):
                delta = g - mean[i]
                mean[i] += delta / k
                m2[i] += delta * (g - mean[i])
        restore(work)
        for name in layers:
            i = names.index(name)
            variance = m2[i].sum().item() / (draws - 1) / norms[i]
            size, deltas = held[name], (None, None) if checkpointed is None else (0, 0)
            if c != exact:
                convert(work, spec({name: c}), seed=seed)
                size += _bytes(work, None, loss_of, seed, keep=True) - base
                if checkpointed is not None:
                    deltas = _checkpointed_deltas(work, loss_of, name, checkpointed)
                restore(work)
            options[name].append(LayerOption(str(c), size, variance, *deltas))
    kinds = dict(work.named_modules())
    tables = [LayerTable(n, type(kinds[n]).__name__, options[n]) for n in names]
    fixed = base - sum(held.values())
    found = Measurements(tables, ops, exact_bytes, fixed, draws, seed, uniform_bytes)
    if checkpointed is not None:
        found.checkpointed_forward_bytes = checkpointed.forward
        found.checkpointed_held_bytes = checkpointed.held
        found.blocks = [dataclasses.replace(b, layers=[n for n in b.layers if n in names])
                        for b in checkpointed.blocks]  # fmt: skip
    return found


def _checkpointed_deltas(
    model: nn.Module, loss_of: LossOf, name: str, reference: _CheckpointedStep
) -> tuple[int, int]:
    """The changes layer ``name``'s choice (``model`` converted with it) makes to the H-term
    (its block's R_k inside a block, H outside; module docstring) and to S, against
    ``reference`` (every layer exact). A layer in a block that also changes H adds that change
    too (conservative)."""
    now = _checkpointed(model, loss_of)
    delta = now.held - reference.held
    for block, then in zip(now.blocks, reference.blocks, strict=True):
        if name in then.layers:
            delta += block.recompute_bytes - then.recompute_bytes
    return delta, now.forward - reference.forward


def choose(
    found: Measurements, budget: int | float, *, max_buckets: int = 1 << 18,
    capacity: int | None = None, checkpoint_gain: float = CHECKPOINT_GAIN,
) -> Plan:  # fmt: skip
    """The plan of least total relative variance whose predicted bytes fit ``budget`` (bytes,
    or a fraction of exact's), by dynamic programming over byte buckets (module docstring);
    among equal variance the fewest bytes. A plan with the blocks checkpointed is taken only
    where it divides the variance of the best plan without by more than ``checkpoint_gain``
    (or nothing else fits). ``capacity``: plan for this many bytes instead (still reported
    against ``budget``)."""
    _check_gain(checkpoint_gain)
    target = budget_bytes(budget, found.exact_bytes)
    minimum = found.minimum_bytes()
    limit = target if capacity is None else capacity
    if limit < minimum:
        raise ValueError(
            f"plan: budget {target:,} B ({target / found.exact_bytes:.4f} of exact's "
            f"{found.exact_bytes:,} B) is below the smallest achievable total, {minimum:,} B "
            f"({minimum / found.exact_bytes:.4f} of exact)"
        )
    alternatives = []  # (variance, checkpointing, bytes, layers, methods, fixed, note, step)

    def add(layers: list[LayerChoice], size: int, fixed: int, note: str = "", step: int = 1,
            *, checkpointing: bool = False, ops: bool = True) -> None:  # fmt: skip
        methods = {c.name: c.method for c in layers}
        if ops:
            methods |= dict.fromkeys(found.ops, OPS_METHOD)
        alternatives.append((sum(c.variance for c in layers), checkpointing, size, layers,
                             methods, fixed, note, step))  # fmt: skip

    if limit >= found.layer_minimum_bytes():
        layers, step = _knapsack(found, limit, max_buckets)
        add(layers, found.fixed_bytes + sum(c.bytes for c in layers), found.fixed_bytes, "", step)
    checkpointed = found.checkpointed_minimum_bytes()
    if checkpointed is not None and limit >= checkpointed:
        solved = _checkpointed_knapsack(found, limit, max_buckets)
        if solved is not None:
            layers, size, step = solved
            add(layers, size, found.checkpointed_held_bytes, "", step, checkpointing=True)
    for text, size in found.uniform_bytes.items():
        # the setting on every layer it converts, measured whole: where layers share an input
        # this is less than the per-layer bytes add up to
        if size <= limit:
            layers = [_choice(t, next((o for o in t.options if o.method == text), t.options[0]))
                      for t in found.layers]  # fmt: skip
            shared = size != found.fixed_bytes + sum(c.bytes for c in layers)
            note = (f"uniform setting {text}, its total measured whole (layers sharing an input "
                    "free it only together: the per-layer bytes, each measured alone, do not add "
                    "up to it)") if shared else ""  # fmt: skip
            add(layers, size, found.fixed_bytes, note)
    if found.exact_bytes <= limit:
        # plain PyTorch: exact layers without the compact ops (whose masks cost bytes where the
        # next layer keeps its input anyway)
        exact_layers = [_choice(t, t.options[0]) for t in found.layers]
        add(exact_layers, found.exact_bytes,
            found.exact_bytes - sum(c.bytes for c in exact_layers),
            "plain PyTorch: no compact ops", ops=False)  # fmt: skip
    if not alternatives:  # the checkpointed minimum assumed S's least terms together
        raise ValueError(
            f"plan: budget {target:,} B ({target / found.exact_bytes:.4f} of exact's "
            f"{found.exact_bytes:,} B): no plan found to fit it (the checkpointed plan's forward "
            "peak does not fit)"
        )
    plain = [a for a in alternatives if not a[1]]
    best = min(plain or alternatives, key=lambda a: a[:3])
    recomputed = [a for a in alternatives if a[1]]
    if plain and recomputed:
        other = min(recomputed, key=lambda a: a[:3])
        best = other if other[0] * checkpoint_gain < best[0] else best
    variance, checkpointing, predicted, layers, methods, fixed, note, step = best
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
        checkpointing=checkpointing,
    )


def _choice(table: LayerTable, option: LayerOption) -> LayerChoice:
    return LayerChoice(table.name, table.kind, option.method, option.bytes,
                       table.options[0].bytes, option.variance)  # fmt: skip


Rows = list[list[tuple[int, float]]]  # per layer, per option: (buckets, variance)


def _dp(rows: Rows, cap: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Multiple-choice knapsack: best[e] the least total variance of one option per layer using
    exactly e buckets (inf: none), and per layer the option chosen at each e."""
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks = []
    for row in rows:
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int32)
        for j, (k, variance) in enumerate(row):
            if k > cap:
                continue
            trial = best[: cap + 1 - k] + variance
            better = trial < new[k:]
            new[k:][better] = trial[better]
            pick[k:][better] = j
        best = new
        picks.append(pick)
    return best, picks


def _backtrack(rows: Rows, picks: list[np.ndarray], e: int) -> list[int]:
    """The option index per layer of :func:`_dp`'s solution at e buckets."""
    chosen = []
    for row, pick in zip(reversed(rows), reversed(picks), strict=True):
        index = int(pick[e])
        chosen.append(index)
        e -= row[index][0]
    return chosen[::-1]


def _at_most(best: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(least variance within e buckets, the fewest buckets reaching it), for every e."""
    value = np.minimum.accumulate(best)
    improves = np.concatenate(([True], best[1:] < value[:-1]))
    where = np.maximum.accumulate(np.where(improves, np.arange(len(best)), 0))
    return value, where


def _bucket_rows(extra: list[list[int]], found: Measurements, max_buckets: int, span: int
                 ) -> tuple[int, Rows]:  # fmt: skip
    """The bucket (the gcd of the byte steps, coarser when there would be more than
    ``max_buckets``) and the layers' options in buckets (rounded up)."""
    step = reduce(math.gcd, (e for row in extra for e in row), 0) or 1
    step = max(step, math.ceil(span / max_buckets))
    rows = [[(math.ceil(e / step), o.variance) for e, o in zip(row, t.options, strict=True)]
            for row, t in zip(extra, found.layers, strict=True)]  # fmt: skip
    return step, rows


def _knapsack(found: Measurements, limit: int, max_buckets: int) -> tuple[list[LayerChoice], int]:
    """The per-layer choice of least total variance whose predicted bytes fit ``limit`` (fewest
    buckets among equal variance), and the bucket size in bytes."""
    minimum = found.layer_minimum_bytes()
    lows = [min(o.bytes for o in t.options) for t in found.layers]
    extra = [[o.bytes - low for o in t.options] for t, low in zip(found.layers, lows, strict=True)]
    step, rows = _bucket_rows(extra, found, max_buckets, sum(max(e) for e in extra))
    cap = min((limit - minimum) // step, sum(max(k for k, _ in row) for row in rows))
    best, picks = _dp(rows, cap)
    chosen = _backtrack(rows, picks, int(np.argmin(best)))  # first minimum: fewest buckets
    layers = [_choice(t, t.options[i]) for t, i in zip(found.layers, chosen, strict=True)]
    return layers, step


@dataclasses.dataclass
class _Groups:
    """The layers of a checkpointed plan (table indices): those before the blocks (they change
    H and S alike), and the groups each bounded on its own for a given share of those: the
    blocks (by R_k - sum_{j > k} I_j, their offset) and the layers after the blocks (they change
    S only: offset S - H). base: H; per layer its delta per option; the least deltas summed."""

    outside: list[int]
    groups: list[list[int]]
    base: int
    offsets: list[int]
    deltas: list[list[int]]
    low_outside: int
    low_groups: list[int]

    def minimum(self) -> int:
        return self.base + self.low_outside + max(
            off + low for off, low in zip(self.offsets, self.low_groups, strict=True)
        )  # fmt: skip

    def predicted(self, choice: Sequence[int]) -> int:
        """The peak of one option index per layer."""

        def total(members: list[int]) -> int:
            return sum(self.deltas[i][choice[i]] for i in members)

        return self.base + total(self.outside) + max(
            off + total(members) for off, members in zip(self.offsets, self.groups, strict=True)
        )  # fmt: skip


def _checkpoint_groups(found: Measurements) -> _Groups:
    index = {t.name: i for i, t in enumerate(found.layers)}
    blocks = [[index[n] for n in b.layers] for b in found.blocks]
    inside = {i for members in blocks for i in members}
    after = [i for i, t in enumerate(found.layers) if i not in inside and all(
        o.checkpointed_delta == 0 for o in t.options)]  # fmt: skip
    before = [i for i in range(len(found.layers)) if i not in inside and i not in after]
    deltas = []
    for i, t in enumerate(found.layers):
        if i in inside:
            deltas.append([o.checkpointed_delta for o in t.options])
        elif i in after:
            deltas.append([o.checkpointed_forward_delta for o in t.options])
        else:  # before the blocks: the larger of its changes to H and to S (equal, as a rule)
            deltas.append([max(o.checkpointed_delta, o.checkpointed_forward_delta)
                           for o in t.options])  # fmt: skip
    lows = [min(row) for row in deltas]
    inputs = [b.input_bytes for b in found.blocks]
    offsets = [b.recompute_bytes - sum(inputs[k + 1 :]) for k, b in enumerate(found.blocks)]
    groups = [*blocks, after]
    offsets.append(found.checkpointed_forward_bytes - found.checkpointed_held_bytes)
    return _Groups(before, groups, found.checkpointed_held_bytes, offsets, deltas,
                   sum(lows[i] for i in before), [sum(lows[i] for i in m) for m in groups])  # fmt: skip


def _checkpointed_knapsack(
    found: Measurements, limit: int, max_buckets: int
) -> tuple[list[LayerChoice], int, int] | None:
    """With the blocks checkpointed: the per-layer choice of least total variance whose
    predicted peak fits ``limit``, that peak, and the bucket size (None: nothing fits). For each
    share e of buckets before the blocks, each group is its own knapsack (module docstring);
    the least e among equal variance. Where S, as measured layer by layer, does not fit, the
    capacity shrinks by the excess."""
    g = _checkpoint_groups(found)
    extra = [[d - min(row) for d in row] for row in g.deltas]
    span = max(sum(max(extra[i]) for i in members) for members in [g.outside, *g.groups])
    step, rows = _bucket_rows(extra, found, max_buckets, span)
    capacity = limit
    for _ in range(4):
        choice = _checkpointed_dp(g, rows, capacity, step)
        if choice is None:
            return None
        options = [t.options[j] for t, j in zip(found.layers, choice, strict=True)]
        forward = found.checkpointed_forward_bytes + sum(
            o.checkpointed_forward_delta for o in options
        )  # fmt: skip
        peak = max(g.predicted(choice), forward)
        if peak <= limit:
            layers = [_choice(t, o) for t, o in zip(found.layers, options, strict=True)]
            return layers, peak, step
        capacity -= peak - limit
    return None


def _checkpointed_dp(g: _Groups, rows: Rows, capacity: int, step: int) -> list[int] | None:
    """The option index per layer of least total variance whose predicted peak (the groups'
    bound, :class:`_Groups`) fits ``capacity``; None if none does."""
    room = capacity - g.base - g.low_outside
    caps = [(room - off - low) // step for off, low in zip(g.offsets, g.low_groups, strict=True)]
    if min(caps) < 0:
        return None
    out_rows = [rows[i] for i in g.outside]
    top = min(*caps, sum(max(k for k, _ in row) for row in out_rows))
    out_best, out_picks = _dp(out_rows, top)
    totals = out_best.copy()
    solved = []
    for members, cap in zip(g.groups, caps, strict=True):
        group_rows = [rows[i] for i in members]
        best, picks = _dp(group_rows, min(cap, sum(max(k for k, _ in r) for r in group_rows)))
        value, where = _at_most(best)
        at = np.minimum(cap - np.arange(top + 1), len(best) - 1)  # the group's buckets per e
        totals += value[at]
        solved.append((group_rows, picks, where, at))
    e = int(np.argmin(totals))
    chosen = dict(zip(g.outside, _backtrack(out_rows, out_picks, e), strict=True))
    for members, (group_rows, picks, where, at) in zip(g.groups, solved, strict=True):
        chosen |= dict(zip(members, _backtrack(group_rows, picks, int(where[at[e]])),
                           strict=True))  # fmt: skip
    return [chosen[i] for i in range(len(rows))]


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
