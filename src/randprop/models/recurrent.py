"""Recurrent reference models for sequential MNIST (RAD paper, Oktay et al., 2020).

An image (B, 28, 28) (or (B, 1, 28, 28)) is read as a sequence: 28 steps of one 28-pixel row by
default, or 784 steps of one pixel (``pixels=True``). The class is predicted from the last
hidden state.
"""

from __future__ import annotations

import torch
from torch import nn

from randprop.models.registry import register_model


class SequenceClassifier(nn.Module):
    """A recurrent layer (batch_first) read to the end, then a Linear head on h_T."""

    def __init__(self, rnn: nn.RNNBase, classes: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(x.shape[0], -1, self.rnn.input_size)
        out, _ = self.rnn(seq)
        # a copy of h_T, so that the head does not keep the whole output sequence alive
        return self.head(out[:, -1].clone())


@register_model("irnn", (28, 28), "IRNN hidden 100 on 28 rows of 28 pixels (RAD paper, seq-MNIST)")
def irnn(hidden: int = 100, classes: int = 10, pixels: bool = False, seed: int = 0) -> nn.Module:
    """IRNN (Le et al., 2015): ReLU RNN with W_hh = I, zero biases, W_ih ~ N(0, 0.001^2)
    (drawn from ``seed``); the head has PyTorch's default initialisation."""
    rnn = nn.RNN(1 if pixels else 28, hidden, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.eye(hidden))
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.zero_()
        rnn.weight_ih_l0.normal_(0.0, 0.001, generator=torch.Generator().manual_seed(seed))
    return SequenceClassifier(rnn, classes)


@register_model("lstm", (28, 28), "LSTM hidden 100 on 28 rows of 28 pixels")
def lstm(hidden: int = 100, classes: int = 10, pixels: bool = False) -> nn.Module:
    """A one-layer LSTM sequence classifier (PyTorch's default initialisation)."""
    return SequenceClassifier(nn.LSTM(1 if pixels else 28, hidden, batch_first=True), classes)
