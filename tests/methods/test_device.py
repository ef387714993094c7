"""Every estimator on every device (``device`` fixture: CPU, and CUDA when present): forward and
the exact parts of the backward equal PyTorch's on that device, and the weight gradient is
unbiased there (Hotelling T^2 of tests/stat_checks.py; AOP is biased by design and checked for
its exact parts only)."""

from __future__ import annotations

import copy

import pytest
import torch
from stat_checks import assert_unbiased
from torch import nn

import randprop as rp

DT = torch.float64
#: (method, layer, input shape): a Linear case for every Linear estimator, a conv case for the
#: conv ones
CASES = [
    ("rad:keep=0.3", nn.Linear(7, 5), (2, 3, 7)),
    ("rad:keep=0.3,mode=project", nn.Linear(7, 5), (2, 3, 7)),
    ("rad:keep=0.3,bits=2", nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
    ("crs:keep=0.4", nn.Linear(7, 5), (2, 5, 7)),
    ("sparsevjp:density=0.5,structure=row", nn.Linear(7, 5), (6, 7)),
    ("sparsevjp:density=0.5", nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
    ("quant:bits=2", nn.Linear(7, 5), (2, 3, 7)),
    ("trace:probes=4", nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
    ("aop:keep=0.5", nn.Linear(7, 5), (8, 7)),
]
IDS = [f"{m}-{type(layer).__name__}" for m, layer, _ in CASES]
#: methods whose input gradient is not exact (SparseVJP sketches the signal flowing back)
APPROXIMATE_INPUT = ("sparsevjp",)


def _run(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = layer(x)
    out.backward(upstream)
    return out.detach(), x.grad, layer.weight.grad, layer.bias.grad


def _pair(method: str, layer: nn.Module, shape, device: torch.device):
    plain = copy.deepcopy(layer).to(device, DT)
    converted = copy.deepcopy(plain)
    report = rp.convert(converted, method, seed=3)
    assert report.converted, report
    x = torch.randn(shape, dtype=DT).to(device)
    upstream = torch.randn_like(plain(x))
    return plain, converted, x, upstream


@pytest.mark.parametrize("method, layer, shape", CASES, ids=IDS)
def test_forward_and_exact_parts_match_pytorch_on_device(method, layer, shape, device):
    plain, converted, x, upstream = _pair(method, layer, shape, device)
    out_p, gx_p, gw_p, gb_p = _run(plain, x, upstream)
    out_c, gx_c, gw_c, gb_c = _run(converted, x, upstream)
    assert out_c.device == x.device and gw_c.device == x.device
    torch.testing.assert_close(out_c, out_p, rtol=1e-12, atol=1e-12)
    if not method.startswith(APPROXIMATE_INPUT):
        torch.testing.assert_close(gx_c, gx_p, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gb_c, gb_p, rtol=1e-12, atol=1e-12)
    assert gw_c.shape == gw_p.shape


@pytest.mark.parametrize(
    "method, layer, shape", [c for c in CASES if not c[0].startswith("aop")], ids=IDS[:-1]
)
def test_weight_gradient_is_unbiased_on_device(method, layer, shape, device):
    plain, converted, x, upstream = _pair(method, layer, shape, device)
    exact = _run(plain, x, upstream)[2]
    draws = torch.stack([_run(converted, x, upstream)[2] for _ in range(300)])
    assert_unbiased(draws.cpu(), exact.cpu())
    with pytest.raises(AssertionError, match="biased"):  # the check can fail here
        assert_unbiased(draws.cpu() * 1.5, exact.cpu())
