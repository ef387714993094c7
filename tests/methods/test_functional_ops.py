"""Functional calls inside a converted model's forward (rp.convert(functional_ops=True))."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from stat_checks import assert_unbiased, unbiasedness_pvalue
from torch import nn
from torch.utils.checkpoint import checkpoint

import randprop as rp

N = 64  # features: one quantization group per row


class Block(nn.Module):
    """Hand-written: every op of the forward is a functional call."""

    def __init__(self, dtype=torch.float32) -> None:
        super().__init__()
        self.fc = nn.Linear(N, N, dtype=dtype)
        self.ln_w = nn.Parameter(1 + 0.1 * torch.randn(N, dtype=dtype))
        self.ln_b = nn.Parameter(0.1 * torch.randn(N, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        h = F.layer_norm(h, (N,), self.ln_w, self.ln_b)
        h = F.gelu(h)
        h = F.dropout(h, 0.25, self.training)
        return torch.tanh(h) + F.silu(h)


class Net(nn.Module):
    def __init__(self, dtype=torch.float32, ckpt: bool = False) -> None:
        super().__init__()
        self.b1, self.b2 = Block(dtype), Block(dtype)
        self.head = nn.Linear(N, 4, dtype=dtype)
        self.ckpt = ckpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.b1, self.b2):
            x = checkpoint(block, x, use_reentrant=False) if self.ckpt else block(x)
        return self.head(x)


def _convert(model: nn.Module, **kw) -> rp.ConversionReport:
    # a memory-saving method with no weight layer converted: only the functional ops change
    return rp.convert(model, rp.RAD(keep=0.5), module_filter_fn=lambda m, n: False,
                      functional_ops=True, **kw)  # fmt: skip


def _grads(model: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    (model(x) * upstream).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_forward_equals_plain_and_restore_removes_the_mode():
    torch.manual_seed(0)
    plain = Net().eval()
    model = copy.deepcopy(plain)
    report = _convert(model)
    assert "F.gelu" in str(report) and "Not covered" in str(report) and "matmul" in str(report)
    x = torch.randn(8, N, requires_grad=True)
    assert torch.equal(model(x), plain(x))
    with rp.track_saved(plain) as ref:
        plain(x)
    with rp.track_saved(model) as ours:
        model(x)
    assert ours.bytes < ref.bytes
    rp.restore(model)
    with rp.track_saved(model) as back:
        model(x)
    assert back.bytes == ref.bytes  # the mode is gone


def test_off_by_default_and_not_under_exact():
    model = Net()
    assert rp.convert(model, rp.RAD(keep=0.5)).functional == ""
    report = rp.convert(Net(), "exact", functional_ops=True)
    assert "not redirected" in report.functional
    with pytest.raises(TypeError, match="functional_ops must be True or False"):
        rp.convert(Net(), "rad", functional_ops=1)


def test_gradients_unbiased_with_positive_control():
    torch.manual_seed(1)
    plain = Net(torch.float64).eval()
    model = copy.deepcopy(plain)
    _convert(model)
    x = torch.randn(6, N, dtype=torch.float64)
    upstream = torch.randn(6, 4, dtype=torch.float64)
    exact = _grads(plain, x, upstream)
    samples = torch.stack([_grads(model, x, upstream) for _ in range(300)])  # a new step each
    assert samples.std(0).max() > 0
    # every gradient but the ones reached through a LayerNorm's input gradient (b1's
    # parameters), whose k-bit x_hat carries a stated second-order bias (methods.norms)
    count = sum(p.numel() for p in model.b1.parameters())
    assert_unbiased(samples[:, count:], exact[count:])
    assert unbiasedness_pvalue(1.03 * samples[:, count:], exact[count:]) < 1e-4
    mean = samples[:, :count].mean(0)
    assert (mean - exact[:count]).norm() < 0.05 * exact[:count].norm()


def test_saved_bytes_are_the_compact_forms():
    torch.manual_seed(2)
    rows = 256
    block = Block()
    plain = copy.deepcopy(block)
    _convert(block)
    x = torch.randn(rows, N, requires_grad=True)
    with rp.track_saved(plain) as ref:
        plain(x)
    with rp.track_saved(block) as ours:
        block(x)
    linear_in = rows * N * 4  # the Linear's input (x), kept by both
    k_bit = rows * N // 2 + rows * 8  # 4-bit codes + scale and minimum per row
    # relu and dropout: 1-bit masks; layer_norm: codes + rstd per row; gelu, tanh, silu: codes
    expected = linear_in + 2 * rows * N // 8 + (k_bit + rows * 4) + 3 * k_bit
    assert ours.bytes == expected
    assert ref.bytes / ours.bytes > 2.5


def test_converted_modules_not_intercepted_twice():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(N, N), nn.GELU(), nn.LayerNorm(N))
    x = torch.randn(32, N, requires_grad=True)
    sizes = []
    for functional_ops in (False, True):
        m = copy.deepcopy(model)
        rp.convert(m, "rad:keep=0.5", functional_ops=functional_ops)
        with rp.track_saved(m) as saved:
            m(x)
        sizes.append(saved.bytes)
    assert sizes[0] == sizes[1]
    # a module convert skipped (activation_masks=False) keeps its own ops: exact storage
    kept = []
    for functional_ops in (False, True):
        m = copy.deepcopy(model)
        rp.convert(m, "rad:keep=0.5", activation_masks=False, functional_ops=functional_ops)
        with rp.track_saved(m) as saved:
            m(x)
        kept.append(saved.bytes)
    assert kept[0] == kept[1] > sizes[0]


def test_reproducible_and_global_rng_untouched():
    torch.manual_seed(4)
    base = Net().eval()  # dropout off: every draw is randprop's
    x = torch.randn(8, N)
    up = torch.randn(8, 4)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(base)
        _convert(model, seed=7)
        state = torch.get_rng_state()
        runs.append(torch.stack([_grads(model, x, up) for _ in range(2)]))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][0], runs[0][1])  # a new forward draws new seeds


@pytest.mark.parametrize("train", [False, True])
def test_checkpoint_replays_the_same_seeds(train):
    torch.manual_seed(5)
    base = Net().train(train)
    x = torch.randn(8, N)
    up = torch.randn(8, 4)
    grads = []
    for ckpt in (False, True):
        model = copy.deepcopy(base)
        model.ckpt = ckpt
        _convert(model, seed=3)
        torch.manual_seed(11)  # dropout's seeds come from the default generator
        grads.append(_grads(model, x, up))
    assert torch.equal(grads[0], grads[1])
