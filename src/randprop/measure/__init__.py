"""Measurement: saved-tensor accounting, peak memory, timing, gradient diagnostics."""

from randprop.measure.diagnostics import GradientDiagnostics, gradient_diagnostics
from randprop.measure.saved import track_saved

__all__ = ["GradientDiagnostics", "gradient_diagnostics", "track_saved"]
