"""Experiment suites, one module per paper plus side-by-side comparisons.

Each suite module registers itself with ``randprop.experiments.registry.suite``; import it here.
"""

from randprop.experiments import (
    aop_mnist,  # noqa: F401
    feedback,  # noqa: F401
    memory_bench,  # noqa: F401
    plan_bench,  # noqa: F401
    quant_mnist,  # noqa: F401
    rad_mnist,  # noqa: F401
    rad_pde,  # noqa: F401
    rad_rnn,  # noqa: F401
    trace_mnist,  # noqa: F401
    transformer_lm,  # noqa: F401
    vjp_bench,  # noqa: F401
)
from randprop.experiments.registry import SUITES, get_suite, suite

__all__ = ["SUITES", "get_suite", "suite"]
