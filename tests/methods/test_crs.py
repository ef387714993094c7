"""Unbiased column-row sampling (rp.CRS): exact parts, unbiasedness, storage, running estimate."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import randprop as rp
from randprop.methods import crs

DT = torch.float64


def _layer(n: int = 6, m: int = 4, seed: int = 0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, m).to(DT)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=gen, dtype=DT))
        layer.bias.copy_(torch.randn(m, generator=gen, dtype=DT))
    return layer


def _data(shape: tuple[int, ...], m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An input with rows of unequal norms and a fixed output gradient D (loss sum(Y * D))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=DT)
    x = x * torch.rand((*shape[:-1], 1), generator=gen, dtype=DT).mul(3)
    return x, torch.randn((*shape[:-1], m), generator=gen, dtype=DT)


def _grads(layer: nn.Module, x: torch.Tensor, d: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * d).sum().backward()
    weight, bias = layer.parameters()
    return out.detach(), weight.grad.clone(), bias.grad.clone(), x.grad.clone()


def _crs(layer: nn.Linear, cfg: rp.CRS | str, seed: int = 0) -> nn.Linear:
    clone = copy.deepcopy(layer)
    rp.convert(clone, cfg, seed=seed)
    return clone


def _chi2_unbiased(draws: torch.Tensor, exact: torch.Tensor) -> tuple[float, int]:
    """Sum over elements of ((mean - exact) / se)^2 (chi-square with one degree of freedom per
    element if unbiased); elements with no variance must be exact and are left out."""
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    random = se > 1e-9 * exact.abs().max()
    torch.testing.assert_close(mean[~random], exact[~random])
    return (((mean - exact)[random] / se[random]) ** 2).sum().item(), int(random.sum())


def test_config_round_trip_and_errors():
    for cfg in (rp.CRS(), rp.CRS(keep=0.1, winners=0.0, momentum=0.5)):
        assert rp.parse_method(str(cfg)) == cfg
    with pytest.raises(ValueError, match=r"crs: keep must be a number in \(0, 1\]"):
        rp.CRS(keep=0)
    for winners in (1.5, 1.0, -0.1):  # 1: no sampled row left, a biased top-K
        with pytest.raises(ValueError, match=r"crs: winners must be a number in \[0, 1\)"):
            rp.CRS(winners=winners)
    with pytest.raises(ValueError, match=r"crs: momentum must be a number in \[0, 1\)"):
        rp.CRS(momentum=1.0)


def test_forward_input_and_bias_gradients_are_exact_and_keep_one_is_exact():
    layer = _layer()
    x, d = _data((4, 5, 6), 4, 1)
    exact = _grads(layer, x, d)
    out, gw, gb, gx = _grads(_crs(layer, rp.CRS(keep=0.3)), x, d)
    torch.testing.assert_close((out, gb, gx), (exact[0], exact[2], exact[3]))
    assert not torch.allclose(gw, exact[1])
    torch.testing.assert_close(_grads(_crs(layer, rp.CRS(keep=1.0)), x, d), exact)


def test_choose_rows_winners_and_inclusion_probabilities():
    scores = torch.tensor([9.0, 0.1, 1.0, 2.0, 0.5, 3.0, 0.0, 1.5, 0.7, 1.2])
    k, winners = 4, 1
    # row 0 is the least winner; then (4 - 1) * 3.0 / (sum of the rest = 10.5) < 1, so W = 1
    probs = torch.zeros(10, dtype=DT)
    probs[1:] = 3 * scores[1:].double() / scores[1:].sum()
    probs[0] = 1
    gen = torch.Generator().manual_seed(0)
    draws, counts = 3000, torch.zeros(10, dtype=DT)
    for _ in range(draws):
        idx, weights = crs.choose_rows(scores, k, winners, gen)
        assert idx.numel() == k and idx.unique().numel() == k and idx[0] == 0
        torch.testing.assert_close(weights.double(), 1 / probs[idx], rtol=1e-5, atol=0)
        counts[idx] += 1
    freq, se = counts / draws, (probs * (1 - probs) / draws).sqrt()
    assert ((freq - probs).abs() <= 4.5 * se + 1e-12).all(), (freq, probs)
    # a score too large for sampling (p > 1) becomes a winner even with winners = 0
    idx, weights = crs.choose_rows(torch.tensor([100.0, 1, 1, 1, 1]), 2, 0, gen)
    assert idx[0] == 0 and weights[0] == 1 and weights[1] == 4


@pytest.mark.parametrize("winners", [0.0, 0.5])
def test_weight_gradient_is_unbiased_given_the_estimate(winners):
    """Mean of many draws within a chi-square bound built from their own variance; the same
    rows without the 1/p weights (a biased estimator) fail that bound."""
    layer = _layer()
    x, d = _data((6, 4, 6), 4, 2)  # 24 rows at 4 positions, K = 6
    model = _crs(layer, rp.CRS(keep=0.25, winners=winners))
    exact = _grads(layer, x, d)[1]
    estimate = torch.tensor([0.2, 1.0, 3.0, 0.5], dtype=torch.float32)
    draws, unweighted = [], []
    for _ in range(1500):
        model.register_buffer("crs_grad_norm", estimate.clone())  # every draw: one estimate
        draws.append(_grads(model, x, d)[1])
        rows = x.reshape(-1, 6)
        scores = rows.float().norm(dim=1) * estimate.repeat(6)
        gen = torch.Generator().manual_seed(len(draws))
        k = 6
        idx, _ = crs.choose_rows(scores, k, int(winners * k), gen)
        unweighted.append(d.reshape(-1, 4)[idx].T @ rows[idx] * (24 / k))
    stat, df = _chi2_unbiased(torch.stack(draws), exact)
    assert df == exact.numel()
    assert stat <= df + 5 * (2 * df) ** 0.5, (stat, df)
    biased, _ = _chi2_unbiased(torch.stack(unweighted), exact)
    assert biased > df + 5 * (2 * df) ** 0.5, biased


def test_estimate_scores_rows_by_position():
    """With equal |x_i|, the winners are the rows at the position with the largest estimate."""
    layer = _layer()
    x = torch.ones(5, 3, 6, dtype=DT)
    model = _crs(layer, rp.CRS(keep=0.34, winners=0.8))  # K = 6 of 15 rows: 5 winners
    model.register_buffer("crs_grad_norm", torch.tensor([0.1, 5.0, 0.2]))
    x_req = x.clone().requires_grad_(True)
    out = model(x_req)
    node = next(f for f, _ in out.grad_fn.next_functions if "WeightNode" in type(f).__name__)
    idx = next(t for t in node.saved_tensors if t.dtype == torch.long)
    assert {1, 4, 7, 10, 13} <= set(idx.tolist()) and idx.numel() == 6


def test_running_estimate_update_state_dict_and_reset():
    layer = _layer()
    model = nn.Sequential(_crs(layer, rp.CRS(keep=0.5, momentum=0.75)))
    x, d = _data((3, 2, 6), 4, 3)
    _grads(model, x, d)
    first = d.norm(dim=-1).mean(0).float()  # the first update sets the estimate
    torch.testing.assert_close(model[0].crs_grad_norm, first)
    x2, d2 = _data((3, 2, 6), 4, 4)
    _grads(model, x2, d2)
    torch.testing.assert_close(
        model[0].crs_grad_norm, 0.75 * first + 0.25 * d2.norm(dim=-1).mean(0).float()
    )
    state = model.state_dict()
    assert set(state) == {"0.weight", "0.bias"}  # the plain layer's keys
    fresh = nn.Sequential(_crs(layer, rp.CRS(keep=0.5, momentum=0.75)))  # the same layer id
    fresh.load_state_dict(state)
    rp.load_method_state(fresh, rp.method_state(model))
    torch.testing.assert_close(_grads(fresh, x, d), _grads(model, x, d))
    torch.testing.assert_close(fresh[0].crs_grad_norm, model[0].crs_grad_norm)
    fresh.load_state_dict(state)  # new weights: the estimate is reset
    assert not hasattr(fresh[0], "crs_grad_norm")
    _grads(model, *_data((3, 5, 6), 4, 5))  # other positions: the estimate starts afresh
    assert model[0].crs_grad_norm.shape == (5,)
    rp.reset_memory(model)
    assert set(model.state_dict()) == {"0.weight", "0.bias"}


def test_stores_only_the_sampled_rows():
    layer = nn.Linear(256, 128)
    x = torch.randn(200, 256)
    with rp.track_saved(layer) as exact:
        layer(x).sum()
    model = _crs(layer, rp.CRS(keep=0.3))
    with rp.track_saved(model) as saved:
        model(x).sum()
    assert saved.bytes <= 0.31 * exact.bytes, (saved.bytes, exact.bytes)
    assert saved.bytes >= 60 * 256 * 4  # the K = 60 rows themselves


def test_eval_and_frozen_weight_draw_nothing():
    model = _crs(_layer(), rp.CRS())
    x, _ = _data((4, 6), 4, 6)
    with torch.no_grad():
        model(x)
    model.weight.requires_grad_(False)
    model(x.requires_grad_(True)).sum().backward()
    assert "crs_grad_norm" not in model.state_dict() and x.grad is not None
