"""Measurement: saved-tensor accounting, peak memory, timing, gradient diagnostics."""

from randprop.measure.diagnostics import GradientDiagnostics, gradient_diagnostics
from randprop.measure.peak import peak_memory, state_tensors, track_peak
from randprop.measure.saved import track_saved

__all__ = [
    "GradientDiagnostics",
    "gradient_diagnostics",
    "peak_memory",
    "state_tensors",
    "track_peak",
    "track_saved",
]
