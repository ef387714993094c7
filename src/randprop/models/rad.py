"""RAD paper's convolutional net (Oktay et al., 2020, "Randomized automatic differentiation").

Four 5x5 convolutions (16/32/32/32 channels, padding 2) with ReLU, 2x2 average pooling after the
second and the fourth, and one linear layer: 2048 -> 10 on 3x32x32 CIFAR-10 as in the paper,
1568 -> 10 on 1x28x28 MNIST.
"""

from __future__ import annotations

from torch import nn

from randprop.models.registry import register_model


@register_model("rad-cnn", (1, 28, 28), "4-conv 16/32/32/32 5x5 net, avg pools (RAD paper; MNIST)")
def rad_cnn(in_channels: int = 1, size: int = 28, classes: int = 10) -> nn.Module:
    """The RAD 4-conv net for ``in_channels`` x ``size`` x ``size`` input (size divisible by 4)."""
    if size % 4:
        raise ValueError(f"size must be divisible by 4; got {size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(32, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 5, padding=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (size // 4) ** 2, classes),
    )


@register_model("rad-cnn-cifar", (3, 32, 32), "4-conv 16/32/32/32 5x5 net (RAD paper, CIFAR-10)")
def rad_cnn_cifar(classes: int = 10) -> nn.Module:
    """The RAD 4-conv net on 3x32x32 input, as in the paper's CIFAR-10 experiment."""
    return rad_cnn(in_channels=3, size=32, classes=classes)
