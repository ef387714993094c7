"""RAD's Linear and Conv layers, and the layer types RAD converts (the recurrent ones: rnn.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from randprop.config import register_layers
from randprop.methods.base import RandomizedConvNd, RandomizedLayer
from randprop.methods.rad.config import RAD
from randprop.methods.rad.functional import rad_conv, rad_linear


class RADLinear(RandomizedLayer, nn.Linear):
    """nn.Linear with RAD weight gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rp_needs_weight_grad():
            return F.linear(x, self.weight, self.bias)
        return rad_linear(
            x, self.weight, self.bias, method=self.rp_method, seed=self.rp_next_seed()
        )


class _RADConvNd(RandomizedConvNd):
    rp_conv = staticmethod(rad_conv)


class RADConv1d(_RADConvNd, nn.Conv1d):
    """nn.Conv1d with RAD weight gradients."""


class RADConv2d(_RADConvNd, nn.Conv2d):
    """nn.Conv2d with RAD weight gradients."""


class RADConv3d(_RADConvNd, nn.Conv3d):
    """nn.Conv3d with RAD weight gradients."""


register_layers(
    RAD, {nn.Linear: RADLinear, nn.Conv1d: RADConv1d, nn.Conv2d: RADConv2d, nn.Conv3d: RADConv3d}
)
