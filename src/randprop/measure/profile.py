"""Side-by-side measurements of one training step: bytes saved for backward, time.

Peak memory: randprop.measure.peak.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from randprop.config import MethodConfig
from randprop.measure.saved import track_saved


def converted_copy(model: nn.Module, method: MethodConfig | str, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` converted to ``method`` (the original stays as it is)."""
    from randprop.convert import convert

    clone = copy.deepcopy(model)
    convert(clone, method, seed=seed)
    return clone


def saved_for_backward(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable = F.cross_entropy,
) -> track_saved:
    """Run forward + loss + backward under :class:`track_saved` and return the tracker."""
    with track_saved(model) as saved:
        loss = loss_fn(model(inputs), targets)
    loss.backward()
    return saved


def step_time(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable = F.cross_entropy,
    repeats: int = 10,
    warmup: int = 2,
) -> float:
    """Median seconds of one forward + backward (gradients zeroed between runs)."""
    times = []
    for i in range(warmup + repeats):
        model.zero_grad(set_to_none=True)
        sync(inputs.device)
        start = time.perf_counter()
        loss_fn(model(inputs), targets).backward()
        sync(inputs.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
