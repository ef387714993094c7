"""Model registry: name -> (constructor, input shape of one example, description).

Each model module registers its constructors with :func:`register_model`; the package imports
them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str


MODELS: dict[str, ModelSpec] = {}


def register_model(
    name: str, input_shape: tuple[int, ...], description: str
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model constructor under ``name``, taking examples of shape
    ``input_shape``."""

    def register(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = ModelSpec(build, input_shape, description)
        return build

    return register


def _check(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, **kwargs) -> nn.Module:
    """A fresh model by name (raises ValueError listing the choices for an unknown name)."""
    return _check(name).build(**kwargs)


def input_shape(name: str) -> tuple[int, ...]:
    """Shape of one input example of the named model."""
    return _check(name).input_shape
