"""Layers built like torch.nn ones (torch signature + method / seed / name), from_module, and
functional forms with the signatures of F.linear and F.conv1d/2d/3d."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from stat_checks import assert_unbiased
from torch import nn

import randprop as rp
from randprop import functional as rpf
from randprop.config import METHODS
from randprop.methods.base import RandomizedLayer, torch_class
from randprop.methods.masks import MASKED
from randprop.methods.projections import Conv1DLayer, MultiheadAttentionLayer
from randprop.methods.rad import RADLSTM, RADRNN, RADConv2d, RADLinear
from randprop.random import name_id

#: torch layer type -> (constructor args, kwargs, input shape)
RECIPES = {
    nn.Linear: ((5, 4), {}, (3, 5)),
    nn.Conv1d: ((3, 4, 3), {"padding": 1}, (2, 3, 8)),
    nn.Conv2d: ((3, 4, 3), {"stride": 2, "padding": "valid", "bias": False}, (2, 3, 7, 7)),
    nn.Conv3d: ((2, 3, 2), {"padding": "same", "dilation": 1}, (2, 2, 4, 4, 4)),
    nn.RNN: ((4, 5), {"nonlinearity": "relu", "num_layers": 2}, (6, 2, 4)),
    nn.LSTM: ((4, 5), {"batch_first": True}, (2, 6, 4)),
    nn.RNNCell: ((4, 5), {"nonlinearity": "relu"}, (2, 4)),
    nn.LSTMCell: ((4, 5), {}, (2, 4)),
    nn.ReLU: ((), {}, (3, 5)),
    nn.LeakyReLU: ((0.2,), {}, (3, 5)),
    nn.MaxPool1d: ((2,), {}, (2, 3, 8)),
    nn.MaxPool2d: ((2,), {"stride": 1}, (2, 3, 6, 6)),
    nn.MaxPool3d: ((2,), {}, (1, 2, 4, 4, 4)),
    nn.AvgPool1d: ((2,), {}, (2, 3, 8)),
    nn.AvgPool2d: ((3,), {"padding": 1}, (2, 3, 6, 6)),
    nn.AvgPool3d: ((2,), {}, (1, 2, 4, 4, 4)),
    # p = 0: the torch class's output, to compare with (the masks are drawn differently)
    nn.Dropout: ((0.0,), {}, (3, 5)),
    nn.Dropout1d: ((0.0,), {}, (2, 3, 8)),
    nn.Dropout2d: ((0.0,), {}, (2, 3, 6, 6)),
    nn.Dropout3d: ((0.0,), {}, (1, 2, 4, 4, 4)),
}
#: mixins for transformers' Conv1D and MultiheadAttention's projections, not built on their own
PROJECTIONS = (Conv1DLayer, MultiheadAttentionLayer)
#: a method string per config class (an input-exact setting where the method has one)
METHOD_TEXT = {
    rp.RAD: "rad:keep=0.5",
    rp.Trace: "trace:probes=4",
    rp.SparseVJP: "vjp:density=0.5",
    rp.AOP: "aop:keep=0.5",
    rp.CRS: "crs:keep=0.5",
    rp.Quant: "quant:bits=2",
}
LAYERS = sorted(
    {
        (cls, cfg)
        for cfg in set(METHODS.values())
        for cls in cfg.layer_types.values()
        if cfg in METHOD_TEXT and not issubclass(cls, PROJECTIONS)  # test_projections.py
    }
    | {(cls, None) for cls in MASKED.values()},
    key=lambda pair: pair[0].__name__,
)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize(("cls", "cfg"), LAYERS, ids=lambda v: getattr(v, "__name__", ""))
def test_every_layer_class_builds_with_its_torch_signature(cls, cfg):
    base = torch_class(cls)
    args, kwargs, shape = RECIPES[base]
    torch.manual_seed(0)
    extra = {} if cfg is None else {"method": METHOD_TEXT[cfg], "seed": 3, "name": "block.fc"}
    layer = cls(*args, **kwargs, **extra)
    plain = base(*args, **kwargs)
    plain.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == set(plain.state_dict())
    if cfg is not None:
        assert layer.rp_method == rp.parse_method(METHOD_TEXT[cfg])
        assert (layer.rp_seed, layer.rp_layer, layer.rp_step) == (3, name_id("block.fc"), 0)
        assert f"method={layer.rp_method}" in repr(layer)
    else:
        repr(layer)
    x = torch.randn(shape, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    out, expected = _first(layer(x)), _first(plain(x_plain))
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    if cfg is not rp.SparseVJP:  # every other method keeps the input gradient exact
        torch.testing.assert_close(x.grad, x_plain.grad)
    for (name, p), q in zip(layer.named_parameters(), plain.parameters(), strict=True):
        assert p.grad is not None and p.grad.isfinite().all(), name
        assert (p.grad == 0).all() == (q.grad == 0).all(), name  # zero only where exact is
    if cfg is not None:
        assert layer.rp_step == 1  # one estimating call drew one seed
    # rp.restore gives a plain layer back, as for a converted one
    model = nn.Sequential(layer)
    assert rp.restore(model) == ["0"] and type(model[0]) is base


def test_default_method_and_the_layer_converts_nothing_twice():
    layer = RADLinear(4, 3)
    assert layer.rp_method == rp.RAD() and "method=rad:keep=0.1" in repr(layer)
    report = rp.convert(nn.Sequential(layer), "rad")
    assert report.skipped == {"0": "already converted"}


def test_a_built_layer_draws_what_a_converted_one_draws():
    torch.manual_seed(1)
    built = RADConv2d(3, 4, 3, padding=1, method="rad:keep=0.3", seed=5, name="conv")
    model = nn.Sequential(collections.OrderedDict(conv=nn.Conv2d(3, 4, 3, padding=1)))
    model.conv.load_state_dict(built.state_dict())
    rp.convert(model, rp.RAD(keep=0.3), seed=5)
    x = torch.randn(2, 3, 6, 6)
    built(x).square().sum().backward()
    model(x).square().sum().backward()
    assert torch.equal(built.weight.grad, model.conv.weight.grad)
    other = RADConv2d(3, 4, 3, padding=1, method="rad:keep=0.3", seed=5, name="other")
    other.load_state_dict(built.state_dict())
    other(x).square().sum().backward()
    assert not torch.equal(other.weight.grad, built.weight.grad)  # the name sets the stream


def test_from_module_shares_parameters_and_leaves_the_module_as_it_was():
    linear = nn.Linear(5, 4)
    layer = RADLinear.from_module(linear, "rad:keep=0.5", seed=7, name="fc")
    assert type(linear) is nn.Linear and not hasattr(linear, "rp_method")
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert (layer.rp_method, layer.rp_seed, layer.rp_layer) == (rp.RAD(keep=0.5), 7, name_id("fc"))
    assert "method=rad:keep=0.5" in repr(layer)
    model = nn.Sequential(collections.OrderedDict(fc=copy.deepcopy(linear)))
    rp.convert(model, "rad:keep=0.5", seed=7)
    assert repr(model.fc) == repr(layer)
    x = torch.randn(6, 5)
    layer(x).sum().backward()
    model(x).sum().backward()
    assert torch.equal(linear.weight.grad, model.fc.weight.grad)  # the shared parameter's
    # state buffers of the new layer stay its own
    aop = rp.methods.aop.AOPLinear.from_module(linear, rp.AOP(k=2))
    aop(x).sum().backward()
    assert "aop_memory_x" in dict(aop.named_buffers()) and not list(linear.buffers())
    lstm = nn.LSTM(3, 4)
    rad_lstm = RADLSTM.from_module(lstm, "rad")
    assert [p for p in rad_lstm.parameters()] == list(lstm.parameters())
    pool = rp.methods.pooling.CompactMaxPool2d.from_module(nn.MaxPool2d(2))
    assert pool.kernel_size == 2 and type(pool).__name__ == "CompactMaxPool2d"


def test_from_module_and_constructors_refuse_bad_input():
    with pytest.raises(TypeError, match=r"RADLinear: method must be a RAD config .*got trace"):
        RADLinear(4, 3, method=rp.Trace())
    with pytest.raises(TypeError, match="RADLinear: method must be a RAD config"):
        RADLinear.from_module(nn.Linear(4, 3), "crs")
    with pytest.raises(ValueError, match="unknown method 'nonsense'"):
        RADLinear(4, 3, method="nonsense")
    with pytest.raises(TypeError, match="seed must be an int"):
        RADLinear(4, 3, seed=1.5)
    with pytest.raises(TypeError, match="from_module takes a Linear; got Conv2d"):
        RADLinear.from_module(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="from_module takes a Linear; got RADLinear"):
        RADLinear.from_module(RADLinear(2, 2))
    with pytest.raises(ValueError, match="RADRNN: RAD through time needs nonlinearity='relu'"):
        RADRNN(3, 4)  # torch's default is tanh
    with pytest.raises(ValueError, match="needs nonlinearity='relu'"):
        RADRNN.from_module(nn.RNN(3, 4))

    class Unregistered(RandomizedLayer, nn.Linear):
        pass

    with pytest.raises(TypeError, match="Unregistered is not registered with any method"):
        Unregistered(2, 2)


# --- functional forms ------------------------------------------------------------------------

CONV_ARGS = [  # (input shape, weight shape, stride, padding, dilation, groups)
    ((2, 4, 9), (6, 2, 3), 2, 1, 1, 2),
    ((4, 9), (6, 4, 2), 1, "same", 1, 1),  # unbatched; even kernel: one zero column more
    ((2, 3, 7, 6), (4, 3, 3, 2), (2, 1), (1, 0), (1, 2), 1),
    ((2, 3, 7, 6), (4, 3, 2, 3), 1, "same", (2, 1), 1),
    ((2, 3, 7, 6), (6, 1, 3, 3), 1, "valid", 1, 3),
    ((3, 7, 6), (4, 3, 3, 3), 1, "same", 1, 1),
    ((1, 2, 5, 4, 6), (3, 2, 2, 2, 3), 1, "same", (1, 2, 1), 1),
    ((1, 2, 5, 4, 6), (3, 2, 2, 2, 3), 2, 1, 1, 1),
]
TORCH_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
CONV_FORMS = {
    "rad": (rpf.rad_conv1d, rpf.rad_conv2d, rpf.rad_conv3d, "rad:keep=1.0"),
    "trace": (rpf.trace_conv1d, rpf.trace_conv2d, rpf.trace_conv3d, "trace:probes=3"),
    "vjp": (rpf.vjp_conv1d, rpf.vjp_conv2d, rpf.vjp_conv3d, "vjp:density=1.0"),
    "quant": (rpf.quant_conv1d, rpf.quant_conv2d, rpf.quant_conv3d, "quant:bits=2"),
}


def _conv_case(case, dtype=torch.float64):
    x_shape, w_shape, stride, padding, dilation, groups = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, dtype=dtype, generator=gen, requires_grad=True)
    w = torch.randn(w_shape, dtype=dtype, generator=gen, requires_grad=True)
    b = torch.randn(w_shape[0], dtype=dtype, generator=gen, requires_grad=True)
    return x, w, b, (stride, padding, dilation, groups)


@pytest.mark.parametrize("method", CONV_FORMS)
@pytest.mark.parametrize("case", CONV_ARGS, ids=lambda c: f"{c[0]}-{c[3]}")
def test_functional_convolutions_are_F_conv(method, case):
    """Forward, input and bias gradients equal F.conv*d's for int, tuple, 'same' and 'valid'
    arguments; the weight gradient too where the setting is exact (rad keep=1, vjp density=1)."""
    *forms, text = CONV_FORMS[method]
    x, w, b, args = _conv_case(case)
    form = forms[w.dim() - 3]
    out = form(x, w, b, *args, method=text, seed=4)
    generic = getattr(rpf, f"{method}_conv")(x, w, b, *args, method=rp.parse_method(text), seed=4)
    expected = TORCH_CONV[w.dim()](x, w, b, *args)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(generic, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), upstream)
    exact = torch.autograd.grad(expected, (x, w, b), upstream)
    torch.testing.assert_close(got[0], exact[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[2], exact[2], rtol=1e-10, atol=1e-10)
    if method not in ("trace", "quant"):
        torch.testing.assert_close(got[1], exact[1], rtol=1e-10, atol=1e-10)
    else:
        assert not torch.allclose(got[1], exact[1])  # the estimate is random


def test_same_padding_with_an_odd_total_is_unbiased():
    """'same' with an even kernel pads one zero column more by F.pad: the sketch of that padded
    input still gives an unbiased weight gradient (positive control: a biased scale fails)."""
    x, w, b, args = _conv_case(CONV_ARGS[3])
    x, b = x.detach(), b.detach()
    upstream = torch.randn_like(F.conv2d(x, w, b, *args))
    (exact,) = torch.autograd.grad(F.conv2d(x, w, b, *args), w, upstream)
    draws = torch.stack(
        [
            torch.autograd.grad(
                rpf.rad_conv2d(x, w, b, *args, method="rad:keep=0.3", seed=s), w, upstream
            )[0]
            for s in range(300)
        ]
    )
    assert_unbiased(draws, exact)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(draws * 1.1, exact)


@pytest.mark.parametrize(
    "form", [rpf.rad_conv2d, rpf.trace_conv2d, rpf.vjp_conv2d, rpf.quant_conv2d]
)
def test_functional_convolutions_raise_what_F_conv2d_raises(form):
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    for kwargs in ({"padding": "full"}, {"padding": "same", "stride": 2}):
        with pytest.raises((RuntimeError, ValueError)) as expected:
            F.conv2d(x, w, **kwargs)
        with pytest.raises(type(expected.value), match=str(expected.value)[:30]):
            form(x, w, **kwargs)
    with pytest.raises(RuntimeError):
        form(torch.randn(1, 3, 6), torch.randn(4, 3, 3))  # conv2d with a 1d weight


LINEAR_FORMS = [
    (rpf.rad_linear, "rad:keep=0.5", {}),
    (rpf.vjp_linear, "vjp:density=1.0", {}),
    (rpf.crs_linear, "crs:keep=0.5", {}),
    (rpf.crs_linear, "crs:keep=0.5", {"state": rp.CRSState()}),
    (rpf.aop_linear, "aop:k=2,memory=off", {}),
    (rpf.aop_linear, "aop:k=2", {"memory": rp.AOPMemory()}),
    (rpf.quant_linear, "quant:bits=4", {}),
]


@pytest.mark.parametrize(("form", "text", "holder"), LINEAR_FORMS, ids=lambda v: str(v)[:20])
def test_functional_linears_take_strings_and_are_F_linear(form, text, holder):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    out = form(x, w, b, method=text, seed=2, **holder)
    expected = F.linear(x, w, b)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), upstream)
    exact = torch.autograd.grad(expected, (x, w, b), upstream)
    torch.testing.assert_close(got[0], exact[0])
    torch.testing.assert_close(got[2], exact[2])
    assert got[1].shape == w.shape
    assert form(x, w, method=text, **holder).shape == out.shape  # bias optional, as F.linear's


@pytest.mark.parametrize(
    "call",
    [
        lambda x, w: rpf.rad_linear(x, w, method="trace"),
        lambda x, w: rpf.vjp_linear(x, w, method=rp.RAD()),
        lambda x, w: rpf.crs_linear(x, w, method="aop"),
        lambda x, w: rpf.aop_linear(x, w, method="crs"),
        lambda x, w: rpf.quant_linear(x, w, method="rad"),
        lambda x, w: rpf.quant_conv2d(x.view(1, 1, 4, 6), w.view(5, 1, 2, 3), method="trace"),
        lambda x, w: rpf.rad_conv2d(x.view(1, 1, 4, 6), w.view(5, 1, 2, 3), method="vjp"),
        lambda x, w: rpf.trace_conv2d(x.view(1, 1, 4, 6), w.view(5, 1, 2, 3), method="rad"),
        lambda x, w: rpf.vjp_conv2d(x.view(1, 1, 4, 6), w.view(5, 1, 2, 3), method="crs"),
        lambda x, w: rpf.sparse_vjp(x, "rad", 0),
        lambda x, w: rpf.rad_relu_rnn(x.view(4, 1, 6), None, w, w[:, :5], None, None, method="crs"),
    ],
)
def test_functional_forms_refuse_another_methods_config(call):
    x, w = torch.randn(4, 6), torch.randn(5, 6, requires_grad=True)
    with pytest.raises(TypeError, match="method must be a .* config or its string form"):
        call(x, w)


def test_recurrent_functional_forms_take_strings():
    x, w_ih, w_hh = torch.randn(5, 2, 3), torch.randn(4, 3), torch.randn(4, 4)
    out = rpf.rad_relu_rnn(x, None, w_ih, w_hh, None, None, method="rad:keep=0.5", seed=1)
    torch.testing.assert_close(out, nn.functional.relu(out))
    w4 = torch.randn(16, 3), torch.randn(16, 4)
    out, c = rpf.rad_lstm(x, None, None, *w4, None, None, method="rad", seed=1)
    assert out.shape == (5, 2, 4) and c.shape == (2, 4)
