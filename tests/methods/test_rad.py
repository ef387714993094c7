"""RAD: exact forward / input / bias gradients, unbiased weight gradients, reproducibility."""

import copy
import dataclasses
import itertools

import pytest
import torch
from stat_checks import assert_no_scale_bias, assert_unbiased
from torch import nn

import randprop as rp

MODES = [
    rp.RAD(keep=0.3),
    rp.RAD(keep=0.3, same_sample=True),
    rp.RAD(keep=0.3, mode="project"),
    rp.RAD(keep=0.3, mode="project", same_sample=True),
]
MODE_IDS = ["sample", "sample-same", "project", "project-same"]


def conv_cases():
    """(layer, input shape): 1d/2d/3d across stride, padding, dilation, groups, bias, modes."""
    yield nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=True), (3, 4, 11)
    yield nn.Conv1d(3, 3, 5, padding=2, groups=3, bias=False), (2, 3, 9)
    yield nn.Conv2d(2, 4, 3, padding=1), (3, 2, 7, 6)
    yield nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=4, bias=False), (2, 4, 9, 9)
    yield nn.Conv2d(2, 6, (1, 3), stride=(2, 1), padding=(0, 1), groups=2), (2, 2, 5, 7)
    yield nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"), (2, 2, 6, 5)
    yield nn.Conv2d(2, 3, 4, padding="same", dilation=1), (2, 2, 6, 6)
    yield nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 2, 5, 5)
    yield nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, groups=2), (2, 2, 4, 5, 5)
    yield nn.Conv3d(2, 2, 1, padding_mode="replicate", padding=1, bias=False), (2, 2, 3, 3, 3)


LAYER_CASES = [(nn.Linear(7, 5), (3, 7)), (nn.Linear(6, 4, bias=False), (2, 3, 6)), *conv_cases()]
LAYER_IDS = [f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(LAYER_CASES)]


def converted(layer: nn.Module, cfg, seed: int = 0) -> nn.Module:
    layer = copy.deepcopy(layer).double()
    rp.convert(layer, cfg, seed=seed)
    return layer


def run(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = layer(x)
    out.backward(upstream)
    bias = None if layer.bias is None else layer.bias.grad
    return out.detach(), x.grad, layer.weight.grad, bias


@pytest.mark.parametrize("cfg", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("layer, shape", LAYER_CASES, ids=LAYER_IDS)
def test_forward_and_exact_parts_match_pytorch(layer, shape, cfg):
    plain = copy.deepcopy(layer).double()
    rad = converted(layer, cfg)
    x = torch.randn(shape, dtype=torch.float64)
    upstream = torch.randn_like(plain(x))
    out_p, gx_p, _, gb_p = run(plain, x, upstream)
    out_r, gx_r, gw_r, gb_r = run(rad, x, upstream)
    torch.testing.assert_close(out_r, out_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_r, gx_p, rtol=1e-12, atol=1e-12)
    if gb_p is not None:
        torch.testing.assert_close(gb_r, gb_p, rtol=1e-12, atol=1e-12)
    assert gw_r.shape == layer.weight.shape


@pytest.mark.parametrize("cfg", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("layer, shape", LAYER_CASES, ids=LAYER_IDS)
def test_weight_gradient_is_unbiased(layer, shape, cfg):
    plain = copy.deepcopy(layer).double()
    rad = converted(layer, cfg, seed=11)
    x = torch.randn(shape, dtype=torch.float64)
    upstream = torch.randn_like(plain(x))
    exact = run(plain, x, upstream)[2]
    draws = torch.stack([run(rad, x, upstream)[2] for _ in range(400)])
    assert_unbiased(draws, exact)


def test_unbiasedness_check_detects_a_small_bias():
    """The check has power: a 10% scale error, or a 1/p reweighting left out in a few
    coordinates, is rejected from the same number of draws that passes the true estimator."""
    layer, shape = nn.Linear(7, 5), (3, 7)
    plain, rad = copy.deepcopy(layer).double(), converted(layer, rp.RAD(keep=0.5))
    x = torch.randn(shape, dtype=torch.float64)
    upstream = torch.randn(3, 5, dtype=torch.float64)
    exact = run(plain, x, upstream)[2]
    draws = torch.stack([run(rad, x, upstream)[2] for _ in range(2000)])
    assert_unbiased(draws, exact)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(draws * 1.1, exact)
    halved = draws.clone()
    halved[:, :, :2] *= 0.5
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(halved, exact)


@pytest.mark.parametrize("cfg", [dataclasses.replace(c, keep=0.5) for c in MODES], ids=MODE_IDS)
@pytest.mark.parametrize(
    "layer, shape",
    [(nn.Linear(24, 8), (64, 24)), (nn.Conv2d(4, 6, 3, padding=1), (8, 4, 6, 6))],
    ids=["linear", "conv2d"],
)
def test_no_scale_bias(layer, shape, cfg):
    """Along the exact gradient g, <g_k, g> / |g|^2 averages 1 within 4.5 standard errors, and
    the standard error is small enough that a 3% scale error fails (checked on the same draws)."""
    plain = copy.deepcopy(layer).double()
    rad = converted(layer, cfg, seed=2)
    x = torch.randn(shape, dtype=torch.float64)
    upstream = torch.randn_like(plain(x))
    exact = run(plain, x, upstream)[2]
    count = 1600 if cfg.mode == "project" else 600  # projections vary more at equal keep
    draws = torch.stack([run(rad, x, upstream)[2] for _ in range(count)])
    assert_no_scale_bias(draws, exact, resolve=0.03)
    for scale in (0.97, 1.03):
        with pytest.raises(AssertionError, match="scale bias"):
            assert_no_scale_bias(draws * scale, exact)


@pytest.mark.parametrize("cfg", MODES, ids=MODE_IDS)
def test_keep_one_sample_is_exact(cfg):
    if cfg.mode == "project":
        pytest.skip("a random projection is not the identity even at keep=1")
    layer = nn.Conv2d(2, 3, 3, padding=1)
    plain, rad = copy.deepcopy(layer).double(), converted(layer, rp.RAD(keep=1.0))
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    upstream = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(run(rad, x, upstream)[2], run(plain, x, upstream)[2])


def test_same_seed_gives_bitwise_identical_gradients_and_global_rng_is_untouched():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))

    def grads(seed):
        m = copy.deepcopy(model)
        rp.convert(m, rp.RAD(keep=0.2), seed=seed)
        out = []
        for _ in range(2):  # two steps: the seed stream advances identically
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            out += [p.grad.clone() for p in m.parameters()]
        return out

    state = torch.get_rng_state()
    a, b, c = grads(5), grads(5), grads(6)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a, c, strict=True))


@pytest.mark.parametrize("cfg", MODES, ids=MODE_IDS)
def test_autocast_bfloat16_keeps_dtypes(cfg):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    plain = copy.deepcopy(model)
    rp.convert(model, cfg)
    x = torch.randn(3, 2, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = model(x), plain(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_rad_stores_about_keep_of_the_input():
    layer = converted(nn.Linear(100, 10), rp.RAD(keep=0.1)).float()
    x = torch.randn(64, 100)
    with rp.track_saved() as saved:
        layer(x)
    exact = x.numel() * 4
    assert 0.07 * exact < saved.bytes < 0.13 * exact


def test_no_weight_grad_needed_stores_nothing():
    layer = converted(nn.Linear(20, 4), rp.RAD(keep=0.1))
    layer.weight.requires_grad_(False)
    x = torch.randn(8, 20, dtype=torch.float64, requires_grad=True)
    with rp.track_saved() as saved:
        out = layer(x)
    assert saved.bytes == 0
    out.sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(8, 20))


def test_unbatched_conv_input():
    layer = nn.Conv2d(2, 3, 3)
    rad = converted(layer, rp.RAD(keep=0.5))
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(rad(x), copy.deepcopy(layer).double()(x))


def test_modes_cover_every_combination():
    assert len({(c.mode, c.same_sample) for c in MODES}) == len(
        list(itertools.product(["sample", "project"], [True, False]))
    )


def test_no_grad_forward_draws_no_seed_and_stores_nothing():
    layer = converted(nn.Conv2d(2, 3, 3), rp.RAD())
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    assert layer.rp_step == 0
    torch.testing.assert_close(out, nn.functional.conv2d(x, layer.weight, layer.bias))


def test_row_windows_are_uniform_k_subsets():
    from randprop import random as rnd
    from randprop.methods.rad import row_windows

    n, k, rows = 9, 3, 6000
    idx = row_windows(torch.Size((rows, 1, n)), k, rnd.generator(4), torch.device("cpu"))
    assert idx.shape == (rows, 1, k)
    assert all(len(set(r.tolist())) == k for r in idx[:200, 0])
    counts = torch.bincount(idx.flatten(), minlength=n).double()
    p = k / n  # inclusion probability of every position
    sd = (rows * p * (1 - p)) ** 0.5
    assert ((counts - rows * p).abs() / sd).max() < 4.5
