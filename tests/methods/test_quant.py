"""Quant: exact forward, input and bias gradients; unbiased weight gradients from the k-bit
stored input for every width; stored bytes; config string form and errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from stat_checks import assert_unbiased
from torch import nn

import randprop as rp
from randprop import functional as rpf
from randprop.methods.quant import QuantConv2d, QuantLinear

BITS = [1, 2, 4, 8]


def layer_cases():
    """(layer, input shape): Linear on 2-D and 3-D input, convolutions with stride, dilation,
    groups, depthwise, 'same', padding modes, 1d/2d/3d, with and without bias."""
    yield nn.Linear(5, 4), (6, 5)
    yield nn.Linear(7, 3, bias=False), (2, 3, 7)
    yield nn.Conv1d(4, 6, 5, stride=2, padding=2, groups=2), (3, 4, 11)
    yield nn.Conv2d(2, 4, 3, padding=1), (3, 2, 7, 5)
    yield nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=4, bias=False), (2, 4, 9, 9)
    yield nn.Conv2d(2, 3, 4, padding="same", padding_mode="reflect"), (2, 2, 7, 6)
    yield nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 2, 5, 5)
    yield nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, groups=2), (2, 2, 3, 5, 5)


CASES = list(layer_cases())
IDS = [f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(CASES)]


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
    cfg = rp.Quant(bits=2, group=256)
    assert str(cfg) == "quant:bits=2,group=256"
    assert rp.parse_method(str(cfg)) == cfg
    assert rp.parse_method("quant") == rp.Quant(bits=2, group=0)
    for bits in (0, 3, 16, True, 2.0):
        with pytest.raises(ValueError, match="quant: bits must be one of 1, 2, 4, 8; got"):
            rp.Quant(bits=bits)
    with pytest.raises(ValueError, match="quant: bits must be one of 1, 2, 4, 8; got 3"):
        rp.parse_method("quant:bits=3")
    for group in (-1, 1.5, False):
        with pytest.raises(ValueError, match="quant: group must be 0 .* or a positive int"):
            rp.Quant(group=group)
    with pytest.raises(TypeError, match="quant_linear: method must be a Quant config"):
        rpf.quant_linear(torch.randn(2, 3), torch.randn(4, 3), method="rad")
    with pytest.raises(TypeError, match="QuantConv2d: method must be a Quant config"):
        QuantConv2d(1, 2, 3, method=rp.Trace())


def test_convert_swaps_every_weight_layer_and_the_relu_masks():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    report = rp.convert(model, rp.Quant(bits=4))
    assert report.converted == ["0", "1", "3"] and "1-bit mask" in str(report)
    assert isinstance(model[3], QuantLinear) and model[3].rp_method == rp.Quant(bits=4)
    assert rp.restore(model) == ["0", "1", "3"] and type(model[3]) is nn.Linear


@pytest.mark.parametrize("bits", [1, 8])
@pytest.mark.parametrize("layer, shape", CASES, ids=IDS)
def test_forward_and_exact_parts_match_pytorch(layer, shape, bits):
    plain = copy.deepcopy(layer).double()
    quant = converted(layer, rp.Quant(bits=bits))
    assert quant.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(shape, dtype=torch.float64)
    upstream = torch.randn_like(plain(x))
    out_p, gx_p, gw_p, gb_p = run(plain, x, upstream)
    out_q, gx_q, gw_q, gb_q = run(quant, x, upstream)
    torch.testing.assert_close(out_q, out_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_q, gx_p, rtol=1e-12, atol=1e-12)
    if gb_p is not None:
        torch.testing.assert_close(gb_q, gb_p, rtol=1e-12, atol=1e-12)
    assert gw_q.shape == gw_p.shape and not torch.allclose(gw_q, gw_p)  # estimated


def test_one_element_groups_are_exact():
    """group=1: every element is its own group (scale 0, minimum the value itself, float32), so
    a float32 input is stored exactly and so is the weight gradient."""
    layer, shape = CASES[3]
    plain, quant = copy.deepcopy(layer), copy.deepcopy(layer)
    rp.convert(quant, rp.Quant(group=1))
    x = torch.randn(shape)
    upstream = torch.randn_like(plain(x))
    assert torch.equal(run(quant, x, upstream)[2], run(plain, x, upstream)[2])


def _draws(layer: nn.Module, cfg, x: torch.Tensor, upstream: torch.Tensor, count: int):
    quant = converted(layer, cfg, seed=1)
    return torch.stack([run(quant, x, upstream)[2] for _ in range(count)])


def away_from_levels(shape, bits: int, group: int, gen: torch.Generator) -> torch.Tensor:
    """A float64 input whose every group of ``group`` elements spans [m, m + (2^k - 1) s] (its
    first two elements the extremes) and whose other elements lie between 0.1 s and 0.9 s past
    a level: each rounding then has both outcomes with probability >= 0.1, so that 300 draws
    see both (T^2 takes a direction without variance in the draws as deterministic)."""
    levels = (1 << bits) - 1
    numel = torch.Size(shape).numel()
    n = -(-numel // group)
    codes = torch.randint(0, levels, (n, group), generator=gen).double()
    codes += 0.1 + 0.8 * torch.rand(n, group, generator=gen, dtype=torch.float64)
    codes[:, 0], codes[:, 1] = 0, levels
    scale = 0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64)
    low = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    return (low + scale * codes / levels).flatten()[:numel].view(shape)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "layer, shape, group",
    [
        (nn.Linear(6, 3), (5, 6), 6),  # per row (the default)
        (nn.Linear(6, 3), (5, 6), 4),  # groups across rows
        (nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 4), 20),  # per plane (the default)
    ],
    ids=["linear-rows", "linear-group4", "conv-planes"],
)
def test_weight_gradient_is_unbiased(layer, shape, group, bits):
    """The mean of 300 weight gradients equals PyTorch's (Hotelling T^2); positive control: the
    same draws 10% off in scale are rejected."""
    x = away_from_levels(shape, bits, group, torch.Generator().manual_seed(bits))
    plain = copy.deepcopy(layer).double()
    upstream = torch.randn_like(plain(x))
    exact = run(plain, x, upstream)[2]
    cfg = rp.Quant(bits=bits, group=0 if group in (6, 20) else group)
    draws = _draws(layer, cfg, x, upstream, 300)
    assert_unbiased(draws, exact)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(draws * 1.1, exact)


def test_variance_falls_with_bits():
    """Each extra bit halves the rounding step: the weight gradient's spread shrinks with k."""
    layer, shape = nn.Linear(16, 4), (8, 16)
    x = torch.randn(shape, dtype=torch.float64)
    upstream = torch.randn(8, 4, dtype=torch.float64)
    spread = [_draws(layer, rp.Quant(bits=b), x, upstream, 40).std(0).mean() for b in BITS]
    assert all(a > 1.5 * b for a, b in zip(spread, spread[1:], strict=False))


@pytest.mark.parametrize("bits", BITS)
def test_saved_bytes_shrink_with_bits(bits):
    """Linear (64 rows of 256): exact saves 64 KiB of fp32 input; Quant saves 64 x 256 x k / 8
    bytes of codes plus 8 bytes per row (scale and minimum). Conv (2 x 3 x 8 x 8) with the
    default per-plane groups: the codes plus 8 bytes per (sample, channel)."""
    x = torch.randn(64, 256)
    plain, quant = nn.Linear(256, 8), QuantLinear(256, 8, method=rp.Quant(bits=bits))
    with rp.track_saved(plain) as exact:
        plain(x).sum().backward()
    with rp.track_saved(quant) as saved:
        quant(x).sum().backward()
    assert exact.bytes == 64 * 256 * 4
    assert saved.bytes == 64 * 256 * bits // 8 + 64 * 8
    if bits == 2:
        assert exact.bytes / saved.bytes > 14  # 16x less, minus the per-row overhead
    conv = QuantConv2d(3, 4, 3, method=rp.Quant(bits=bits))
    with rp.track_saved(conv) as saved:
        conv(torch.randn(2, 3, 8, 8)).sum().backward()
    assert saved.bytes == 2 * 3 * 64 * bits // 8 + 2 * 3 * 8
    frozen = QuantLinear(256, 8, method=rp.Quant(bits=bits)).requires_grad_(False)
    with rp.track_saved(frozen) as saved:
        frozen(x.requires_grad_()).sum().backward()
    assert saved.bytes == 0 and frozen.rp_step == 0  # the plain layer: nothing drawn or stored


def test_functional_forms_are_F_linear_and_F_conv():
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    out = rpf.quant_linear(x, w, method="quant:bits=4", seed=3)
    torch.testing.assert_close(out, F.linear(x, w))
    again = rpf.quant_linear(x, w, method="quant:bits=4", seed=3)
    other = rpf.quant_linear(x, w, method="quant:bits=4", seed=4)
    grads = [torch.autograd.grad(o.sum(), w)[0] for o in (out, again, other)]
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])
    xc = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    wc = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    for form in (rpf.quant_conv, rpf.quant_conv2d):
        out = form(xc, wc, None, 2, "valid", 1, 1, method=rp.Quant(), seed=1)
        torch.testing.assert_close(out, F.conv2d(xc, wc, None, 2, "valid"))
