"""Exact backpropagation: the baseline. Converting with it changes nothing."""

from __future__ import annotations

import dataclasses

from randprop.config import MethodConfig, register


@register
@dataclasses.dataclass(frozen=True)
class Exact(MethodConfig):
    """Plain PyTorch autograd, kept as the reference every estimator is compared with."""

    name = "exact"
    saves_memory = False
