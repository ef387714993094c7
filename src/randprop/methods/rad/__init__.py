"""RAD: randomized automatic differentiation (Oktay et al., 2020), for Linear, Conv and
recurrent layers. Forward, input and bias gradients are exact; the weight gradient is unbiased,
computed from a random sketch of the layer's input stored in place of the input.

- config.py: the :class:`RAD` config;
- functional.py: the sketches and autograd Functions, ``rad_linear``, ``rad_conv1d/2d/3d``;
- layers.py: RADLinear, RADConv1d/2d/3d;
- rnn.py: RAD through time, ``rad_relu_rnn``, ``rad_lstm`` and RADRNN, RADLSTM, RADRNNCell,
  RADLSTMCell.

Importing the package registers the config and every layer type RAD converts.
"""

from randprop.methods.rad.config import RAD
from randprop.methods.rad.functional import (
    compress,
    linear_weight_grad,
    rad_conv,
    rad_conv1d,
    rad_conv2d,
    rad_conv3d,
    rad_linear,
    row_windows,
    rows_per_chunk,
    x_hat_chunks,
)
from randprop.methods.rad.layers import RADConv1d, RADConv2d, RADConv3d, RADLinear
from randprop.methods.rad.rnn import (
    RADLSTM,
    RADRNN,
    RADLSTMCell,
    RADRNNCell,
    rad_lstm,
    rad_relu_rnn,
)

__all__ = [
    "RAD",
    "RADLSTM",
    "RADRNN",
    "RADConv1d",
    "RADConv2d",
    "RADConv3d",
    "RADLSTMCell",
    "RADLinear",
    "RADRNNCell",
    "compress",
    "linear_weight_grad",
    "rad_conv",
    "rad_conv1d",
    "rad_conv2d",
    "rad_conv3d",
    "rad_linear",
    "rad_lstm",
    "rad_relu_rnn",
    "row_windows",
    "rows_per_chunk",
    "x_hat_chunks",
]
