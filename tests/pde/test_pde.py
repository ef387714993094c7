"""Reaction-diffusion PDE: analytic decay, exact adjoint gradients, unbiased RAD gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from stat_checks import assert_unbiased

import randprop as rp
from randprop.pde import ControlProblem, ReactionDiffusion, Storage, solve

SMALL = ReactionDiffusion(steps=256)
THETA = torch.tensor([0.3, 0.5, -0.2, 0.1, 0.4, -0.3, 0.2], dtype=torch.float64)


def mode(problem: ReactionDiffusion, a: int, b: int) -> torch.Tensor:
    x, y = problem.coords()
    return torch.sin(a * math.pi * x) * torch.sin(b * math.pi * y)


@pytest.mark.parametrize("a, b, level", [(1, 1, 0.0), (2, 3, 0.0), (1, 2, 1.5)])
def test_eigenmode_decays_as_analytic_solution(a, b, level):
    """sin(a pi x) sin(b pi y) with constant k is an eigenvector of the scheme: it decays by
    (1 - 4c (sin^2(a pi h/2) + sin^2(b pi h/2)) + dt k)^N, which tends to the PDE's
    exp((k - (a^2 + b^2) pi^2 D) T) as h, dt -> 0."""
    p = ReactionDiffusion(steps=2048)
    u0 = mode(p, a, b)
    final, integral = solve(p, torch.full_like(u0, level), u0)
    s2 = math.sin(a * math.pi * p.h / 2) ** 2 + math.sin(b * math.pi * p.h / 2) ** 2
    factor = 1 - 4 * p.courant * s2 + p.dt * level
    torch.testing.assert_close(final, factor**p.steps * u0, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(
        integral, p.dt * sum(factor**n for n in range(1, p.steps + 1)) * u0, rtol=1e-10, atol=1e-13
    )
    rate = level - (a * a + b * b) * math.pi**2 * p.diffusion
    continuous = math.exp(rate * p.horizon) * u0
    err = (final - continuous).abs().max() / continuous.abs().max()
    assert err < 0.01 * (a * a + b * b) / 2  # O(h^2) spatial error, O(dt) time error
    assert err > 0  # the discrete and continuous solutions are not the same thing


def naive_loss(problem, theta, u0, cp):
    """The same scheme written as ordinary autograd ops (all states kept by PyTorch)."""
    c = problem.courant
    w = torch.tensor([[0, c, 0], [c, 1 - 4 * c, c], [0, c, 0]], dtype=torch.float64)
    k = problem.reaction(theta)
    u = u0
    for _ in range(problem.steps):
        u = F.conv2d(u[None, None], w.view(1, 1, 3, 3), padding=1)[0, 0] + problem.dt * k * u
    return ((u - cp.target) ** 2).sum() / (cp.target**2).sum()


STORAGES = [
    Storage("exact"),
    Storage("checkpoint"),
    Storage("checkpoint", segment=7),
    Storage("rad", keep=1.0),
]


@pytest.mark.parametrize("storage", STORAGES, ids=["exact", "ckpt", "ckpt-7", "rad-1"])
def test_gradient_matches_autograd_through_all_steps(storage):
    cp = ControlProblem(SMALL)
    theta = THETA.clone().requires_grad_()
    u0 = SMALL.initial().requires_grad_()
    final, _ = solve(SMALL, SMALL.reaction(theta), u0, storage)
    loss = ((final - cp.target) ** 2).sum() / (cp.target**2).sum()
    grads = torch.autograd.grad(loss, (theta, u0))
    reference = torch.autograd.grad(naive_loss(SMALL, theta, u0, cp), (theta, u0))
    for g, r in zip(grads, reference, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["final", "integral"])
def test_exact_gradient_matches_finite_differences(kind):
    cp = ControlProblem(SMALL, kind)
    theta = THETA.clone().requires_grad_()
    (grad,) = torch.autograd.grad(cp.loss(theta, Storage()), theta)
    eps = 1e-5
    fd = torch.empty(7, dtype=torch.float64)
    with torch.no_grad():
        for j in range(7):
            e = torch.zeros(7, dtype=torch.float64)
            e[j] = eps
            fd[j] = (cp.loss(THETA + e, Storage()) - cp.loss(THETA - e, Storage())) / (2 * eps)
    # central differences: error O(eps^2 * third derivative) ~ 1e-10 here, roundoff ~ 1e-11
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def rad_draws(cp: ControlProblem, keep: float, draws: int, seed: int = 0) -> torch.Tensor:
    """``draws`` independent RAD gradients in one batched solve (each batch entry has its own
    random index sets): (draws, 7)."""
    theta = THETA.expand(draws, 7).clone().requires_grad_()
    loss = cp.loss(theta, Storage("rad", keep=keep, seed=seed))
    return torch.autograd.grad(loss.sum(), theta)[0]


@pytest.mark.parametrize("kind, keep", [("final", 0.05), ("integral", 0.01), ("final", 0.002)])
def test_rad_gradient_unbiased(kind, keep):
    cp = ControlProblem(SMALL, kind)
    theta = THETA.clone().requires_grad_()
    (exact,) = torch.autograd.grad(cp.loss(theta, Storage()), theta)
    samples = rad_draws(cp, keep, 200)
    assert_unbiased(samples, exact)
    # power: a bias of half a draw's standard deviation (7 standard errors) is detected
    shift = 0.5 * samples.std(0)
    with pytest.raises(AssertionError):
        assert_unbiased(samples + shift, exact)


def test_rad_draws_repeat_with_seed():
    cp = ControlProblem(SMALL)
    a, b, c = rad_draws(cp, 0.05, 2, seed=3), rad_draws(cp, 0.05, 2, seed=3), rad_draws(cp, 0.05, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


def saved_bytes(problem: ReactionDiffusion, storage: Storage) -> int:
    theta = THETA.clone().requires_grad_()
    with rp.track_saved() as saved:
        final, _ = solve(problem, problem.reaction(theta), storage=storage)
    final.sum().backward()
    return saved.bytes


def test_stored_bytes():
    p = ReactionDiffusion(steps=1024)
    state = 31 * 31 * 8
    extra = 8 * state  # k, and the 7 basis fields saved by theta -> k
    exact = saved_bytes(p, Storage("exact"))
    assert p.steps * state <= exact <= p.steps * state + extra
    ckpt = saved_bytes(p, Storage("checkpoint"))
    assert ckpt <= math.ceil(p.steps / 32) * state + extra
    rad = saved_bytes(p, Storage("rad", keep=0.01))
    assert rad <= p.steps * 10 * 8 + extra  # ceil(0.01 * 961) = 10 values per state
    assert exact / rad >= 50


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="steps >= 205"):
        ReactionDiffusion(steps=100)
    with pytest.raises(ValueError, match="'exact', 'checkpoint', 'rad'"):
        Storage("adjoint")
    with pytest.raises(ValueError, match="keep"):
        Storage("rad", keep=0.0)
    with pytest.raises(ValueError, match="stable"):
        solve(ReactionDiffusion(steps=256), torch.full((31, 31), -500.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="7 entries"):
        SMALL.reaction(torch.zeros(6))
