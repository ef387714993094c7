"""RAD's Linear and Conv layers, and the layer types RAD converts (the recurrent ones: rnn.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from randprop.config import CONV1D, register_layers
from randprop.methods.base import RandomizedConvNd, RandomizedLayer
from randprop.methods.projections import Conv1DLayer, MultiheadAttentionLayer
from randprop.methods.rad.config import RAD
from randprop.methods.rad.functional import rad_conv, rad_linear


class RADLinear(RandomizedLayer, nn.Linear):
    """nn.Linear with RAD weight gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rp_linear(x, self.weight, self.bias)

    def rp_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x weight^T + bias with RAD's weight gradient (plain F.linear when none is needed)."""
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return F.linear(x, weight, bias)
        return rad_linear(x, weight, bias, method=self.rp_method, seed=self.rp_next_seed())


class RADConv1D(Conv1DLayer):
    """transformers' Conv1D with RAD weight gradients (combined with the model's Conv1D class)."""

    rp_linear = RADLinear.rp_linear


class RADMultiheadAttention(MultiheadAttentionLayer, nn.MultiheadAttention):
    """nn.MultiheadAttention with RAD weight gradients for its in-projection (its out_proj is
    converted as a Linear)."""

    rp_linear = RADLinear.rp_linear


class _RADConvNd(RandomizedConvNd):
    rp_conv = staticmethod(rad_conv)


class RADConv1d(_RADConvNd, nn.Conv1d):
    """nn.Conv1d with RAD weight gradients."""


class RADConv2d(_RADConvNd, nn.Conv2d):
    """nn.Conv2d with RAD weight gradients."""


class RADConv3d(_RADConvNd, nn.Conv3d):
    """nn.Conv3d with RAD weight gradients."""


register_layers(
    RAD,
    {
        nn.Linear: RADLinear,
        nn.Conv1d: RADConv1d,
        nn.Conv2d: RADConv2d,
        nn.Conv3d: RADConv3d,
        CONV1D: RADConv1D,
        nn.MultiheadAttention: RADMultiheadAttention,
    },
)
