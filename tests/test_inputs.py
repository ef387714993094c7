"""Bad input gets a clear error naming the argument; edge shapes work as the plain layer does.

Edge shapes (batch 0, 0 features or channels, unbatched input) through every method x layer kind:
the output equals plain PyTorch's, and where the input or weight is empty every gradient equals
plain autograd's (the weight gradient is then empty or exactly zero: nothing to estimate). An
unbatched input gives the same gradients as the same layer, same seed, on a batch of one.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import randprop as rp
from randprop.methods.vjp import sparse_vjp

# --- bad input -> exception naming the argument ---------------------------------------------


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _bad_aop_k():
    layer = nn.Linear(3, 2)
    rp.convert(layer, rp.AOP(k=8, memory="off"))
    layer(torch.randn(4, 3)).sum().backward()


BAD_INPUTS = {
    "parse-repeated-key": (
        lambda: rp.parse_method("rad:keep=0.1,keep=0.2"),
        ValueError,
        "option 'keep' given more than once",
    ),
    "parse-repeated-key-spaces": (
        lambda: rp.parse_method("aop: k=2, policy=topk, k=3"),
        ValueError,
        "option 'k' given more than once",
    ),
    "convert-model": (lambda: rp.convert([nn.Linear(2, 2)], "rad"), TypeError, "model must be"),
    "convert-filter-not-callable": (
        lambda: rp.convert(_model(), "rad", module_filter_fn="0"),
        TypeError,
        "module_filter_fn must be a callable",
    ),
    "convert-target-not-iterable": (
        lambda: rp.convert(_model(), "rad", target_modules=3),
        TypeError,
        "target_modules must be a string or a list of strings",
    ),
    "convert-target-entry": (
        lambda: rp.convert(_model(), "rad", target_modules=["0", 2]),
        TypeError,
        "target_modules entries must be strings",
    ),
    "convert-seed-float": (
        lambda: rp.convert(_model(), "rad", seed=1.5),
        TypeError,
        "seed must be an int; got float",
    ),
    "convert-seed-str": (
        lambda: rp.convert(_model(), "rad", seed="1"),
        TypeError,
        "seed must be an int; got str",
    ),
    "convert-seed-bool": (
        lambda: rp.convert(_model(), "rad", seed=True),
        TypeError,
        "seed must be an int; got bool",
    ),
    "convert-activation-masks": (
        lambda: rp.convert(_model(), "rad", activation_masks="no"),
        TypeError,
        "activation_masks must be True or False",
    ),
    "convert-activation-masks-int": (
        lambda: rp.convert(_model(), "rad", activation_masks=0),
        TypeError,
        "activation_masks must be True or False",
    ),
    "restore-model": (lambda: rp.restore("model"), TypeError, "model must be an nn.Module"),
    "fa-model": (lambda: rp.rules.FA([nn.Linear(2, 2)]), TypeError, "FA: model must be"),
    "fa-loss-fn": (lambda: rp.rules.FA(_model(), loss_fn=1), TypeError, "FA: loss_fn must be"),
    "dfa-model": (lambda: rp.rules.DFA(None), TypeError, "DFA: model must be"),
    "dfa-loss-fn": (lambda: rp.rules.DFA(_model(), loss_fn=1), TypeError, "DFA: loss_fn must"),
    "memdfa-model": (
        lambda: rp.rules.MemDFA("model", nn.functional.mse_loss),
        TypeError,
        "MemDFA: model must be",
    ),
    "memdfa-loss-fn": (
        lambda: rp.rules.MemDFA(_model(), None),
        TypeError,
        "MemDFA: loss_fn must be callable",
    ),
    "aop-k-above-rows": (_bad_aop_k, ValueError, "k=8 exceeds the 4 rows"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_refused_with_a_message_naming_the_argument(case):
    call, error, fragment = BAD_INPUTS[case]
    with pytest.raises(error, match=fragment):
        call()


def test_a_refused_convert_leaves_the_model_alone():
    model = _model()
    with pytest.raises(TypeError):
        rp.convert(model, "rad", seed=0.5)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.ReLU


def test_target_modules_as_one_string_is_one_pattern():
    def model():
        return nn.Sequential(OrderedDict((name, nn.Linear(2, 2)) for name in ("ab", "a", "b")))

    report = rp.convert(model(), "rad", target_modules="ab")
    assert report.converted == ["ab"]  # not "a" and "b", as iterating the characters would give
    assert rp.convert(model(), "rad", target_modules=("a*",)).converted == ["ab", "a"]
    assert rp.convert(model(), "rad", target_modules=["b", "a"]).converted == ["a", "b"]


@pytest.mark.parametrize("seed", [np.int64(7), torch.tensor(7), 7])
def test_integer_like_seeds_are_accepted_as_ints(seed):
    model = _model()
    rp.convert(model, "rad", seed=seed)
    assert type(model[0].rp_seed) is int and model[0].rp_seed == 7
    model(torch.randn(2, 3)).sum().backward()


# --- a converted convolution given an input of the wrong rank: plain PyTorch's error -----------

CONV_METHODS = [rp.RAD(), rp.Trace(probes=2), rp.SparseVJP(structure="row")]
CONVS = {
    1: lambda **kw: nn.Conv1d(2, 3, 3, **kw),
    2: lambda **kw: nn.Conv2d(2, 3, 3, **kw),
    3: lambda **kw: nn.Conv3d(2, 3, 3, **kw),
}


@pytest.mark.parametrize("method", CONV_METHODS, ids=str)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("rank_offset", [-2, 1])  # e.g. 2-D and 5-D input to a Conv2d
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_wrong_input_rank_gives_plain_pytorchs_error(method, dims, rank_offset, padding_mode):
    plain = CONVS[dims](padding=1, padding_mode=padding_mode)
    converted = copy.deepcopy(plain)
    rp.convert(converted, method)
    x = torch.randn((2,) * (dims + 2 + rank_offset), requires_grad=True)
    with pytest.raises(Exception) as expected:
        plain(x)
    with pytest.raises(type(expected.value)) as got:
        converted(x)
    assert str(got.value) == str(expected.value)
    if padding_mode == "zeros":
        assert f"input to conv{dims}d, but got input of size" in str(got.value)
    assert converted.rp_step == 0  # refused before any seed is drawn


# --- edge shapes: every method x layer kind equals the plain layer ----------------------------

METHODS = {
    "rad-sample": rp.RAD(keep=0.5),
    "rad-same": rp.RAD(keep=0.5, same_sample=True),
    "rad-project": rp.RAD(keep=0.5, mode="project"),
    "rad-project-same": rp.RAD(keep=0.5, mode="project", same_sample=True),
    "trace-multi": rp.Trace(probes=2),
    "trace-independent": rp.Trace(probes=2, channels="independent", probe="orthogonal"),
    **{
        f"vjp-{sk}-{st}": rp.SparseVJP(density=0.5, sketch=sk, structure=st)
        for sk, st in [
            ("uniform", "element"),
            ("optimal", "element"),
            ("uniform", "row"),
            ("optimal", "row"),
            ("lowrank", "row"),
            ("gaussian", "row"),
            ("uniform", "column"),
            ("optimal", "column"),
            ("lowrank", "column"),
        ]
    },
    "vjp-optimal-row-budget": rp.SparseVJP(density=0.5, sketch="optimal", budget="row"),
    "crs": rp.CRS(keep=0.5),
    "aop-off": rp.AOP(keep=0.5, memory="off"),
    "aop-rows": rp.AOP(keep=0.5),
    "aop-queue-k": rp.AOP(k=1, memory="queue"),
    "aop-both": rp.AOP(k=1, memory="off", target="both"),
}

# (layer factory, input shapes): batch 0, 0 features / channels, unbatched
LAYERS = {
    "linear": (lambda: nn.Linear(3, 4), [(0, 3), (3,)]),
    "linear-0-in": (lambda: nn.Linear(0, 4), [(5, 0), (0, 0), (0,)]),
    "linear-0-out": (lambda: nn.Linear(3, 0), [(5, 3), (0, 3), (3,)]),
    "linear-3d": (lambda: nn.Linear(3, 4), [(2, 0, 3), (0, 4, 3)]),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, padding=1), [(0, 2, 5), (2, 5)]),
    "conv2d": (lambda: nn.Conv2d(2, 4, 3, padding=1, groups=2), [(0, 2, 5, 5), (2, 5, 5)]),
    "conv2d-0-in": (lambda: nn.Conv2d(0, 3, 3), [(2, 0, 5, 5), (0, 0, 5, 5), (0, 5, 5)]),
    "conv2d-reflect": (
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        [(0, 2, 5, 5), (2, 5, 5)],
    ),
    "conv2d-same": (lambda: nn.Conv2d(2, 3, 3, padding="same"), [(0, 2, 5, 5)]),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=2), [(0, 2, 4, 4, 4), (2, 4, 4, 4)]),
}

# the parts of backward each method computes exactly (then checked on unbatched input too)
EXACT_PARTS = {"rad": ("x", "bias"), "trace": ("x", "bias"), "crs": ("x", "bias"), "aop": ("bias",)}


def _run(layer: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out) / 7 - 1)
    grads = {"x": x.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op"
    warnings.simplefilter("ignore")
    CASES = [
        (m, k, shape)
        for m, cfg in METHODS.items()
        for k, (make, shapes) in LAYERS.items()
        if cfg.layer_class(type(make())) is not None
        for shape in shapes
    ]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("method, kind, shape", CASES, ids=[f"{m}-{k}-{s}" for m, k, s in CASES])
def test_edge_shapes_work_as_the_plain_layer_does(method, kind, shape):
    make, _ = LAYERS[kind]
    plain = make()
    converted = copy.deepcopy(plain)
    assert rp.convert(converted, METHODS[method]).converted == [""]
    x = torch.randn(shape)
    out, grads = _run(plain, x)
    twin = copy.deepcopy(converted)  # same seed stream, for the batch-of-one comparison
    got, got_grads = _run(converted, x)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    assert got.shape == out.shape
    for name, g in got_grads.items():
        assert g is not None and g.shape == grads[name].shape, name
    empty = x.numel() == 0 or plain.weight.numel() == 0
    unbatched = x.dim() == (plain.weight.dim() - 1 if kind.startswith("conv") else 1)
    if empty:  # nothing to estimate: every gradient is plain autograd's (weight: zero or empty)
        for name, g in got_grads.items():
            torch.testing.assert_close(g, grads[name], rtol=1e-5, atol=1e-6, msg=name)
    if unbatched:
        for part in EXACT_PARTS.get(method.split("-")[0], ()):
            torch.testing.assert_close(got_grads[part], grads[part], msg=part)
        if not empty:  # the same draw as on a batch of one
            _, one_grads = _run(twin, x.unsqueeze(0))
            for name, g in got_grads.items():
                torch.testing.assert_close(g, one_grads[name].view_as(g), msg=name)


def test_edge_case_checks_can_fail():
    """Positive control: the comparison above tells a sketched weight gradient from plain's."""
    plain = nn.Linear(3, 4)
    converted = copy.deepcopy(plain)
    rp.convert(converted, rp.RAD(keep=0.34))
    x = torch.randn(5, 3)
    _, grads = _run(plain, x)
    _, got = _run(converted, x)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got["weight"], grads["weight"])


@pytest.mark.parametrize("cfg", [v for k, v in METHODS.items() if k.startswith("vjp")], ids=str)
@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (0,)])
def test_sparse_vjp_of_an_empty_gradient_is_empty(cfg, shape):
    x = torch.randn(shape, requires_grad=True)
    channel_dim = -1 if len(shape) > 1 else 0
    sparse_vjp(x, cfg, seed=1, channel_dim=channel_dim).sum().backward()
    assert x.grad.shape == x.shape
