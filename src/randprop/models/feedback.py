"""Reference models of the MEM-DFA paper's MNIST experiments (Chu et al., 2020).

Both are nn.Sequential, so FA, DFA and MEM-DFA find their blocks automatically (a new block at
each Linear / conv layer; activations, batch norm, pooling and dropout join the block before).
"""

from __future__ import annotations

from torch import nn

from randprop.models.registry import register_model

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


@register_model("dfa-mlp", (1, 28, 28), "784-100-30-10 ReLU MLP (MEM-DFA paper, MNIST)")
def dfa_mlp(
    in_features: int = 784,
    hidden: tuple[int, ...] = (100, 30),
    classes: int = 10,
    activation: str = "relu",
) -> nn.Sequential:
    """The paper's fully connected MNIST net 784-100-30-10."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


@register_model(
    "dfa-cnn", (1, 28, 28), "2 conv-BN-ReLU-maxpool blocks, FC 128 + dropout (MEM-DFA, MNIST)"
)
def dfa_cnn(
    in_channels: int = 1, channels: tuple[int, int] = (16, 32), hidden: int = 128, classes: int = 10
) -> nn.Sequential:
    """A small conv net for 1x28x28 input: two blocks conv 5x5 -> batch norm -> ReLU -> max pool 2,
    then Linear(hidden) -> ReLU -> dropout 0.2 -> Linear(classes). Conv blocks receive B_l e
    projected to C x H x W."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=2),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, hidden),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(hidden, classes),
    )
