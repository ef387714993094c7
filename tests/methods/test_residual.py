"""Residual adds need no compact form: x + f(x) saves nothing beyond f's own tensors (the
gradient of a sum is the upstream gradient itself, so aten.add saves nothing)."""

import torch
from torch import nn

import randprop as rp


def test_a_residual_add_saves_nothing_beyond_the_branch():
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    x = torch.randn(16, 32, requires_grad=True)
    with rp.track_saved(branch) as branch_only:
        branch(x * 1.0)
    with rp.track_saved(branch) as residual:
        h = x * 1.0
        out = h + branch(h)
        out = out + 2.0 * out  # a scaled residual: saves nothing either (the scale is a number)
    assert branch_only.bytes > 0
    assert residual.bytes == residual.total == branch_only.bytes
    with rp.track_saved(branch) as product:  # positive control: a product saves its factors
        h = x * 1.0
        h * branch(h)
    assert product.bytes > branch_only.bytes
