"""Functional forms of randprop's layers, for use inside any forward (as torch.nn.functional)."""

from randprop.methods.aop import aop_linear
from randprop.methods.crs import crs_linear
from randprop.methods.masks import leaky_relu, relu
from randprop.methods.rad import rad_conv, rad_linear
from randprop.methods.rad_rnn import rad_lstm, rad_relu_rnn
from randprop.methods.trace import trace_conv
from randprop.methods.vjp import sparse_vjp, vjp_conv, vjp_linear

__all__ = [
    "aop_linear",
    "crs_linear",
    "leaky_relu",
    "rad_conv",
    "rad_linear",
    "rad_lstm",
    "rad_relu_rnn",
    "relu",
    "sparse_vjp",
    "trace_conv",
    "vjp_conv",
    "vjp_linear",
]
