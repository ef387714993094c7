"""Feedforward reference models for 1x28x28 (MNIST-sized) input."""

from __future__ import annotations

from torch import nn

from randprop.models.registry import register_model


@register_model("mlp", (1, 28, 28), "784-300-300-300-10 ReLU MLP (RAD paper, MNIST)")
def mlp(in_features: int = 784, hidden: int = 300, depth: int = 3, classes: int = 10) -> nn.Module:
    """RAD paper's MNIST MLP (Oktay et al., 2020): 784-300-300-300-10 with ReLU."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


@register_model("cnn", (1, 28, 28), "small conv net for 1x28x28 input (strided convs, no pooling)")
def cnn(in_channels: int = 1, classes: int = 10) -> nn.Module:
    """A small conv net for 1x28x28 input: 5x5 convs 16/32/32 channels, downsampling by stride
    (max pooling would save float inputs and int64 indices, hiding what a method saves)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, classes),
    )
