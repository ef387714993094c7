"""RAD's backward holds about what it stored: weight gradients equal to the one-piece
reference, and a forward + backward peak below exact's by about the bytes it saves less."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import randprop as rp
from randprop import random as rnd
from randprop.functional import rad_conv, rad_linear
from randprop.measure.peak import state_tensors, track_peak
from randprop.methods.base import conv_backward, saved_weight
from randprop.methods.rad import functional as rad

# --- the one-piece implementation RAD had before its backward was chunked: the reference ----


def reference_compress(x: torch.Tensor, cfg: rp.RAD, seed: int) -> torch.Tensor:
    gen = rnd.generator(seed, x.device)
    b, g, n = x.shape
    if cfg.mode == "sample":
        if cfg.same_sample:
            idx = rnd.sample_indices(g * n, rnd.kept_count(g * n, cfg.keep), gen, x.device)
            return x.reshape(b, g * n)[:, idx]
        return x.gather(2, rad.row_windows(x.shape, rnd.kept_count(n, cfg.keep), gen, x.device))
    r = rad.projection(n, rnd.kept_count(n, cfg.keep), gen, rad.sign_table(x.dtype, x.device))
    if not cfg.same_sample:
        x = x * rad.row_signs(x.shape, gen, rad.sign_table(x.dtype, x.device))
    return x @ r


def reference_decompress(stored, shape, cfg: rp.RAD, seed: int) -> torch.Tensor:
    gen = rnd.generator(seed, stored.device)
    b, g, n = shape
    dtype, device = stored.dtype, stored.device
    if cfg.mode == "sample":
        x_hat = torch.zeros(shape, dtype=dtype, device=device)
        if cfg.same_sample:
            k = rnd.kept_count(g * n, cfg.keep)
            idx = rnd.sample_indices(g * n, k, gen, device)
            x_hat.view(b, g * n)[:, idx] = stored * (g * n / k)
        else:
            k = rnd.kept_count(n, cfg.keep)
            x_hat.scatter_(2, rad.row_windows(shape, k, gen, device), stored * (n / k))
        return x_hat
    r = rad.projection(n, rnd.kept_count(n, cfg.keep), gen, rad.sign_table(dtype, device))
    signs = None if cfg.same_sample else rad.row_signs(shape, gen, rad.sign_table(dtype, device))
    x_hat = stored @ r.T
    return x_hat if signs is None else x_hat * signs


def reference_linear_weight_grad(grad_out, stored, in_features, cfg, seed):
    rows = grad_out.shape[0]
    x_hat = reference_decompress(stored, torch.Size((rows, 1, in_features)), cfg, seed)
    return grad_out.T @ x_hat.view(rows, in_features)


def reference_conv_backward(ctx, grad_out):
    """_RADConvFn.backward as it was: X_hat of the whole batch, one convolution_backward."""
    stored, weight = ctx.saved_tensors
    weight = saved_weight(ctx, weight, grad_out)
    need_x, need_w = ctx.needs_input_grad[:2]
    need_b = ctx.bias_shape is not None and ctx.needs_input_grad[2]
    x_hat = None
    if need_w:
        b, c = ctx.x_shape[:2]
        shape = torch.Size((b, c, ctx.x_shape[2:].numel()))
        x_hat = reference_decompress(stored, shape, ctx.cfg, ctx.seed).view(ctx.x_shape)
    grads = conv_backward(
        grad_out, x_hat, ctx.x_shape, weight, ctx.bias_shape, ctx.conv, [need_x, need_w, need_b]
    )
    return (*grads, None, None, None, None, None, None)


@pytest.fixture
def reference_rad(monkeypatch):
    """Installs the one-piece reference in place of RAD's chunked compress and backward."""

    def install():
        monkeypatch.setattr(rad, "compress", reference_compress)
        monkeypatch.setattr(rad, "linear_weight_grad", reference_linear_weight_grad)
        monkeypatch.setattr(rad._RADConvFn, "backward", staticmethod(reference_conv_backward))

    return install


CONFIGS = [
    rp.RAD(keep=0.1),
    rp.RAD(keep=0.3),
    rp.RAD(keep=0.02),
    rp.RAD(keep=1.0),
    rp.RAD(keep=0.2, same_sample=True),
    rp.RAD(keep=0.1, mode="project"),
    rp.RAD(keep=0.3, mode="project", same_sample=True),
]


def grads(fn, x, weight, bias, upstream):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    (fn(x, weight, bias) * upstream).sum().backward()
    return x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("shape", [(150, 784), (7, 3, 40), (1, 5)])
def test_linear_gradients_equal_the_one_piece_reference(cfg, shape, reference_rad):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen)
    weight = torch.randn(6, shape[-1], dtype=torch.float64, generator=gen)
    bias = torch.randn(6, dtype=torch.float64, generator=gen)
    upstream = torch.randn(*shape[:-1], 6, dtype=torch.float64, generator=gen)

    def fn(x, w, b):
        return rad_linear(x, w, b, method=cfg, seed=1234)

    stored = rad.compress(x.reshape(-1, 1, shape[-1]), cfg, 1234)
    new = grads(fn, x, weight, bias, upstream)
    reference_rad()
    assert (
        stored.shape == (ref_stored := rad.compress(x.reshape(-1, 1, shape[-1]), cfg, 1234)).shape
    )
    torch.testing.assert_close(stored, ref_stored, rtol=1e-12, atol=1e-12)
    for a, b in zip(new, grads(fn, x, weight, bias, upstream), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize(
    "x_shape, weight_shape, stride, padding, dilation, groups",
    [
        ((5, 4, 30), (6, 4, 3), [2], [1], [1], 1),
        ((9, 4, 10, 10), (6, 2, 3, 3), [1, 1], [1, 1], [2, 2], 2),
        ((1, 2, 6, 5), (3, 2, 2, 2), [1, 2], [0, 1], [1, 1], 1),
        ((3, 2, 4, 5, 6), (4, 2, 2, 3, 2), [1, 1, 2], [1, 0, 1], [1, 1, 1], 1),
    ],
    ids=["1d", "2d-groups", "2d-one", "3d"],
)
def test_conv_gradients_equal_the_one_piece_reference(
    cfg, x_shape, weight_shape, stride, padding, dilation, groups, reference_rad
):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*x_shape, dtype=torch.float64, generator=gen)
    weight = torch.randn(*weight_shape, dtype=torch.float64, generator=gen)
    bias = torch.randn(weight_shape[0], dtype=torch.float64, generator=gen)

    def fn(x, w, b):
        return rad_conv(x, w, b, stride, padding, dilation, groups, method=cfg, seed=99)

    upstream = torch.randn(fn(x, weight, bias).shape, dtype=torch.float64, generator=gen)
    new = grads(fn, x, weight, bias, upstream)
    reference_rad()
    for a, b in zip(new, grads(fn, x, weight, bias, upstream), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_chunked_draws_are_the_one_piece_draws():
    """Chunks are several: the equality above is not that of a single chunk."""
    assert rad.rows_per_chunk(1500, 79, 784) == 144  # the stored values' size, 151, cut to 16s
    assert rad.rows_per_chunk(150, 79, 784) == 2**14 // 784  # the floor
    assert rad.rows_per_chunk(2, 1, 100_000) == 1


# --- peak memory ----------------------------------------------------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def cnn() -> nn.Module:
    """The head is small: project mode regenerates its n x k projection R whole, which for a
    wide Linear layer at a small batch outweighs what it saves."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),
    )  # fmt: skip


def peak_and_saved(build, method: str, x, y) -> tuple[int, int]:
    model = build()
    rp.convert(model, method)
    with rp.track_saved() as saved:
        loss = F.cross_entropy(model(x), y)
    del loss
    with track_peak([*state_tensors(model), x, y]) as peak:
        F.cross_entropy(model(x), y).backward()
    return peak.bytes, saved.bytes


def peak_gap(build, method, x, y) -> tuple[int, int]:
    """(peak(exact) - peak(method), saved(exact) - saved(method)) over forward + backward."""
    exact = peak_and_saved(build, "exact", x, y)
    other = peak_and_saved(build, method, copy.deepcopy(x), y)
    return exact[0] - other[0], exact[1] - other[1]


CASES = {
    "mlp": (mlp, (2048, 32)),
    "cnn": (cnn, (32, 3, 16, 16)),
}
METHODS = ["rad:keep=0.1", "rad:keep=0.1,mode=project", "rad:keep=0.1,same_sample=True"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_peak_is_below_exact_by_three_quarters_of_the_saved_difference(case, method):
    build, shape = CASES[case]
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(*shape, generator=gen), torch.randint(0, 10, shape[:1], generator=gen)
    peak_less, saved_less = peak_gap(build, method, x, y)
    assert saved_less > 0
    assert peak_less >= 0.75 * saved_less, (peak_less, saved_less)


@pytest.mark.parametrize("method", METHODS[:2])
@pytest.mark.parametrize("case", CASES)
def test_positive_control_the_one_piece_backward_fails_the_peak_test(case, method, reference_rad):
    build, shape = CASES[case]
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(*shape, generator=gen), torch.randint(0, 10, shape[:1], generator=gen)
    reference_rad()
    peak_less, saved_less = peak_gap(build, method, x, y)
    assert saved_less > 0
    assert peak_less < 0.75 * saved_less, (peak_less, saved_less)
