"""Converted layers inside activation checkpointing (torch.utils.checkpoint, both modes).

The recompute replays the original forward's draws: a checkpointed model gets the same
gradients, the same step counters and the same layer state as without checkpointing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from stat_checks import assert_unbiased
from torch import nn
from torch.utils.checkpoint import checkpoint

import randprop as rp
from randprop.methods import base
from randprop.methods.base import RandomizedLayer

LINEAR_METHODS = [
    "rad:keep=0.3",
    "rad:keep=0.3,same_sample=true",
    "rad:keep=0.3,mode=project",
    "rad:keep=0.3,mode=project,same_sample=true",
    "vjp:density=0.5",
    "vjp:density=0.5,sketch=optimal",
    "vjp:density=0.5,structure=row",
    "vjp:density=0.5,sketch=optimal,structure=row",
    "vjp:density=0.5,sketch=lowrank,structure=row",
    "vjp:density=0.5,structure=column",
    "vjp:density=0.5,sketch=gaussian,structure=column",
    "crs:keep=0.5",
    "aop:keep=0.5",
    "aop:keep=0.5,memory=queue",
]
CONV_METHODS = [
    "rad:keep=0.3",
    "rad:keep=0.3,mode=project",
    "trace:probes=3",
    "trace:probes=3,channels=independent",
    "vjp:density=0.5,structure=row",
    "vjp:density=0.5,structure=column",
]
MODES = [False, True]
MODE_IDS = ["non-reentrant", "reentrant"]


class Blocks(nn.Module):
    """Two checkpointable blocks, each with several converted layers (transformers-style)."""

    def __init__(self, blocks: list[nn.Module], reentrant: bool | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.reentrant is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.reentrant)
        return x


def linear_blocks() -> list[nn.Module]:
    return [
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(), nn.Linear(8, 3)),
    ]


def conv_blocks() -> list[nn.Module]:
    return [
        nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 3, 3, stride=2, padding=1)),
    ]


def layer_state(model: nn.Module) -> dict:
    """Step counters and estimator buffers of every converted layer."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, RandomizedLayer):
            state[name] = module.rp_step
            for key, buf in module.named_buffers(recurse=False):
                state[f"{name}.{key}"] = buf.clone()
    return state


def compare(blocks: list[nn.Module], method: str, reentrant: bool, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    plain = Blocks(copy.deepcopy(blocks), None)
    report = rp.convert(plain, method)
    assert report.converted
    ckpt = copy.deepcopy(plain)
    ckpt.reentrant = reentrant
    for step in range(3):
        grads = []
        for model in (plain, ckpt):
            model.zero_grad()
            inp = x[step].clone().requires_grad_(reentrant)
            model(inp).square().sum().backward()
            grads.append([p.grad for p in model.parameters()])
        for g_plain, g_ckpt in zip(*grads, strict=True):
            torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-6)
        s_plain, s_ckpt = layer_state(plain), layer_state(ckpt)
        assert s_plain.keys() == s_ckpt.keys()
        for key, value in s_plain.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(s_ckpt[key], value)
            else:
                assert s_ckpt[key] == value > step, key


@pytest.mark.parametrize("reentrant", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_linear_blocks_match_plain(method, reentrant):
    compare(linear_blocks(), method, reentrant, torch.randn(3, 10, 6))


@pytest.mark.parametrize("reentrant", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("method", CONV_METHODS)
def test_conv_blocks_match_plain(method, reentrant):
    compare(conv_blocks(), method, reentrant, torch.randn(3, 4, 2, 7, 7))


@pytest.mark.parametrize("reentrant", MODES, ids=MODE_IDS)
def test_recurrent_layer_matches_plain(reentrant):
    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 5, num_layers=2)

        def forward(self, x):
            return self.lstm(x)[0]

    compare([Last(), nn.Sequential(nn.Linear(5, 2))], "rad:keep=0.5", reentrant,
            torch.randn(3, 6, 2, 4))  # fmt: skip


def test_layer_shared_by_checkpointed_regions():
    """One converted layer called in three non-reentrant checkpointed regions (weights tied
    across blocks): the regions are recomputed last first, each replays its own draw. (Reentrant
    mode draws in the recompute, so there the regions get the same seeds in backward order.)"""
    shared = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
    compare([shared, shared, shared], "rad:keep=0.3", False, torch.randn(3, 5, 6))
    compare([shared, shared], "vjp:density=0.5,structure=row", False, torch.randn(3, 9, 6))


def test_sparse_vjp_rows_recompute_without_error():
    """Row storage keeps a random number of rows: the recompute must keep the same ones."""
    torch.manual_seed(1)
    model = Blocks([nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))], False)
    rp.convert(model, "vjp:density=0.3,structure=row")
    for _ in range(20):  # a fresh draw would keep another number of rows within a few tries
        model(torch.randn(16, 4)).sum().backward()


def rad_draws(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor, n: int):
    draws = []
    for _ in range(n):
        layer.zero_grad()
        out = checkpoint(layer, x, use_reentrant=False)
        out.backward(upstream)
        draws.append(layer.weight.grad.clone())
    return torch.stack(draws)


def test_rad_unbiased_under_non_reentrant_checkpoint(monkeypatch):
    """RAD's weight gradient under checkpoint(use_reentrant=False) is unbiased; positive control:
    a recompute that draws a new sample instead of replaying (the old behaviour, backward then
    decodes the new sample with the old seed) is rejected from the same number of draws."""
    torch.manual_seed(2)
    plain = nn.Linear(12, 4).double()
    layer = copy.deepcopy(plain)
    rp.convert(layer, rp.RAD(keep=0.25))
    x = torch.randn(6, 12, dtype=torch.float64) + 1.0
    upstream = torch.randn(6, 4, dtype=torch.float64)
    plain(x).backward(upstream)
    exact = plain.weight.grad
    assert_unbiased(rad_draws(layer, x, upstream, 1500), exact)
    monkeypatch.setattr(base, "replayed_seed", lambda pending: None)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(rad_draws(layer, x, upstream, 1500), exact)


def test_pending_record_is_bounded():
    """Forward passes that are never backpropagated leave a bounded record."""
    layer = nn.Linear(3, 3)
    rp.convert(layer, "rad")
    for _ in range(base.MAX_PENDING + 10):
        layer(torch.randn(2, 3))
    assert len(base._PENDING[layer]) == base.MAX_PENDING
