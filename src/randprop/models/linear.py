"""Linear models of the Mem-AOP-GD paper (Nikolaidis et al.): softmax and linear regression."""

from __future__ import annotations

from torch import nn

from randprop.models.registry import register_model


@register_model("softmax-reg", (1, 28, 28), "784-10 softmax regression (Mem-AOP-GD, MNIST)")
def softmax_regression(in_features: int = 784, classes: int = 10) -> nn.Module:
    """784 -> 10 softmax regression (Mem-AOP-GD's MNIST model). It returns logits: the
    softmax belongs inside the cross-entropy loss, not before it (the authors' code applied a
    softmax first, which is why their exact baseline stops at 87%)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, classes))


def linear_regression(in_features: int, outputs: int = 1) -> nn.Module:
    """in_features -> outputs least-squares regression (the paper's UCI energy model)."""
    return nn.Linear(in_features, outputs)
