"""The trace-estimation paper's MNIST network (Louboutin et al., 2021; Flux model-zoo conv net)."""

from __future__ import annotations

from torch import nn

from randprop.models.registry import register_model


@register_model(
    "trace-cnn",
    (1, 28, 28),
    "3 conv 3x3 16/32/32, ReLU + 2x2 max pool each, linear 288-10 (trace paper, MNIST)",
)
def trace_cnn(in_channels: int = 1, classes: int = 10, size: int = 28) -> nn.Module:
    """Three 3x3 convs (16/32/32 channels, padding 1), each followed by ReLU and 2x2 max pooling,
    then a linear classifier on the 32 x 3 x 3 features (for 28 x 28 input)."""
    side = size // 8
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * side * side, classes),
    )
