"""Estimator families: one module each with its config, autograd Functions and layer classes."""

from randprop.methods.exact import Exact
from randprop.methods.rad import RAD

__all__ = ["Exact", "RAD"]
