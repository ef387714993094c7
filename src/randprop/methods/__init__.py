"""Estimator families: one module (or, spanning files, one package: rad/) each with its config,
autograd Functions, functional forms and layer classes.

Importing this package registers every method: its METHODS and parse_method know them all.
"""

from randprop.config import METHODS, MethodConfig, parse_method
from randprop.methods.aop import AOP, AOPMemory
from randprop.methods.base import ConvertedLayer, LayerState, RandomizedLayer, reset_memory
from randprop.methods.crs import CRS, CRSState
from randprop.methods.exact import Exact
from randprop.methods.quant import Quant
from randprop.methods.rad import RAD
from randprop.methods.trace import Trace
from randprop.methods.vjp import SparseVJP

__all__ = [
    "METHODS",
    "MethodConfig",
    "parse_method",
    "AOP",
    "CRS",
    "Quant",
    "RAD",
    "AOPMemory",
    "CRSState",
    "ConvertedLayer",
    "LayerState",
    "RandomizedLayer",
    "Exact",
    "SparseVJP",
    "Trace",
    "reset_memory",
]
