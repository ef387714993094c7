"""Under autocast a converted model saves nothing that exact backprop would not: in particular
no cast copy of a weight whose layer needs no input gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import randprop as rp


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )  # fmt: skip


def saved(model: nn.Module, x: torch.Tensor, autocast: bool) -> int:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), rp.track_saved() as s:
        model(x).float().sum().backward()
    return s.bytes


CASES = [
    (mlp, "rad:keep=0.1"),
    (mlp, "rad:keep=0.1,mode=project"),
    (mlp, "crs:keep=0.3"),
    (mlp, "aop:keep=0.5"),
    (mlp, "vjp:density=0.5"),
    (mlp, "vjp:density=0.5,structure=row"),
    (cnn, "rad:keep=0.1"),
    (cnn, "trace:probes=4"),
    (cnn, "vjp:density=0.5,structure=column"),
]


@pytest.mark.parametrize(("make", "method"), CASES, ids=[f"{m.__name__}-{s}" for m, s in CASES])
def test_autocast_saves_nothing_exact_would_not(make, method):
    torch.manual_seed(0)
    exact = make()
    converted = copy.deepcopy(exact)
    assert rp.convert(converted, method).converted
    x = torch.randn(16, 1, 8, 8).expand(16, 3, 8, 8) if make is cnn else torch.randn(16, 64)
    if make is mlp and method.startswith(("rad", "crs")):  # methods that save less than exact
        assert saved(converted, x, True) <= saved(exact, x, True)
    # what the method stores beyond exact is data, which bf16 halves: never a weight copy
    extra_bf16 = saved(converted, x, True) - saved(exact, x, True)
    extra_fp32 = saved(converted, x, False) - saved(exact, x, False)
    assert extra_bf16 <= max(extra_fp32, 0), (extra_bf16, extra_fp32)


@pytest.mark.parametrize("method", ["rad:keep=0.1", "trace:probes=4"])
def test_autocast_cnn_saves_less_than_exact(method):
    torch.manual_seed(0)
    exact = cnn()
    converted = copy.deepcopy(exact)
    rp.convert(converted, method)
    x = torch.randn(16, 3, 8, 8)
    assert saved(converted, x, True) <= saved(exact, x, True)
