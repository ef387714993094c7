"""RAD through time: exact forward and state gradients, unbiased weight gradients, memory."""

import copy
import re

import pytest
import torch
from stat_checks import assert_unbiased
from torch import nn

import randprop as rp
from randprop.methods.rad import RADLSTM, RADRNN
from randprop.models import build_model

MODES = [
    rp.RAD(keep=0.3),
    rp.RAD(keep=0.3, same_sample=True),
    rp.RAD(keep=0.3, mode="project"),
]
MODE_IDS = ["sample", "sample-same", "project"]


def layer_cases():
    """(module, input shape, initial state shapes or None)."""
    yield nn.RNN(4, 6, nonlinearity="relu"), (5, 3, 4), None
    yield nn.RNN(4, 6, nonlinearity="relu", num_layers=2, batch_first=True), (3, 5, 4), [(2, 3, 6)]
    yield nn.RNN(4, 5, nonlinearity="relu", bias=False), (4, 4), [(1, 5)]
    yield nn.LSTM(4, 6), (5, 3, 4), None
    yield nn.LSTM(4, 5, num_layers=2, batch_first=True), (3, 4, 4), [(2, 3, 5), (2, 3, 5)]
    yield nn.RNNCell(4, 6, nonlinearity="relu"), (3, 4), [(3, 6)]
    yield nn.LSTMCell(4, 6), (3, 4), [(3, 6), (3, 6)]


CASES = list(layer_cases())
CASE_IDS = [f"{type(m).__name__}-{i}" for i, (m, _, _) in enumerate(CASES)]


def flat(out) -> torch.Tensor:
    if isinstance(out, tuple):
        return torch.cat([flat(o) for o in out])
    return out.reshape(-1)


def run(module, x, states, upstream):
    """Forward + backward of sum(upstream * outputs): (outputs, input/state grads, param grads)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    states = None if states is None else [s.detach().requires_grad_() for s in states]
    if states is None:
        out = module(x)
    else:
        out = module(x, states[0] if len(states) == 1 else tuple(states))
    out = flat(out)
    (out * upstream[: out.numel()]).sum().backward()
    inputs = [x.grad] + ([] if states is None else [s.grad for s in states])
    params = {n: p.grad.clone() for n, p in module.named_parameters()}
    return out.detach(), inputs, params


def make_case(module, shape, state_shapes, cfg):
    plain = copy.deepcopy(module).double()
    rad = copy.deepcopy(plain)
    report = rp.convert(rad, cfg, seed=3)
    assert report.converted == [""]
    x = torch.randn(shape, dtype=torch.float64)
    states = None
    if state_shapes is not None:
        states = [torch.randn(s, dtype=torch.float64) for s in state_shapes]
    upstream = torch.randn(10_000, dtype=torch.float64)
    return plain, rad, x, states, upstream


@pytest.mark.parametrize("cfg", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("module, shape, state_shapes", CASES, ids=CASE_IDS)
def test_forward_and_state_gradients_exact(module, shape, state_shapes, cfg):
    plain, rad, x, states, upstream = make_case(module, shape, state_shapes, cfg)
    out, inputs, params = run(plain, x, states, upstream)
    out_r, inputs_r, params_r = run(rad, x, states, upstream)
    torch.testing.assert_close(out_r, out, rtol=1e-12, atol=1e-12)
    for g_r, g in zip(inputs_r, inputs, strict=True):
        torch.testing.assert_close(g_r, g, rtol=1e-10, atol=1e-12)
    for name, g in params.items():
        if name.startswith("bias"):
            torch.testing.assert_close(params_r[name], g, rtol=1e-10, atol=1e-12)
        else:
            assert params_r[name].shape == g.shape


@pytest.mark.parametrize("module, shape, state_shapes", CASES, ids=CASE_IDS)
def test_keep_one_is_exact(module, shape, state_shapes):
    plain, rad, x, states, upstream = make_case(module, shape, state_shapes, rp.RAD(keep=1.0))
    _, _, params = run(plain, x, states, upstream)
    _, _, params_r = run(rad, x, states, upstream)
    for name, g in params.items():
        torch.testing.assert_close(params_r[name], g, rtol=1e-10, atol=1e-12)


UNBIASED_CASES = [CASES[1], CASES[4], CASES[5]]


@pytest.mark.parametrize("cfg", MODES, ids=MODE_IDS)
@pytest.mark.parametrize(
    "module, shape, state_shapes", UNBIASED_CASES, ids=["RNN-2layer", "LSTM-2layer", "RNNCell"]
)
def test_weight_gradients_unbiased(module, shape, state_shapes, cfg):
    plain, rad, x, states, upstream = make_case(module, shape, state_shapes, cfg)
    _, _, exact = run(plain, x, states, upstream)
    draws = {n: [] for n in exact if n.startswith("weight")}
    for _ in range(300):  # each call advances the layer's seed stream: independent draws
        _, _, params = run(rad, x, states, upstream)
        for n in draws:
            draws[n].append(params[n])
    for n, samples in draws.items():
        assert_unbiased(torch.stack(samples), exact[n])


def test_biased_estimate_is_detected():
    """The check has power: the same draws (relative error ~1.7 each) shifted by 0.25 * exact
    are rejected."""
    module, shape, state_shapes = CASES[1]
    plain, rad, x, states, upstream = make_case(module, shape, state_shapes, MODES[0])
    exact = run(plain, x, states, upstream)[2]["weight_hh_l0"]
    samples = torch.stack([run(rad, x, states, upstream)[2]["weight_hh_l0"] for _ in range(300)])
    with pytest.raises(AssertionError):
        assert_unbiased(samples + 0.25 * exact, exact)


def test_seeded_draws_repeat_and_differ():
    module, shape, state_shapes = CASES[0]
    _, rad, x, states, upstream = make_case(module, shape, state_shapes, MODES[0])
    first = run(rad, x, states, upstream)[2]["weight_hh_l0"]
    second = run(rad, x, states, upstream)[2]["weight_hh_l0"]
    rad.rp_step = 0
    again = run(rad, x, states, upstream)[2]["weight_hh_l0"]
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_unsupported_settings_are_skipped():
    model = nn.ModuleDict(
        {
            "tanh": nn.RNN(3, 4),
            "bi": nn.RNN(3, 4, nonlinearity="relu", bidirectional=True),
            "drop": nn.LSTM(3, 4, num_layers=2, dropout=0.5),
            "proj": nn.LSTM(3, 4, proj_size=2),
            "ok": nn.RNN(3, 4, nonlinearity="relu"),
        }
    )
    report = rp.convert(model, "rad:keep=0.5")
    assert report.converted == ["ok"]
    assert "relu" in report.skipped["tanh"]
    assert "bidirectional" in report.skipped["bi"]
    assert "dropout" in report.skipped["drop"]
    assert "proj_size" in report.skipped["proj"]
    assert type(model["tanh"]) is nn.RNN
    assert isinstance(model["ok"], RADRNN)
    with pytest.raises(TypeError, match="PackedSequence"):
        seq = nn.utils.rnn.pack_sequence([torch.randn(3, 3)])
        model["ok"](seq)


def test_hidden_sequence_is_not_stored():
    """Saved bytes: sketches (a fraction p of inputs and hidden states) plus 1-bit masks."""
    steps, batch, n, hidden, keep = 28, 150, 28, 100, 0.1
    x = torch.randn(batch, steps, n)
    model = build_model("irnn")
    exact = rp.track_saved()
    with exact:
        model(x).sum()
    rp.convert(model, rp.RAD(keep=keep))
    with rp.track_saved(model) as saved:
        model(x).sum().backward()
    assert isinstance(model.rnn, RADRNN)
    hidden_sequence = steps * batch * hidden * 4
    expected = steps * batch * (keep * (n + hidden) * 4 + hidden / 8)
    assert saved.by_module["rnn"] < 1.15 * expected < hidden_sequence / 5
    assert saved.bytes < exact.bytes / 5


def test_irnn_model_initialisation_and_shapes():
    model = build_model("irnn")
    assert torch.equal(model.rnn.weight_hh_l0, torch.eye(100))
    assert model.rnn.bias_hh_l0.abs().max() == 0
    assert model(torch.randn(2, 28, 28)).shape == (2, 10)
    pixels = build_model("irnn", pixels=True)
    assert pixels(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    lstm = build_model("lstm")
    rp.convert(lstm, "rad:keep=0.2")
    assert isinstance(lstm.rnn, RADLSTM)
    assert lstm(torch.randn(2, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("module, shape, state_shapes", CASES, ids=CASE_IDS)
def test_no_grad_runs_the_plain_layer(module, shape, state_shapes):
    plain, rad, x, states, upstream = make_case(module, shape, state_shapes, MODES[0])
    with torch.no_grad():
        expected = flat(plain(x))
        assert torch.equal(flat(rad(x)), expected)
    for p in rad.parameters():
        p.requires_grad_(False)
    # PyTorch's own RNN differs by an ulp between grad modes
    torch.testing.assert_close(flat(rad(x)), expected, rtol=1e-14, atol=1e-15)
    assert rad.rp_step == 0  # no seed drawn


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
@pytest.mark.parametrize("shape", [(0, 3, 4), (5, 0, 4)])
def test_empty_sequences_behave_as_the_plain_layer(kind, shape):
    """Length 0 raises PyTorch's own error; batch 0 gives the plain layer's empty output."""
    plain = nn.RNN(4, 6, nonlinearity="relu") if kind == "rnn" else nn.LSTM(4, 6)
    layer = copy.deepcopy(plain)
    rp.convert(layer, rp.RAD(keep=0.5))
    x = torch.randn(shape, requires_grad=True)
    try:
        expected = plain(x)[0]
    except RuntimeError as err:
        with pytest.raises(RuntimeError, match=re.escape(str(err).split("\n")[0][:40])):
            layer(x)
        return
    torch.testing.assert_close(layer(x)[0], expected)
