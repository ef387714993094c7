"""Functional forms of randprop's layers, for use inside any forward (as torch.nn.functional).

The Linear and Conv forms take F.linear's and F.conv1d/2d/3d's arguments (ints or tuples,
padding 'same' and 'valid'), then the keywords ``method`` (a config of the method or its string
form) and ``seed``: ``rad_conv2d(x, w, b, stride=2, padding=1, method="rad:keep=0.2", seed=3)``.
The forms with state across steps take its holder: ``aop_linear(..., memory=rp.AOPMemory())``,
``crs_linear(..., state=rp.CRSState())``. ``attention`` is F.scaled_dot_product_attention saving
no L x S tensor for backward (dropout by seed). The smooth activations and gates (gelu, silu, tanh,
sigmoid, swiglu, geglu) take ``bits`` and ``seed``: they store their derivative in k bits.
``layer_norm``, ``rms_norm``, ``batch_norm``, ``group_norm`` (and LLaMA's ``llama_rms_norm``)
store the normalised input in ``bits`` bits, stochastic rounding from ``seed``.
"""

from randprop.methods.activations import geglu, gelu, sigmoid, silu, swiglu, tanh
from randprop.methods.aop import aop_linear
from randprop.methods.attention import attention
from randprop.methods.crs import crs_linear
from randprop.methods.dropout import dropout
from randprop.methods.loss import linear_cross_entropy
from randprop.methods.masks import leaky_relu, relu
from randprop.methods.norms import batch_norm, group_norm, layer_norm, llama_rms_norm, rms_norm
from randprop.methods.quant import (
    quant_conv,
    quant_conv1d,
    quant_conv2d,
    quant_conv3d,
    quant_linear,
)
from randprop.methods.rad import (
    rad_conv,
    rad_conv1d,
    rad_conv2d,
    rad_conv3d,
    rad_linear,
    rad_lstm,
    rad_relu_rnn,
)
from randprop.methods.trace import trace_conv, trace_conv1d, trace_conv2d, trace_conv3d
from randprop.methods.vjp import (
    sparse_vjp,
    vjp_conv,
    vjp_conv1d,
    vjp_conv2d,
    vjp_conv3d,
    vjp_linear,
)

__all__ = [
    "aop_linear",
    "attention",
    "batch_norm",
    "crs_linear",
    "dropout",
    "geglu",
    "gelu",
    "group_norm",
    "layer_norm",
    "leaky_relu",
    "linear_cross_entropy",
    "llama_rms_norm",
    "quant_conv",
    "quant_conv1d",
    "quant_conv2d",
    "quant_conv3d",
    "quant_linear",
    "rad_conv",
    "rad_conv1d",
    "rad_conv2d",
    "rad_conv3d",
    "rad_linear",
    "rad_lstm",
    "rad_relu_rnn",
    "relu",
    "rms_norm",
    "sigmoid",
    "silu",
    "sparse_vjp",
    "swiglu",
    "tanh",
    "trace_conv",
    "trace_conv1d",
    "trace_conv2d",
    "trace_conv3d",
    "vjp_conv",
    "vjp_conv1d",
    "vjp_conv2d",
    "vjp_conv3d",
    "vjp_linear",
]
