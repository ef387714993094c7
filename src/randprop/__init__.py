"""randprop: train PyTorch models with less memory by randomized or error-corrected gradients.

import randprop as rp
report = rp.convert(model, rp.RAD(keep=0.1))
with rp.track_saved(model) as saved:
    loss = loss_fn(model(x), y)
loss.backward()
print(report, saved.bytes)

Importing randprop loads none of its modules: each name below is imported on first use
(PEP 562), so ``import randprop.random`` loads randprop.random alone and the training loop,
the experiments and their dependencies are loaded only by code that uses them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from randprop import functional, pde, rules
    from randprop.convert import (
        ConversionReport,
        convert,
        load_method_state,
        method_state,
        restore,
    )
    from randprop.measure import GradientDiagnostics, gradient_diagnostics, track_saved
    from randprop.methods import (
        AOP,
        CRS,
        METHODS,
        RAD,
        AOPMemory,
        CRSState,
        Exact,
        MethodConfig,
        Quant,
        SparseVJP,
        Trace,
        parse_method,
        reset_memory,
    )
    from randprop.methods.loss import LinearCrossEntropy
    from randprop.methods.quant_saved import quantize_saved
    from randprop.plan import Plan, plan

__version__ = "0.1.0"

#: public name -> the module defining it
_EXPORTS = {
    **dict.fromkeys(
        ("ConversionReport", "convert", "load_method_state", "method_state", "restore"),
        "randprop.convert",
    ),
    **dict.fromkeys(
        ("GradientDiagnostics", "gradient_diagnostics", "track_saved"), "randprop.measure"
    ),
    **dict.fromkeys(
        ("AOP", "CRS", "RAD", "AOPMemory", "CRSState", "Exact", "SparseVJP", "Trace", "METHODS"),
        "randprop.methods",
    ),
    **dict.fromkeys(("MethodConfig", "Quant", "parse_method", "reset_memory"), "randprop.methods"),
    "quantize_saved": "randprop.methods.quant_saved",
    **dict.fromkeys(("Plan", "plan"), "randprop.plan"),
    "LinearCrossEntropy": "randprop.methods.loss",
}
#: subpackages and modules reachable as attributes (``rp.rules.FA``)
_SUBMODULES = frozenset(
    (
        "cli",
        "config",
        "data",
        "experiments",
        "functional",
        "measure",
        "methods",
        "models",
        "pde",
        "random",
        "rules",
        "train",
    )
)

__all__ = [
    "AOP",
    "CRS",
    "METHODS",
    "RAD",
    "AOPMemory",
    "CRSState",
    "ConversionReport",
    "Exact",
    "GradientDiagnostics",
    "LinearCrossEntropy",
    "MethodConfig",
    "Plan",
    "Quant",
    "SparseVJP",
    "Trace",
    "convert",
    "functional",
    "gradient_diagnostics",
    "load_method_state",
    "method_state",
    "parse_method",
    "pde",
    "plan",
    "quantize_saved",
    "reset_memory",
    "restore",
    "rules",
    "track_saved",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES, "__version__"})


class _Package(types.ModuleType):
    """The package's module type. Importing the submodule randprop.convert (randprop.plan) would
    set the package attribute ``convert`` (``plan``) to that module; ``rp.convert`` is the
    function, so the submodule (always in sys.modules) is not bound over it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("convert", "plan") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
