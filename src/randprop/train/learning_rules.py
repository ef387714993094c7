"""Learning rules as the training loop uses them: the registry of randprop.rules, and Backprop.

Rules ("fa", "dfa", "memdfa") live in :mod:`randprop.rules` with their registry
(:mod:`randprop.rules.registry`). Per-layer estimators (rad, trace, ...) are not rules: they
convert the model and use plain ``loss.backward()``, which is :class:`Backprop`.
"""

from __future__ import annotations

import torch
from torch import nn

import randprop.rules  # noqa: F401 (registers fa, dfa, memdfa)
from randprop.convert import ConversionReport
from randprop.rules.registry import LEARNING_RULES, LearningRule, LossFn, register_rule

__all__ = ["LEARNING_RULES", "Backprop", "LearningRule", "LossFn", "register_rule"]


class Backprop:
    """Ordinary backpropagation (through whatever layers convert() installed)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, seed: int = 0) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.report: ConversionReport | None = None  # what convert() did, when it ran

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return loss

    def remove(self) -> None:
        pass
