"""Mem-AOP-GD (rp.AOP): exactness at K = N, policies, memory variants, state, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import randprop as rp
from randprop.methods import aop
from randprop.random import weighted_indices

DT = torch.float64


def _layer(n: int = 6, m: int = 4, seed: int = 0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, m).to(DT)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=gen, dtype=DT))
        layer.bias.copy_(torch.randn(m, generator=gen, dtype=DT))
    return layer


def _data(shape: tuple[int, ...], m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An input and a fixed output gradient D (the loss is sum(Y * D))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=DT)
    return x, torch.randn((*shape[:-1], m), generator=gen, dtype=DT)


def _grads(layer: nn.Module, x: torch.Tensor, d: torch.Tensor):
    """Output, weight, bias and input gradients of sum(layer(x) * d)."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * d).sum().backward()
    weight, bias = layer.parameters()
    return out.detach(), weight.grad.clone(), bias.grad.clone(), x.grad.clone()


def _aop(layer: nn.Linear, cfg: rp.AOP | str, seed: int = 0) -> nn.Linear:
    clone = copy.deepcopy(layer)
    rp.convert(clone, cfg, seed=seed)
    return clone


def test_config_round_trip_and_defaults():
    cfg = rp.AOP()
    assert cfg.keep == 0.125 and cfg.k is None
    for c in (cfg, rp.AOP(k=8, policy="weighted", memory="queue", decay=0.9, target="both")):
        assert rp.parse_method(str(c)) == c
    assert rp.parse_method("aop:k=16,policy=random") == rp.AOP(k=16, policy="random")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"k": 0}, "k must be a positive integer"),
        ({"k": -3}, "k must be a positive integer"),
        ({"k": 4, "keep": 0.5}, "not both"),
        ({"keep": 0.0}, "keep must be a number in (0, 1]"),
        ({"policy": "best"}, "policy must be one of 'topk', 'weighted', 'random'"),
        ({"memory": "yes"}, "memory must be one of 'rows', 'queue', 'off'"),
        ({"target": "bias"}, "target must be one of"),
        ({"decay": 0.0}, "decay"),
        ({"capacity": 0}, "capacity"),
        ({"target": "input"}, "memory='off'"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, words):
    with pytest.raises(ValueError, match="aop: .*" + words.replace("(", r"\(").replace(")", r"\)")):
        rp.AOP(**kwargs)


def test_k_more_than_rows_is_a_clear_error():
    layer = _aop(_layer(), rp.AOP(k=9))
    x, d = _data((2, 4, 6), 4, 0)
    with pytest.raises(ValueError, match="k=9 exceeds the 8 rows"):
        _grads(layer, x, d)
    with torch.no_grad():  # evaluation draws nothing and needs no K
        layer(x)
    features = _aop(_layer(), rp.AOP(k=5, memory="off", target="input"))
    with pytest.raises(ValueError, match="k=5 exceeds the 4 output features"):
        _grads(features, x, d)


@pytest.mark.parametrize("policy", aop.POLICIES)
@pytest.mark.parametrize("memory", aop.MEMORIES)
def test_k_equal_rows_is_exact(policy, memory):
    layer = _layer()
    x, d = _data((3, 5, 6), 4, 1)
    exact = _grads(layer, x, d)
    configs = [rp.AOP(k=15, policy=policy, memory=memory), rp.AOP(keep=1.0, memory=memory)]
    if memory == "off":
        configs += [
            rp.AOP(k=4, policy=policy, memory="off", target="input"),
            rp.AOP(keep=1.0, policy=policy, memory="off", target="both"),
        ]
    for cfg in configs:
        torch.testing.assert_close(_grads(_aop(layer, cfg), x, d), exact)


def test_topk_keeps_the_largest_outer_products_and_the_rest_is_exact():
    layer = _layer()
    x, d = _data((12, 6), 4, 2)
    out, gw, gb, gx = _grads(_aop(layer, rp.AOP(k=5, memory="off")), x, d)
    top = (x.norm(dim=1) * d.norm(dim=1)).topk(5).indices
    torch.testing.assert_close(gw, d[top].T @ x[top])
    exact = _grads(layer, x, d)
    torch.testing.assert_close((out, gb, gx), (exact[0], exact[2], exact[3]))
    # target="input": top 2 of the 4 output features by |D[:, j]| |W[j, :]|
    gx_sel = _grads(_aop(layer, rp.AOP(k=2, memory="off", target="input")), x, d)[3]
    cols = (d.norm(dim=0) * layer.weight.norm(dim=1)).topk(2).indices
    torch.testing.assert_close(gx_sel, d[:, cols] @ layer.weight[cols])


def _selection_counts(policy: str, x: torch.Tensor, d: torch.Tensor, draws: int) -> torch.Tensor:
    """How often each row is the single outer product kept (K = 1), over seeded steps."""
    layer = _aop(_layer(), rp.AOP(k=1, policy=policy, memory="off"), seed=3)
    counts = torch.zeros(x.shape[0])
    for _ in range(draws):
        gw = _grads(layer, x, d)[1]
        hits = [i for i in range(x.shape[0]) if torch.allclose(gw, torch.outer(d[i], x[i]))]
        assert len(hits) == 1
        counts[hits[0]] += 1
    return counts


def _assert_frequencies(counts: torch.Tensor, probs: torch.Tensor, z: float = 4.5) -> None:
    """Chi-square style bound: every frequency within z binomial standard errors."""
    draws = counts.sum()
    se = (probs * (1 - probs) / draws).sqrt()
    assert ((counts / draws - probs).abs() <= z * se + 1e-12).all(), (counts / draws, probs)


@pytest.mark.parametrize("policy", ["weighted", "random"])
def test_random_policies_draw_with_their_probabilities(policy):
    x, d = _data((4, 6), 4, 4)
    x = x * torch.tensor([0.3, 1.0, 1.6, 2.2], dtype=DT)[:, None]
    scores = x.norm(dim=1) * d.norm(dim=1)
    probs = (
        scores.square() / scores.square().sum() if policy == "weighted" else torch.full((4,), 0.25)
    )
    _assert_frequencies(_selection_counts(policy, x, d, 600), probs.float())


def test_weighted_indices_inclusion_probabilities_without_replacement():
    w = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # successive sampling of 2: P(i in S) = p_i + sum_{j != i} p_j p_i / (1 - p_j)
    p = w / w.sum()
    incl = torch.stack(
        [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)]
    )
    gen = torch.Generator().manual_seed(0)
    draws = 4000
    counts = torch.zeros(4)
    for _ in range(draws):
        idx = weighted_indices(w, 2, gen)
        assert idx.unique().numel() == 2
        counts[idx] += 1
    freq = counts / draws
    se = (incl * (1 - incl) / draws).sqrt()
    assert ((freq - incl).abs() <= 4.5 * se).all(), (freq, incl)


def test_rows_memory_follows_the_authors_update():
    layer = _layer()
    cfg = rp.AOP(k=3, memory="rows", decay=0.81)
    model = _aop(layer, cfg)
    mem_x = torch.zeros(8, 6, dtype=DT)
    mem_d = torch.zeros(8, 4, dtype=DT)
    for step in range(3):
        x, d = _data((8, 6), 4, 10 + step)
        gw = _grads(model, x, d)[1]
        a, g = mem_x + x, mem_d + d
        top = (a.norm(dim=1) * g.norm(dim=1)).topk(3).indices
        torch.testing.assert_close(gw, g[top].T @ a[top])
        a[top], g[top] = 0, 0
        mem_x, mem_d = 0.9 * a, 0.9 * g
        torch.testing.assert_close((model.aop_memory_x, model.aop_memory_d), (mem_x, mem_d))


def test_rows_memory_with_another_batch_size():
    model = _aop(_layer(), rp.AOP(k=2, memory="rows"))
    _grads(model, *_data((6, 6), 4, 0))
    before = model.aop_memory_x.clone()
    _grads(model, *_data((4, 6), 4, 1))  # smaller: slots 4, 5 wait unchanged
    torch.testing.assert_close(model.aop_memory_x[4:], before[4:])
    _grads(model, *_data((9, 6), 4, 2))  # larger: the memory grows with empty slots
    assert model.aop_memory_x.shape == (9, 6) and model.aop_memory_d.shape == (9, 4)


@pytest.mark.parametrize("policy", aop.POLICIES)
def test_queue_conserves_the_exact_sum_while_under_capacity(policy):
    """Accumulated .grad (applied outer products) plus G_q^T A_q equals the exact sum."""
    layer = _layer()
    model = _aop(layer, rp.AOP(k=3, policy=policy, memory="queue", capacity=3.0))
    model.zero_grad()
    exact = torch.zeros_like(layer.weight)
    for step in range(4):
        x, d = _data((2, 4, 6), 4, 20 + step)
        (model(x) * d).sum().backward()  # gradients accumulate, as over micro-batches
        exact += d.reshape(-1, 4).T @ x.reshape(-1, 6)
        memory = model.aop_memory_d.T @ model.aop_memory_x
        assert int(model.aop_memory_count) == 5 * (step + 1) <= model.aop_memory_x.shape[0]
        torch.testing.assert_close(model.weight.grad + memory, exact)
    assert getattr(model, "aop_dropped", 0) == 0


def test_queue_overflow_drops_the_lowest_scores():
    model = _aop(_layer(), rp.AOP(k=2, memory="queue", capacity=1.0))
    x, d = _data((6, 6), 4, 30)
    _grads(model, x, d)
    x2, d2 = _data((6, 6), 4, 31)
    _grads(model, x2, d2)
    # 4 left from step 1 + 6 new - 2 used = 8 rows for 6 places: the 2 lowest scores dropped
    assert int(model.aop_memory_count) == 6 and model.aop_dropped == 2
    left = (x.norm(dim=1) * d.norm(dim=1)).argsort(descending=True)[2:]
    a, g = torch.cat([x2, x[left]]), torch.cat([d2, d[left]])
    scores = (a.norm(dim=1) * g.norm(dim=1)).sort(descending=True).values
    kept = model.aop_memory_x.norm(dim=1) * model.aop_memory_d.norm(dim=1)
    torch.testing.assert_close(kept.sort(descending=True).values, scores[2:8])
    model.reset_memory()
    assert not hasattr(model, "aop_dropped") and "aop_memory_x" not in model.state_dict()


@pytest.mark.parametrize("memory", ["rows", "queue"])
def test_memory_round_trips_through_state_dict(memory):
    layer = _layer()
    cfg = rp.AOP(k=3, policy="weighted", memory=memory)
    model = nn.Sequential(_aop(layer, cfg))
    _grads(model, *_data((8, 6), 4, 40))
    state = model.state_dict()
    assert set(state) == {"0.weight", "0.bias"}  # the plain layer's keys: memory is layer state
    fresh = nn.Sequential(_aop(layer, cfg))  # converted as model was: the same layer id
    fresh.load_state_dict(state)
    rp.load_method_state(fresh, rp.method_state(model))  # steps and memory
    x, d = _data((8, 6), 4, 41)
    torch.testing.assert_close(_grads(fresh, x, d), _grads(model, x, d))
    torch.testing.assert_close(fresh.state_dict(), model.state_dict())
    torch.testing.assert_close(dict(fresh.named_buffers()), dict(model.named_buffers()))
    rp.reset_memory(model)
    assert set(model.state_dict()) == {"0.weight", "0.bias"}
    rp.restore(fresh)
    assert set(fresh.state_dict()) == {"0.weight", "0.bias"} and type(fresh[0]) is nn.Linear


def test_functional_form_needs_a_memory_holder():
    layer = _layer()
    x, d = _data((8, 6), 4, 50)
    with pytest.raises(ValueError, match="pass memory=AOPMemory"):
        rp.functional.aop_linear(x, layer.weight, layer.bias, method=rp.AOP(k=2))
    holder = aop.AOPMemory()
    out = rp.functional.aop_linear(
        x, layer.weight, layer.bias, method=rp.AOP(k=2), seed=0, memory=holder
    )
    (out * d).sum().backward()
    assert holder.aop_memory_x.shape == (8, 6) and holder.aop_memory_x.abs().sum() > 0


def test_autocast_bfloat16_runs_with_float32_memory():
    layer = nn.Linear(6, 4)
    model = _aop(layer, rp.AOP(k=2))
    x = torch.randn(8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.weight.grad.dtype == torch.float32 and model.aop_memory_x.dtype == torch.float32
    assert math.isfinite(model.weight.grad.sum().item())
