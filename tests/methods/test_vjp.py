"""SparseVJP: config, the minimal-variance solve, unbiasedness and variance of every sketch and
structure, fused layers = sketch + exact backward, stored rows, BagNet / ViT training."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import optimize
from stat_checks import assert_unbiased, unbiasedness_pvalue
from torch import nn

import randprop as rp
from randprop.methods.vjp import (
    PROJECTIONS,
    SKETCHES,
    STRUCTURES,
    minimal_variance_probabilities,
    sketch,
    sparse_vjp,
    vjp_conv,
)
from randprop.models import build_model

CONFIGS = [
    rp.SparseVJP(density=0.4, sketch=s, structure=t)
    for s in SKETCHES
    for t in STRUCTURES
    if not (s in PROJECTIONS and t == "element")
] + [rp.SparseVJP(density=0.4, sketch="optimal", structure="element", budget="row")]
IDS = [f"{c.sketch}-{c.structure}-{c.budget}" for c in CONFIGS]
DIAGONAL = [c for c in CONFIGS if c.sketch not in PROJECTIONS]
DIAGONAL_IDS = [f"{c.sketch}-{c.structure}-{c.budget}" for c in DIAGONAL]


# --- config ---------------------------------------------------------------------------------


def test_config_round_trips_and_alias():
    cfg = rp.SparseVJP(density=0.1, sketch="lowrank", structure="column")
    assert rp.parse_method(str(cfg)) == cfg
    assert rp.parse_method("sparsevjp:density=0.1,sketch=lowrank,structure=column") == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"sketch": "topk"}, "sketch"),
        ({"structure": "block"}, "structure"),
        ({"sketch": "lowrank", "structure": "element"}, "structure"),
        ({"budget": "row"}, "budget"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        rp.SparseVJP(**kwargs)


# --- the minimal-variance solve -------------------------------------------------------------


def reference_probabilities(a: torch.Tensor, budget: float) -> torch.Tensor:
    """p = min(1, lam a) with lam found by scalar root finding (scipy brentq)."""
    a = a.double()
    lam = optimize.brentq(lambda t: (t * a).clamp(max=1).sum().item() - budget, 0, 1e12)
    return (lam * a).clamp(max=1)


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "with-zeros"])
def test_minimal_variance_probabilities_solve(kind):
    a = torch.randn(5, 40, dtype=torch.float64).abs()
    if kind == "heavy":
        a = torch.distributions.Cauchy(0.0, 1.0).sample((5, 40)).double().abs()
    if kind == "with-zeros":
        a[:, ::3] = 0
    budget = 0.3 * 40
    p = minimal_variance_probabilities(a, budget)
    assert ((p >= 0) & (p <= 1)).all()
    torch.testing.assert_close(p.sum(-1), torch.full((5,), budget, dtype=torch.float64))
    for row, prow in zip(a, p, strict=True):
        torch.testing.assert_close(prow, reference_probabilities(row, budget), rtol=1e-6, atol=1e-9)


def test_minimal_variance_probabilities_budget_above_support():
    a = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    p = minimal_variance_probabilities(a, 3.0)  # only two nonzeros: they get probability 1
    assert p.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_minimal_variance_probabilities_all_clipped_stays_clipped():
    a = torch.zeros(3, 5000)
    a[:, :1000] = torch.rand(3, 1000) + 0.5  # fewer nonzeros than the budget
    p = minimal_variance_probabilities(a, 2500.0, max_steps=8)
    assert torch.equal(p, (a > 0).float())


def variance_of(p: torch.Tensor, a: torch.Tensor) -> float:
    """Total variance sum_i a_i^2 (1/p_i - 1) of a diagonal Bernoulli sketch."""
    kept = p > 0
    return (a[kept] ** 2 * (1 / p[kept] - 1)).sum().item()


@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_optimal_variance_at_most_uniform_and_locally_minimal(kind, density):
    n = 200
    a = torch.randn(n, dtype=torch.float64).abs()
    if kind == "heavy":  # Pareto(1.1) magnitudes
        a = torch.rand(n, dtype=torch.float64) ** (-1 / 1.1)
    p = minimal_variance_probabilities(a[None], density * n)[0]
    uniform = torch.full_like(a, density)
    assert variance_of(p, a) <= variance_of(uniform, a)
    for _ in range(20):  # any feasible perturbation (same sum, within [0, 1]) costs variance
        d = torch.randn(n, dtype=torch.float64) * 0.01
        d -= d.mean()
        q = p + d
        if (q > 0).all() and (q <= 1).all():
            assert variance_of(q, a) >= variance_of(p, a) - 1e-9


def test_optimal_empirical_variance_at_most_uniform():
    v = torch.rand(2000, dtype=torch.float64) ** (-1 / 1.5)  # heavy-tailed
    totals = {}
    for name in ("uniform", "optimal"):
        cfg = rp.SparseVJP(density=0.2, sketch=name)
        draws = torch.stack([sketch(v, cfg, seed) for seed in range(300)])
        totals[name] = ((draws - v) ** 2).sum(1).mean().item()
    assert totals["optimal"] < totals["uniform"]


# --- unbiasedness and variance of the sketch itself -----------------------------------------


def draws_of(cfg, v, k, channel_dim=-1):
    """K draws of S v through the autograd op (backward of the identity)."""
    out = []
    for seed in range(k):
        x = torch.zeros_like(v, requires_grad=True)
        sparse_vjp(x, cfg, seed, channel_dim).backward(v)
        out.append(x.grad)
    return torch.stack(out)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_sketch_is_unbiased(cfg):
    v = torch.randn(6, 3, 5, dtype=torch.float64) * torch.rand(6, 3, 5, dtype=torch.float64) * 3
    assert_unbiased(draws_of(cfg, v, 1500), v)


def test_unbiasedness_check_detects_a_scale_bias():
    v = torch.randn(6, 5, dtype=torch.float64)
    draws = draws_of(rp.SparseVJP(density=0.5), v, 1500)
    assert unbiasedness_pvalue(draws * 1.1, v) < 1e-4


def unit_probabilities(cfg, v):
    """(per-unit magnitudes a, keep probabilities p) of a diagonal sketch of v (6, 3, 5)."""
    if cfg.structure == "element":
        a = v.abs().reshape(v.shape[0], -1) if cfg.budget == "row" else v.abs().reshape(1, -1)
    else:
        dim = 0 if cfg.structure == "row" else -1
        a = v.movedim(dim, 0).reshape(v.shape[dim], -1).norm(dim=1)[None]
    if cfg.sketch == "uniform":
        return a, torch.full_like(a, cfg.density)
    return a, minimal_variance_probabilities(a, cfg.density * a.shape[-1])


@pytest.mark.parametrize("cfg", DIAGONAL, ids=DIAGONAL_IDS)
def test_diagonal_sketch_variance_matches_formula(cfg):
    v = torch.randn(6, 3, 5, dtype=torch.float64) * torch.rand(6, 3, 5, dtype=torch.float64) * 3
    a, p = unit_probabilities(cfg, v)
    theory = variance_of(p.flatten(), a.flatten())
    k = 2000
    totals = torch.stack([((sketch(v, cfg, seed) - v) ** 2).sum() for seed in range(k)])
    se = totals.std().item() / math.sqrt(k)
    assert abs(totals.mean().item() - theory) <= 5 * se, (totals.mean().item(), theory, se)


def test_projection_sketches_are_identity_or_scaled_at_full_density():
    v = torch.randn(8, 6, dtype=torch.float64)
    full = rp.SparseVJP(density=1.0, sketch="lowrank", structure="column")
    torch.testing.assert_close(sketch(v, full, 3), v)
    assert torch.equal(sketch(v, rp.SparseVJP(density=1.0, structure="row"), 3), v)


# --- fused layers ---------------------------------------------------------------------------


LAYERS = [
    (nn.Linear(5, 7), (6, 5)),
    (nn.Linear(5, 4, bias=False), (6, 3, 5)),
    (nn.Conv2d(3, 5, 3, padding=1), (4, 3, 6, 6)),
    (nn.Conv2d(4, 6, 3, stride=2, groups=2), (3, 4, 7, 7)),
    (nn.Conv1d(2, 3, 3, padding="same", padding_mode="reflect", bias=False), (3, 2, 8)),
]
LAYER_IDS = ["linear", "linear-3d", "conv2d", "conv2d-groups", "conv1d-reflect"]


def grads(layer, x, upstream):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = layer(x)
    out.backward(upstream)
    bias = None if layer.bias is None else layer.bias.grad
    return out.detach(), x.grad, layer.weight.grad, bias


class Composed(nn.Module):
    """The unfused reference: the plain layer followed by the sketch op with the same seed."""

    def __init__(self, layer, cfg, seed):
        super().__init__()
        self.layer, self.cfg, self.seed = layer, cfg, seed
        self.weight, self.bias = layer.weight, layer.bias

    def forward(self, x):
        channel_dim = -1 if isinstance(self.layer, nn.Linear) else 1
        return sparse_vjp(self.layer(x), self.cfg, self.seed, channel_dim)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("layer, shape", LAYERS, ids=LAYER_IDS)
def test_fused_layer_equals_exact_backward_of_sketched_signal(layer, shape, cfg):
    """Forward matches PyTorch; the fused backward (kept rows / columns only) equals the exact
    backward of S G for the same draw of S."""
    plain = copy.deepcopy(layer).double()
    fused = copy.deepcopy(plain)
    rp.convert(fused, cfg, seed=5)
    x = torch.randn(shape, dtype=torch.float64)
    upstream = torch.randn_like(plain(x))
    for _ in range(3):
        seed = fused.rp_next_seed()
        fused.rp_step -= 1
        got = grads(fused, x, upstream)
        want = grads(Composed(plain, cfg, seed), x, upstream)
        torch.testing.assert_close(got[0], plain(x), rtol=0, atol=0)
        for g, w in zip(got[1:], want[1:], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("layer, shape", LAYERS[::2], ids=LAYER_IDS[::2])
def test_fused_layer_gradients_are_unbiased(layer, shape, cfg):
    plain = copy.deepcopy(layer).double()
    fused = copy.deepcopy(plain)
    rp.convert(fused, cfg, seed=9)
    x = torch.randn(shape, dtype=torch.float64)
    upstream = torch.randn_like(plain(x))
    exact = grads(plain, x, upstream)
    draws = [grads(fused, x, upstream) for _ in range(600)]
    for i in (1, 2, 3):
        if exact[i] is not None:
            assert_unbiased(torch.stack([d[i] for d in draws]), exact[i])


def test_row_pattern_stores_only_kept_rows():
    layer = nn.Linear(64, 32)
    x = torch.randn(200, 64)
    with rp.track_saved() as exact:
        layer(x)
    sizes = {}
    for sketch_name in ("uniform", "lowrank"):
        fused = copy.deepcopy(layer)
        rp.convert(fused, rp.SparseVJP(density=0.25, sketch=sketch_name, structure="row"))
        with rp.track_saved() as saved:
            fused(x)
        sizes[sketch_name] = saved.bytes
    full = x.numel() * 4
    assert exact.bytes == full
    assert sizes["lowrank"] == 50 * 64 * 4  # P^T X: k = 50 rows
    assert sizes["uniform"] == 50 * 64 * 4  # K = 50 slots: the shape never depends on the draw


def test_seeded_reproducible_and_global_rng_untouched():
    cfg = rp.SparseVJP(density=0.3, sketch="optimal", structure="row")
    x = torch.randn(4, 3, 6, 6)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    state = torch.get_rng_state()
    results = []
    for _ in range(2):
        w.grad = None
        vjp_conv(x, w, None, 1, 1, 1, 1, method=cfg, seed=17).square().sum().backward()
        results.append(w.grad.clone())
    assert torch.equal(*results)
    assert torch.equal(state, torch.get_rng_state())


def test_autocast_bfloat16():
    layer = nn.Linear(8, 6)
    rp.convert(layer, rp.SparseVJP(density=0.5, structure="column"))
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


# --- models ---------------------------------------------------------------------------------


def toy_images(n: int, gen: torch.Generator):
    """10 classes, each a random +-1 7x7 texture tiled over the 28x28 image, plus noise."""
    y = torch.randint(0, 10, (n,), generator=gen)
    textures = torch.randn(10, 1, 7, 7, generator=gen).sign().repeat(1, 1, 4, 4)
    return textures[y] + 0.5 * torch.randn(n, 1, 28, 28, generator=gen), y


@pytest.mark.parametrize(
    "name, kwargs, cfg",
    [
        ("bagnet", {"width": 16}, "vjp:density=0.5,sketch=uniform,structure=element"),
        ("vit", {"dim": 32, "depth": 1}, "vjp:density=0.5,sketch=lowrank,structure=row"),
        ("vit", {"dim": 32, "depth": 1}, "vjp:density=0.5,sketch=optimal,structure=column"),
    ],
)
def test_models_train_with_sparse_vjp(name, kwargs, cfg):
    gen = torch.Generator().manual_seed(0)
    x, y = toy_images(320, gen)
    model = build_model(name, **kwargs)
    report = rp.convert(model, cfg, seed=1)
    # activations: ReLU's exact 1-bit masks, GELU's k-bit derivative; LayerNorm: k-bit
    # normalised input (methods.norms)
    kinds = {report.kinds[n] for n in report.converted} - {"ReLU", "GELU", "LayerNorm"}
    assert kinds == ({"Conv2d"} if name == "bagnet" else {"Conv2d", "Linear"})
    assert all(
        not isinstance(m, (nn.Linear, nn.Conv2d)) or n in report.converted
        for n, m in model.named_modules()
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    for step in range(60 if name == "bagnet" else 30):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        logits = model(x)
    assert F.cross_entropy(logits, y).item() < 0.5 * before
    assert (logits.argmax(1) == y).float().mean().item() > 0.6


def test_plain_forward_without_grad_and_sketch_for_frozen_weights():
    layer = nn.Conv2d(2, 3, 3)
    plain = copy.deepcopy(layer)
    rp.convert(layer, rp.SparseVJP(density=0.3, structure="row"))
    x = torch.randn(5, 2, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
    assert layer.rp_step == 0
    layer.requires_grad_(False)  # frozen weights: the input gradient is still sketched
    seed = layer.rp_next_seed()
    layer.rp_step -= 1
    xg = x.clone().requires_grad_()
    out = layer(xg)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert layer.rp_step == 1 and layer.weight.grad is None
    x2 = x.clone().requires_grad_()
    want = torch.autograd.grad(plain(x2), x2, sketch(upstream, layer.rp_method, seed))[0]
    torch.testing.assert_close(xg.grad, want)
