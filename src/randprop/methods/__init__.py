"""Estimator families: one module each with its config, autograd Functions and layer classes."""

from randprop.methods import rad_rnn  # noqa: F401 (registers RAD's recurrent layers)
from randprop.methods.exact import Exact
from randprop.methods.rad import RAD

__all__ = ["Exact", "RAD"]
