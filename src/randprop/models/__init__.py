"""Built-in models by name, each citing the paper whose experiment it reproduces."""

from randprop.models.registry import MODELS, build_model, input_shape

__all__ = ["MODELS", "build_model", "input_shape"]
