"""Trace: exact forward / input / bias gradients, unbiased weight gradients over every convolution
setting, the fast weight gradient against its reconstruct-then-convolve definition, variance ~ 1/r,
storage, reproducibility."""

import copy
import math

import pytest
import torch
from stat_checks import assert_unbiased, unbiasedness_pvalue
from torch import nn

import randprop as rp
from randprop.methods import trace as T
from randprop.methods.base import explicit_padding


def conv_cases():
    """(layer, input shape): borders, stride 2, dilation 2, groups 2, depthwise, kernels 1/3/5,
    odd sizes, 1d/2d/3d, every padding mode, 'same', with and without bias."""
    yield nn.Conv1d(4, 6, 5, stride=2, padding=2, groups=2), (3, 4, 11)
    yield nn.Conv1d(3, 3, 3, padding=2, dilation=2, groups=3, bias=False), (2, 3, 9)
    yield nn.Conv2d(2, 4, 3, padding=1), (3, 2, 7, 5)
    yield nn.Conv2d(3, 4, 5, stride=2, padding=2), (2, 3, 9, 7)
    yield nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=4, bias=False), (2, 4, 9, 9)
    yield nn.Conv2d(4, 6, 1, stride=2, groups=2), (2, 4, 7, 7)
    yield nn.Conv2d(2, 3, 3, padding="same", dilation=2, padding_mode="reflect"), (2, 2, 7, 6)
    yield nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 2, 5, 5)
    yield nn.Conv2d(2, 2, 5, padding="same", padding_mode="replicate", bias=False), (2, 2, 5, 7)
    yield nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, groups=2), (2, 2, 3, 5, 5)


CASES = list(conv_cases())
IDS = [f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(CASES)]
CHANNELS = ["multi", "independent"]


def converted(layer: nn.Module, cfg, seed: int = 0) -> nn.Module:
    layer = copy.deepcopy(layer).double()
    report = rp.convert(layer, cfg, seed=seed)
    assert report.converted == [""]
    return layer


def run(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = layer(x)
    out.backward(upstream)
    bias = None if layer.bias is None else layer.bias.grad
    return out.detach(), x.grad, layer.weight.grad, bias


def test_config_round_trip_and_errors():
    cfg = rp.Trace(probes=4, probe="orthogonal", channels="independent")
    assert rp.parse_method(str(cfg)) == cfg
    assert rp.parse_method("trace:probes=8") == rp.Trace(probes=8)
    with pytest.raises(ValueError, match="probes must be a positive integer"):
        rp.Trace(probes=0)
    with pytest.raises(ValueError, match="probe must be one of 'gaussian', 'rademacher'"):
        rp.Trace(probe="sobol")
    with pytest.raises(ValueError, match="channels must be one of 'multi', 'independent'"):
        rp.Trace(channels="both")
    report = rp.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1)), cfg)
    assert report.converted == ["0"] and "does not support Linear" in report.skipped["2"]


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("layer, shape", CASES, ids=IDS)
def test_forward_and_exact_parts_match_pytorch(layer, shape, channels):
    plain = copy.deepcopy(layer).double()
    traced = converted(layer, rp.Trace(probes=3, channels=channels))
    assert isinstance(traced, type(layer))
    assert traced.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(shape, dtype=torch.float64)
    upstream = torch.randn_like(plain(x))
    out_p, gx_p, _, gb_p = run(plain, x, upstream)
    out_t, gx_t, gw_t, gb_t = run(traced, x, upstream)
    torch.testing.assert_close(out_t, out_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_t, gx_p, rtol=1e-12, atol=1e-12)
    if gb_p is not None:
        torch.testing.assert_close(gb_t, gb_p, rtol=1e-12, atol=1e-12)
    assert gw_t.shape == layer.weight.shape


def _padded_input(layer: nn.Module, x: torch.Tensor):
    return explicit_padding(layer, x)


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("layer, shape", CASES, ids=IDS)
def test_fast_weight_gradient_equals_reconstructed_input(layer, shape, channels):
    """The probe-based weight gradient equals conv_weight_grad(X_hat, D), X_hat = (1/r) sum_j
    Xbar_j z_j built explicitly from the same draw (and both independent paths agree)."""
    cfg = rp.Trace(probes=5, channels=channels, probe="rademacher")
    layer = copy.deepcopy(layer).double()
    x, padding = _padded_input(layer, torch.randn(shape, dtype=torch.float64))
    conv = (list(layer.stride), list(padding), list(layer.dilation), [0] * (x.dim() - 2))
    conv = (*conv, layer.groups)
    w = layer.weight.detach().clone().requires_grad_()
    out = torch.ops.aten.convolution(x, w, None, *conv[:3], False, conv[3], conv[4])
    upstream = torch.randn_like(out)
    z = T.probe_tensor(x.shape, cfg, 5, x.device, x.dtype)
    x_hat = T.reconstruct(T.project(x, z, cfg), z, cfg)
    out_hat = torch.ops.aten.convolution(x_hat, w, None, *conv[:3], False, conv[3], conv[4])
    (expected,) = torch.autograd.grad(out_hat, w, upstream)
    out = T.trace_conv(
        x, w, None, layer.stride, padding, layer.dilation, layer.groups, method=cfg, seed=5
    )
    out.backward(upstream)
    torch.testing.assert_close(w.grad, expected, rtol=1e-10, atol=1e-10)
    if channels == "independent":
        stored = T.project(x, z, cfg)
        for path in ("probe-input", "batch-first"):
            grad = T.independent_weight_grad(upstream, stored, z, w.shape, conv, path)
            torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "cfg",
    [
        rp.Trace(probes=32),
        rp.Trace(probes=16, channels="independent"),
        rp.Trace(probes=24, probe="orthogonal"),
        rp.Trace(probes=5, probe="rademacher", channels="independent"),
    ],
    ids=["gaussian-multi", "gaussian-indep", "orthogonal-multi", "rademacher-indep"],
)
@pytest.mark.parametrize("layer, shape", CASES, ids=IDS)
def test_weight_gradient_is_unbiased(layer, shape, cfg):
    """Hotelling T^2 over K draws on the whole gradient and on its per-tap sums (the functionals
    a border bias such as the authors' circular roll would shift)."""
    plain = copy.deepcopy(layer).double()
    traced = converted(layer, cfg, seed=7)
    x = torch.randn(shape, dtype=torch.float64)
    upstream = torch.randn_like(plain(x))
    exact = run(plain, x, upstream)[2]
    draws = torch.stack([run(traced, x, upstream)[2] for _ in range(400)])
    assert_unbiased(draws, exact)
    assert_unbiased(draws.sum((1, 2)), exact.sum((0, 1)))


def test_statistic_detects_a_border_bias():
    """Negative control: the same draws judged against the gradient of a circularly padded
    convolution (what a circular-roll backward estimates) are rejected."""
    layer = nn.Conv2d(2, 3, 3, padding=1)
    plain = copy.deepcopy(layer).double()
    traced = converted(layer, rp.Trace(probes=4), seed=3)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    upstream = torch.randn_like(plain(x))
    exact = run(plain, x, upstream)[2]
    circular = copy.deepcopy(plain)
    circular.padding_mode = "circular"
    rolled = run(circular, x, upstream)[2]
    draws = torch.stack([run(traced, x, upstream)[2] for _ in range(300)])
    assert unbiasedness_pvalue(draws, exact) > 1e-4
    assert unbiasedness_pvalue(draws.sum((1, 2)), rolled.sum((0, 1))) < 1e-6


def _total_variance(layer, cfg, x, upstream, draws=300):
    """Total variance sum_i Var(g_i) over draws and the standard error of its logarithm."""
    traced = converted(layer, cfg, seed=1)
    g = torch.stack([run(traced, x, upstream)[2].flatten() for _ in range(draws)])
    dev = ((g - g.mean(0)) ** 2).sum(1) * draws / (draws - 1)
    return dev.mean().item(), (dev.std() / dev.mean()).item() / math.sqrt(draws)


@pytest.mark.parametrize("channels", CHANNELS)
def test_variance_falls_as_one_over_r(channels):
    """r iid probes average r single-probe estimates, so Var(r=2) / Var(r=8) = 4; the bound is
    4 standard errors of the log ratio (delta method on the per-draw squared deviations)."""
    layer = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    upstream = torch.randn_like(layer.double()(x))
    v2, se2 = _total_variance(layer, rp.Trace(probes=2, channels=channels), x, upstream)
    v8, se8 = _total_variance(layer, rp.Trace(probes=8, channels=channels), x, upstream)
    log_ratio, se = math.log(v2 / v8), math.hypot(se2, se8)
    assert abs(log_ratio - math.log(4)) < 4 * se, (v2 / v8, se)


def test_orthogonal_probes_reduce_variance():
    """With r close to n, orthogonal probes (a scaled random projection) beat iid Gaussian ones."""
    layer = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    upstream = torch.randn_like(layer.double()(x))
    v_gauss, _ = _total_variance(layer, rp.Trace(probes=24), x, upstream, draws=100)
    v_orth, _ = _total_variance(layer, rp.Trace(probes=24, probe="orthogonal"), x, upstream, 100)
    assert v_orth < 0.5 * v_gauss


def test_orthogonal_probe_rows():
    gen = torch.Generator().manual_seed(0)
    z = rp.random.orthogonal((7, 5), gen, torch.device("cpu"), torch.float64)
    assert z.shape == (7, 5)
    torch.testing.assert_close(z[:5] @ z[:5].T, 5 * torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(z.norm(dim=1), torch.full((7,), math.sqrt(5), dtype=torch.float64))


@pytest.mark.parametrize("channels, per_example", [("multi", 16), ("independent", 16 * 8)])
def test_stores_projections_only(channels, per_example):
    """Saved for backward: B x r (multi) or B x C x r (independent) values plus ReLU bit masks."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    rp.convert(model, rp.Trace(probes=16, channels=channels), target_modules=["0", "1"])
    x = torch.randn(5, 8, 12, 12)
    with rp.track_saved(model) as saved:
        model(x).sum().backward()
    assert saved.by_module["0"] == 5 * per_example * 4
    assert saved.by_module["1"] == 5 * 8 * 12 * 12 // 8


def test_reproducible_by_seed_and_global_rng_untouched():
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    upstream = torch.randn(2, 4, 6, 6)
    state = torch.get_rng_state()
    for probe in ("gaussian", "rademacher", "orthogonal"):
        cfg = rp.Trace(probes=4, probe=probe)
        a, b, c = converted(layer, cfg, 5), converted(layer, cfg, 5), converted(layer, cfg, 6)
        ga, gb, gc = (run(m, x.double(), upstream.double())[2] for m in (a, b, c))
        assert torch.equal(ga, gb) and not torch.equal(ga, gc)
        assert not torch.equal(ga, run(a, x.double(), upstream.double())[2])  # next step
    assert torch.equal(state, torch.get_rng_state())


def test_convert_keeps_first_conv_exact_and_unbatched_input():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3))
    reference = copy.deepcopy(model)
    report = rp.convert(model, rp.Trace(probes=2), module_filter_fn=lambda m, n: n != "0")
    assert report.converted == ["1", "2"] and "module_filter_fn" in report.skipped["0"]
    x = torch.randn(1, 8, 8)  # unbatched
    model(x).sum().backward()
    reference(x).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad)
    assert not torch.allclose(model[2].weight.grad, reference[2].weight.grad)
    rp.restore(model)
    assert type(model[2]) is nn.Conv2d


def test_float32_and_autocast():
    layer = nn.Conv2d(3, 4, 3, padding=1)
    rp.convert(layer, rp.Trace(probes=4, probe="orthogonal"))
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("cfg", [rp.Trace(probes=96), rp.Trace(probes=32, channels="independent")])
def test_no_scale_bias(cfg):
    """A sharper check along the exact gradient g: over K draws, <g_k, g> / |g|^2 must average 1
    within 4.5 standard errors (a mis-scaled estimator, e.g. off by 5%, fails this)."""
    layer = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    plain = copy.deepcopy(layer).double()
    traced = converted(layer, cfg, seed=2)
    x = torch.randn(4, 4, 9, 9, dtype=torch.float64)
    upstream = torch.randn_like(plain(x))
    exact = run(plain, x, upstream)[2].flatten()
    draws = torch.stack([run(traced, x, upstream)[2].flatten() for _ in range(1500)])
    ratio = draws @ exact / exact.dot(exact)
    se = ratio.std().item() / math.sqrt(len(ratio))
    assert abs(ratio.mean().item() - 1) < 4.5 * se, (ratio.mean().item(), se)
    assert se < 0.01  # the check resolves a 5% scale error


def test_trace_cnn_saves_ten_times_less_with_first_conv_exact():
    """The paper's 3-conv net: r=16 with the first conv exact (ReLU bit masks, 1-byte max-pool
    offsets) saves at least 10x fewer bytes for backward than exact backprop."""
    from randprop.measure.profile import converted_copy, saved_for_backward
    from randprop.models import build_model

    model = build_model("trace-cnn")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    assert model(x).shape == (16, 10)
    exact = saved_for_backward(copy.deepcopy(model), x, y).bytes
    traced = converted_copy(model, {"0": "exact", "*": "trace:probes=16"})
    assert type(traced[0]) is nn.Conv2d and isinstance(traced[3], T.TraceConv2d)
    assert exact >= 10 * saved_for_backward(traced, x, y).bytes


class _InputSized(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every tensor of ``shape`` that an op makes or reads, but for the one
    ``allowed`` output (the input gradient itself)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.seen = shape, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_flatten((args, kwargs, out))[0]
        if any(isinstance(t, torch.Tensor) and t.shape == self.shape for t in flat):
            self.seen.append(str(func))
        return out


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0), (3, 2)])
def test_input_gradient_makes_no_input_sized_stand_in(stride, padding):
    """Backward computes dX as a transposed convolution to the input's shape: the only
    input-sized tensor it touches is dX itself (convolution_backward would take, and some
    backends materialise, an input-sized zero stand-in for X). A control: a backward that
    does build one is seen."""
    layer = nn.Conv2d(3, 4, 3, stride=stride, padding=padding)
    want = copy.deepcopy(layer)
    rp.convert(layer, rp.Trace(probes=3))
    x = torch.randn(2, 3, 9, 11, requires_grad=True)  # not the probes' shape (3, 3, 9, 11)
    out = layer(x)
    grad = torch.randn_like(out)
    mode = _InputSized(x.shape)
    with mode:
        (dx,) = torch.autograd.grad(out, x, grad)
    assert mode.seen == ["aten.convolution.default"], mode.seen  # the transposed conv making dX
    x_ref = x.detach().requires_grad_()
    torch.testing.assert_close(dx, torch.autograd.grad(want(x_ref), x_ref, grad)[0])
    with mode:
        x.new_zeros(()).expand(x.shape).contiguous()
    assert len(mode.seen) > 1
