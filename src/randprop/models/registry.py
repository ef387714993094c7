"""Model registry: name -> (constructor, input shape of one example, number of classes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from randprop.models import feedback, feedforward, linear, recurrent, vision
from randprop.models import rad as rad_models
from randprop.models import trace as trace_models


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str


MODELS: dict[str, ModelSpec] = {
    "softmax-reg": ModelSpec(
        linear.softmax_regression, (1, 28, 28), "784-10 softmax regression (Mem-AOP-GD, MNIST)"
    ),
    "mlp": ModelSpec(
        feedforward.mlp, (1, 28, 28), "784-300-300-300-10 ReLU MLP (RAD paper, MNIST)"
    ),
    "cnn": ModelSpec(
        feedforward.cnn, (1, 28, 28), "small conv net for 1x28x28 input (strided convs, no pooling)"
    ),
    "dfa-mlp": ModelSpec(
        feedback.dfa_mlp, (1, 28, 28), "784-100-30-10 ReLU MLP (MEM-DFA paper, MNIST)"
    ),
    "dfa-cnn": ModelSpec(
        feedback.dfa_cnn,
        (1, 28, 28),
        "2 conv-BN-ReLU-maxpool blocks, FC 128 + dropout (MEM-DFA, MNIST)",
    ),
    "rad-cnn": ModelSpec(
        rad_models.rad_cnn, (1, 28, 28), "4-conv 16/32/32/32 5x5 net, avg pools (RAD paper; MNIST)"
    ),
    "rad-cnn-cifar": ModelSpec(
        rad_models.rad_cnn_cifar, (3, 32, 32), "4-conv 16/32/32/32 5x5 net (RAD paper, CIFAR-10)"
    ),
    "trace-cnn": ModelSpec(
        trace_models.trace_cnn,
        (1, 28, 28),
        "3 conv 3x3 16/32/32, ReLU + 2x2 max pool each, linear 288-10 (trace paper, MNIST)",
    ),
    "irnn": ModelSpec(
        recurrent.irnn, (28, 28), "IRNN hidden 100 on 28 rows of 28 pixels (RAD paper, seq-MNIST)"
    ),
    "lstm": ModelSpec(recurrent.lstm, (28, 28), "LSTM hidden 100 on 28 rows of 28 pixels"),
    "bagnet": ModelSpec(
        vision.bagnet, (1, 28, 28), "small BagNet: 3x3/1x1 convs, 9x9-patch logits averaged"
    ),
    "vit": ModelSpec(vision.vit, (1, 28, 28), "small ViT: 16 patches 7x7, 2 blocks of width 64"),
}


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
