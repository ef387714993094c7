"""Installing a method on a model, and the baselines a user would otherwise pick.

- a per-layer method: ``convert`` then plain backprop;
- a learning rule from ``LEARNING_RULES``;
- activation checkpointing: ``torch.utils.checkpoint`` (non-reentrant) per block. A block is an
  element of the model's ``blocks`` / ``layers`` list; for an ``nn.Sequential`` stack, a weight
  layer with the norms, activations and other parameter-free layers after it
  (``randprop.blocks.sequential_blocks``), grouped into ``segments`` consecutive runs
  (default ceil(sqrt(#blocks)), Chen et al. 2016: checkpointing every single layer of a plain
  stack would save nothing, since a layer's input is the previous layer's saved output);
- the memory-matched small batch: exact backprop with the largest batch whose *measured* saved
  bytes do not exceed a method's (measured on copies: the model given is never trained).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from randprop.checkpointing import checkpointed_peak, install_checkpointing, recording_blocks
from randprop.convert import ConversionReport, convert, load_method_state, method_state
from randprop.measure.saved import track_saved
from randprop.methods import METHODS, parse_method
from randprop.methods.base import RandomizedLayer
from randprop.train.learning_rules import LEARNING_RULES, Backprop, LearningRule, LossFn


def method_choices() -> list[str]:
    return sorted({*METHODS, *LEARNING_RULES, "checkpoint"})


def install(
    model: nn.Module,
    method: str | dict[str, str],
    loss_fn: LossFn,
    seed: int,
    *,
    model_name: str | None = None,
    checkpointing: bool = False,
) -> LearningRule:
    """Install ``method`` on ``model`` in place; return the rule that computes gradients.

    A per-layer method returns :class:`Backprop` with the conversion report as ``.report``; one
    that converts no weight layer of the model (e.g. trace on an MLP) raises ValueError naming
    the model (``model_name``, else its class), the method and why each layer was skipped.
    checkpointing: also checkpoint the model's blocks (after converting them), as a plan with
    ``checkpointing`` asks; only with a per-layer method.
    """
    if not isinstance(checkpointing, bool):
        raise TypeError(f"checkpointing must be True or False; got {checkpointing!r}")
    if checkpointing:
        name = "" if isinstance(method, dict) else str(method).partition(":")[0].strip().lower()
        if name in (*LEARNING_RULES, "checkpoint"):
            raise ValueError(
                f"checkpointing=True goes with a per-layer method (or a dict of them); got "
                f"{method!r}"
            )
        rule = install(model, method, loss_fn, seed, model_name=model_name)
        install_checkpointing(model)
        return rule
    if isinstance(method, dict):  # module-name patterns -> per-layer methods
        rule = Backprop(model, loss_fn, seed)
        rule.report = convert(model, method, seed=seed)
        return rule

    name, _, options = str(method).strip().partition(":")
    name = name.strip().lower()
    if name == "checkpoint":
        install_checkpointing(model, _segments_option(options))
        return Backprop(model, loss_fn, seed)
    if name in LEARNING_RULES:
        if options.strip():
            raise ValueError(f"learning rule {name!r} takes no options; got {options!r}")
        return LEARNING_RULES[name](model, loss_fn, seed)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_choices())}")
    cfg = parse_method(method)
    report = convert(model, cfg, seed=seed)
    if cfg.name != "exact" and not any(isinstance(m, RandomizedLayer) for m in model.modules()):
        raise ValueError(
            f"method {str(method)!r} converts no layer of model "
            f"{model_name or type(model).__name__!r}: {_skip_reasons(report)}"
        )
    rule = Backprop(model, loss_fn, seed)
    rule.report = report
    return rule


def _skip_reasons(report: ConversionReport) -> str:
    """'reason (layer, layer); ...': the report's skip reasons, each with the layers it hit."""
    by_reason: dict[str, list[str]] = {}
    for layer, reason in report.skipped.items():
        by_reason.setdefault(reason, []).append(layer or "<root>")
    if not by_reason:
        return "it has no layer that any method converts"
    return "; ".join(f"{reason} ({', '.join(layers)})" for reason, layers in by_reason.items())


def _segments_option(options: str) -> int | None:
    if not options.strip():
        return None
    key, _, value = options.partition("=")
    if key.strip() != "segments" or not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"checkpoint: the only option is segments=<int >= 1>; got {options!r}")
    return int(value)


def measure_step(model: nn.Module, rule: LearningRule, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes saved for backward by one training step of ``rule``, leaving the model as it was.

    Gradients are cleared and the method's step counters and the global RNG restored afterwards.
    Checkpointing: the peak of :func:`checkpointed_peak` (each block's recomputation measured).
    """
    state = method_state(model)
    rng = torch.get_rng_state()
    units = getattr(model, "rp_checkpoint_units", [])
    try:
        with track_saved(model) as saved, recording_blocks(units, saved) as records:
            rule.backward(x, y)
    finally:
        model.zero_grad(set_to_none=True)
        load_method_state(model, state)
        torch.set_rng_state(rng)
    return checkpointed_peak(saved.bytes, records) if records else saved.bytes


def saved_bytes_of(
    build: Callable[[], nn.Module],
    method: str,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    seed: int = 0,
    checkpointing: bool = False,
) -> int:
    """Measured saved bytes of ``method`` for the batch (x, y), on a deep copy of ``build()``'s
    model: the model it returns (a fresh one, or the user's) is left as it was, buffers such as
    BatchNorm's running statistics and a method's state (AOP memory, CRS estimate) included.
    checkpointing: the method with the blocks checkpointed (:func:`install`)."""
    model = copy.deepcopy(build())
    rule = install(model, method, loss_fn, seed, checkpointing=checkpointing)
    try:
        return measure_step(model, rule, x, y)
    finally:
        rule.remove()


def matched_batch(
    build: Callable[[], nn.Module],
    method: str,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    seed: int = 0,
) -> tuple[int, int]:
    """(b, budget): the largest b <= len(x) with exact saved bytes at batch b <= ``budget``, the
    bytes ``method`` saves at batch len(x). Saved bytes grow with the batch: binary search.
    Every measurement runs on a deep copy of ``build()``'s model (see :func:`saved_bytes_of`)."""
    budget = saved_bytes_of(build, method, x, y, loss_fn, seed)

    def exact_bytes(b: int) -> int:  # clones: a view would be counted as its whole storage
        return saved_bytes_of(build, "exact", x[:b].clone(), y[:b].clone(), loss_fn, seed)

    if exact_bytes(1) > budget:
        raise ValueError(f"even batch 1 of exact backprop saves more than {method} ({budget} B)")
    return largest_batch(lambda b: exact_bytes(b) <= budget, len(x)), budget


def largest_batch(fits: Callable[[int], bool], high: int) -> int:
    """The largest b in 0..high with fits(b) (fits is monotone: true up to some b, then false),
    by bisection; 0 when no batch fits."""
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low
