"""Functional forms of randprop's layers, for use inside any forward (as torch.nn.functional)."""

from randprop.methods.masks import leaky_relu, relu
from randprop.methods.rad import rad_conv, rad_linear

__all__ = ["leaky_relu", "rad_conv", "rad_linear", "relu"]
