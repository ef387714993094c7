"""Gradient quality of an estimator against exact backprop, over K independent draws.

Per parameter with exact gradient g and draws g_1..g_K (mean m, per-element sample variance v):
- rel_bias = |m - g| / |g|, with standard error sqrt(sum v / K) / |g| (what |m - g| / |g| is
  expected to be from noise alone when the estimator is unbiased);
- rel_variance = sum v / |g|^2 (total variance relative to the squared gradient norm);
- cosine = mean_k cos(g_k, g).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from randprop.config import MethodConfig


@dataclasses.dataclass
class ParameterDiagnostics:
    name: str
    numel: int
    rel_bias: float
    rel_bias_se: float
    rel_variance: float
    cosine: float


@dataclasses.dataclass
class GradientDiagnostics:
    method: str
    draws: int
    parameters: list[ParameterDiagnostics]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        head = f"{'parameter':<28} {'numel':>8} {'rel bias':>10} {'± se':>9} {'rel var':>10} {'cos':>7}"
        lines = [f"method {self.method}, {self.draws} draws", head, "-" * len(head)]
        for p in self.parameters:
            lines.append(
                f"{p.name:<28} {p.numel:>8} {p.rel_bias:>10.4f} {p.rel_bias_se:>9.4f} "
                f"{p.rel_variance:>10.4f} {p.cosine:>7.4f}"
            )
        return "\n".join(lines)


def _grads(model: nn.Module, batch, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    inputs, targets = batch
    loss_fn(model(inputs), targets).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def gradient_diagnostics(
    model: nn.Module,
    method: MethodConfig | str,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    draws: int = 100,
    seed: int = 0,
) -> GradientDiagnostics:
    """Bias, variance and cosine of ``method``'s gradients on ``batch`` against exact backprop.

    The model is copied (twice: an exact reference and a converted copy); it is not modified.
    """
    from randprop.convert import convert, restore
    from randprop.methods import parse_method

    if draws < 2:
        raise ValueError(f"draws must be at least 2 to estimate a variance; got {draws}")
    cfg = parse_method(method)
    reference = copy.deepcopy(model)
    restore(reference)
    estimator = copy.deepcopy(reference)
    convert(estimator, cfg, seed=seed)
    exact = _grads(reference, batch, loss_fn)
    mean = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in exact.items()}
    m2 = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in exact.items()}
    cos = dict.fromkeys(exact, 0.0)
    for k in range(1, draws + 1):
        for name, g in _grads(estimator, batch, loss_fn).items():
            g = g.double()
            delta = g - mean[name]
            mean[name] += delta / k
            m2[name] += delta * (g - mean[name])
            cos[name] += F.cosine_similarity(
                g.flatten(), exact[name].double().flatten(), dim=0
            ).item()
    rows = []
    for name, g in exact.items():
        norm = g.double().norm().item() or math.nan
        total_var = (m2[name] / (draws - 1)).sum().item()
        rows.append(
            ParameterDiagnostics(
                name=name,
                numel=g.numel(),
                rel_bias=(mean[name] - g.double()).norm().item() / norm,
                rel_bias_se=math.sqrt(total_var / draws) / norm,
                rel_variance=total_var / norm**2,
                cosine=cos[name] / draws,
            )
        )
    return GradientDiagnostics(method=str(cfg), draws=draws, parameters=rows)
