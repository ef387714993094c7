"""randprop: train PyTorch models with less memory by randomized or error-corrected gradients.

import randprop as rp
report = rp.convert(model, rp.RAD(keep=0.1))
with rp.track_saved(model) as saved:
    loss = loss_fn(model(x), y)
loss.backward()
print(report, saved.bytes)
"""

from randprop import functional, pde, rules
from randprop.config import METHODS, MethodConfig, parse_method
from randprop.convert import ConversionReport, convert, load_method_state, method_state, restore
from randprop.measure import GradientDiagnostics, gradient_diagnostics, track_saved
from randprop.methods import AOP, CRS, RAD, Exact, SparseVJP, Trace, reset_memory

__version__ = "0.1.0"

__all__ = [
    "AOP",
    "CRS",
    "METHODS",
    "RAD",
    "ConversionReport",
    "Exact",
    "GradientDiagnostics",
    "MethodConfig",
    "SparseVJP",
    "Trace",
    "convert",
    "functional",
    "gradient_diagnostics",
    "load_method_state",
    "method_state",
    "parse_method",
    "pde",
    "reset_memory",
    "restore",
    "rules",
    "track_saved",
]
