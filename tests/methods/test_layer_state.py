"""Layer state (AOP memory, CRS estimate) and when a converted layer estimates at all."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import randprop as rp

STATEFUL = {"aop": rp.AOP(k=2, policy="weighted"), "crs": rp.CRS(keep=0.5)}
ALL = {**STATEFUL, "rad": rp.RAD(keep=0.3), "vjp": rp.SparseVJP(), "trace": rp.Trace()}


def _model(cfg) -> nn.Sequential:
    gen = torch.Generator().manual_seed(0)
    if isinstance(cfg, rp.Trace):  # Trace converts convolutions only
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    else:
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    rp.convert(model, cfg)
    return model


def _input(cfg) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = (4, 2, 6, 6) if isinstance(cfg, rp.Trace) else (8, 6)
    return torch.randn(shape, generator=gen)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_input_only_backward_leaves_state_alone(name):
    model = _model(STATEFUL[name])
    x = _input(STATEFUL[name])
    model(x).square().sum().backward()  # creates and updates the state
    before = _state(model)
    assert before
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(model(xr).square().sum(), xr)
    torch.testing.assert_close(_state(model), before, rtol=0, atol=0)
    assert gx.abs().sum() > 0
    model(x).square().sum().backward()
    changed = _state(model)
    assert any(not torch.equal(changed[k], before[k]) for k in before)  # positive control


@pytest.mark.parametrize("name", list(STATEFUL))
def test_state_update_runs_once_with_the_weight_gradient(name):
    """autograd.grad w.r.t. the weight computes the estimate and commits the state exactly as
    backward() does."""
    cfg = STATEFUL[name]
    a, b = _model(cfg), _model(cfg)
    x = _input(cfg)
    a(x).square().sum().backward()
    grads = torch.autograd.grad(b(x).square().sum(), list(b.parameters()))
    for p, g in zip(a.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(_state(a), _state(b))


@pytest.mark.parametrize("name", list(STATEFUL))
def test_plain_and_converted_state_dicts_load_both_ways(name, tmp_path):
    cfg = STATEFUL[name]
    model = _model(cfg)
    model(_input(cfg)).square().sum().backward()
    assert dict(model.named_buffers())  # state exists
    plain = copy.deepcopy(model)
    rp.restore(plain)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(1.0)
    model.load_state_dict(plain.state_dict())  # strict: the state is reset
    assert not dict(model.named_buffers())
    torch.testing.assert_close(model.state_dict(), plain.state_dict())
    model(_input(cfg)).square().sum().backward()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    state = torch.load(tmp_path / "sd.pt")  # weights_only=True
    fresh = copy.deepcopy(plain)
    fresh.load_state_dict(state)  # into a plain model, strict
    converted = _model(cfg)
    converted.load_state_dict(state)  # and into a converted one
    torch.testing.assert_close(fresh.state_dict(), converted.state_dict())


def test_state_saved_as_buffers_by_earlier_versions_still_loads():
    model = _model(STATEFUL["crs"])
    model(_input(STATEFUL["crs"])).square().sum().backward()
    old = {**model.state_dict(), "0.crs_grad_norm": torch.tensor([2.0])}
    other = _model(STATEFUL["crs"])
    other.load_state_dict(old)
    torch.testing.assert_close(other[0].crs_grad_norm, torch.tensor([2.0]))


@pytest.mark.parametrize("name", list(ALL))
def test_whole_converted_model_loads_like_the_plain_one(name):
    cfg = ALL[name]
    model = _model(cfg)
    model(_input(cfg)).square().sum().backward()
    plain = copy.deepcopy(model)
    rp.restore(plain)

    def saved(m: nn.Module) -> io.BytesIO:
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return buf

    allowed = {type(m) for m in plain.modules()}  # what PyTorch asks for the plain model
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(saved(model))  # like the plain model: its classes are not allowed yet
    with torch.serialization.safe_globals(list(allowed)):
        torch.load(saved(plain))
        loaded = torch.load(saved(model))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    x = _input(cfg)
    torch.testing.assert_close(loaded(x), model(x))
    assert rp.method_state(loaded).keys() == rp.method_state(model).keys()


@pytest.mark.parametrize("name", list(ALL))
def test_estimator_runs_whenever_a_gradient_is_needed_whatever_the_mode(name):
    cfg = ALL[name]
    model = _model(cfg)
    x = _input(cfg)

    def steps() -> list[int]:
        return [s if isinstance(s, int) else s["step"] for s in rp.method_state(model).values()]

    assert steps() and set(steps()) == {0}
    with torch.no_grad():
        model(x)
    with torch.inference_mode():
        model(x)
    assert set(steps()) == {0} and not dict(model.named_buffers())
    model.eval()  # eval with grad enabled: still the estimator
    model(x).sum().backward()
    assert set(steps()) == {1}
    model.train()
    model.requires_grad_(False)  # frozen weights, input wants no gradient: the plain layer
    with rp.track_saved(model) as saved:
        model(x)
    assert set(steps()) == {1} and saved.bytes == 0
