"""Built-in models by name, each citing the paper whose experiment it reproduces.

Each model module registers its models with ``randprop.models.registry.register_model``; import
it here.
"""

from randprop.models import (  # noqa: F401 (registers the models)
    feedback,
    feedforward,
    linear,
    rad,
    recurrent,
    resnet,
    trace,
    vision,
)
from randprop.models.registry import MODELS, build_model, input_shape

__all__ = ["MODELS", "build_model", "input_shape"]
