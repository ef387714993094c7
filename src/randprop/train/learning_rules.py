"""Learning rules the training loop can use instead of backprop through a converted model.

A rule is built by a factory ``(model, loss_fn, seed) -> LearningRule`` registered under a name
(e.g. "fa", "dfa", "memdfa" from randprop.rules). The training loop asks
``rule.backward(x, y)`` for the loss, after which the gradients are in ``.grad`` for any
optimizer. Per-layer estimators (rad, trace, ...) are not rules: they convert the model and use
plain ``loss.backward()``, which is :class:`Backprop`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from randprop.convert import ConversionReport

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LearningRule(Protocol):
    def backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Compute the loss on (x, y), leave parameter gradients in .grad, return the loss."""

    def remove(self) -> None:
        """Undo whatever the rule installed on the model."""


RuleFactory = Callable[[nn.Module, LossFn, int], LearningRule]
LEARNING_RULES: dict[str, RuleFactory] = {}


def register_rule(name: str) -> Callable[[RuleFactory], RuleFactory]:
    """Decorator registering a learning-rule factory under ``name``."""

    def register(factory: RuleFactory) -> RuleFactory:
        LEARNING_RULES[name] = factory
        return factory

    return register


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
