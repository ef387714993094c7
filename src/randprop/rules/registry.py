"""The registry of learning rules: what a rule provides and the names the training loop knows.

A rule is built by a factory ``(model, loss_fn, seed) -> LearningRule`` registered under a name
("fa", "dfa", "memdfa" by the modules of this package). ``rule.backward(x, y)`` returns the loss
and leaves the gradients in ``.grad`` for any optimizer; ``rule.remove()`` undoes what the rule
installed on the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

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
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_rule: name must be a non-empty string; got {name!r}")

    def register(factory: RuleFactory) -> RuleFactory:
        LEARNING_RULES[name] = factory
        return factory

    return register
