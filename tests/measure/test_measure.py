import gc
import json

import pytest
import torch
from torch import nn

import randprop as rp
from randprop.cli import main
from randprop.measure.peak import peak_memory, track_peak
from randprop.measure.profile import saved_for_backward
from randprop.models import build_model


def test_track_saved_counts_each_storage_once_and_excludes_parameters():
    layer = nn.Linear(10, 4)
    x = torch.randn(6, 10)
    with rp.track_saved(layer) as saved:
        out = layer(x)
        out2 = (x * 2).sum()  # mul by a python scalar saves nothing
    assert saved.bytes == x.numel() * 4 == saved.total
    assert saved.by_module == {"": x.numel() * 4}
    del out, out2


def test_track_saved_peak_falls_as_backward_frees():
    a = torch.randn(100, requires_grad=True)
    with rp.track_saved() as saved:
        b = a.exp()  # saves its output (400 bytes)
        c = b.exp()  # saves its output (400 bytes)
        c.sum().backward()
        after_backward = saved.current
        d = a.exp()  # new 400 bytes, while the first two are freed
    assert saved.bytes == 800 and saved.total == 1200 and after_backward == 0
    del d
    gc.collect()
    assert saved.current == 0


def test_by_module_attributes_to_innermost_module():
    model = build_model("mlp")
    x = torch.randn(5, 1, 28, 28)
    with rp.track_saved(model) as saved:
        model(x)
    assert saved.by_module["1"] == x.numel() * 4  # first Linear saves the flattened input
    assert saved.by_module["2"] == 5 * 300 * 4  # ReLU saves its output, reused by Linear 3
    assert "3" not in saved.by_module or saved.by_module["3"] == 0
    assert sum(saved.by_module.values()) == saved.total


def test_rad_reduces_saved_bytes_about_tenfold_on_mlp():
    model = build_model("mlp")
    x, y = torch.randn(150, 1, 28, 28), torch.randint(0, 10, (150,))
    exact = saved_for_backward(model, x, y).bytes
    rp.convert(model, rp.RAD(keep=0.1))
    rad = saved_for_backward(model, x, y).bytes
    assert exact / rad > 8


def test_diagnostics_exact_parts_and_unbiasedness():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batch = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    diag = rp.gradient_diagnostics(model, rp.RAD(keep=0.5), batch, draws=200)
    by_name = {p.name: p for p in diag.parameters}
    for bias in ("0.bias", "2.bias"):  # bias gradients are exact under RAD
        assert by_name[bias].rel_bias < 1e-6 and by_name[bias].rel_variance < 1e-10
        assert by_name[bias].cosine == pytest.approx(1.0)
    for weight in ("0.weight", "2.weight"):
        p = by_name[weight]
        assert p.rel_variance > 0 and 0 < p.cosine < 1
        assert p.rel_bias < 4 * p.rel_bias_se  # unbiased: the error of the mean is noise
    assert json.loads(diag.to_json())["draws"] == 200
    assert "0.weight" in str(diag)
    exact = rp.gradient_diagnostics(model, "exact", batch, draws=2)
    assert all(p.rel_bias < 1e-6 and p.cosine == pytest.approx(1.0) for p in exact.parameters)


def test_diagnostics_rejects_too_few_draws():
    with pytest.raises(ValueError, match="draws"):
        rp.gradient_diagnostics(
            nn.Linear(2, 2), "rad", (torch.randn(2, 2), torch.zeros(2).long()), draws=1
        )


def test_cli_memory_check_list(capsys):
    assert main(["memory", "--model", "mlp", "--method", "rad:keep=0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ratio"] > 8 and out["exact_bytes"] > out["method_bytes"]
    assert main(["check", "--model", "cnn", "--batch", "4", "--draws", "3", "--json"]) == 0
    diag = json.loads(capsys.readouterr().out)
    assert {p["name"] for p in diag["parameters"]} >= {"0.weight", "7.bias"}
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"rad", "exact"} <= set(listing["methods"]) and {"mlp", "cnn"} <= set(listing["models"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["memory", "--method", "rad:keep=0"], "keep must be"),
        (["memory", "--method", "nope"], "unknown method 'nope'"),
        (["memory", "--model", "nope"], "unknown model 'nope'; choose from"),
    ],
)
def test_cli_bad_input_gives_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("with_model", [True, False])
def test_track_saved_counts_an_input_that_requires_grad(with_model):
    layer = nn.Linear(10, 4)
    x = torch.randn(6, 10).requires_grad_()  # a leaf, as in adversarial training or a PINN
    with rp.track_saved(layer if with_model else None) as saved:
        layer(x).sum().backward()
    assert saved.total == x.numel() * 4  # the input; the weight (a parameter) is not counted


def test_track_saved_excludes_exactly_the_models_parameters_and_buffers():
    bn, x = nn.BatchNorm1d(10), torch.randn(6, 10).requires_grad_()
    stats = 2 * 10 * 4  # saved batch mean and inverse std
    with rp.track_saved(bn) as saved:
        bn(x).sum().backward()
    assert saved.total == x.numel() * 4 + stats  # running mean and var are buffers
    with rp.track_saved() as saved:  # no model: only nn.Parameter instances are known as state
        bn(x).sum().backward()
    assert saved.total == x.numel() * 4 + stats + 2 * 10 * 4


MB = 2**20


def test_track_peak_counts_a_known_allocation():
    held = torch.zeros(MB // 4)  # 1 MB held at entry
    outside = torch.zeros(8 * MB // 4)  # alive but not held: not counted (as a dataset)
    with track_peak([held]) as peak:
        a = torch.empty(4 * MB // 4)
        a.add_(1)  # in place: the same storage
        view = a[: MB // 4]  # a view: the same storage
        del a, view
        b = torch.empty(2 * MB // 4)
    assert peak.bytes == 5 * MB
    assert peak.current == 3 * MB
    del b, outside


def test_track_peak_sees_backward_and_what_autograd_saves():
    w = torch.randn(MB // 4, requires_grad=True)  # 1 MB parameter
    with track_peak([w]) as peak:
        y = w.exp()  # 1 MB output, saved for backward
        y.sum().backward()  # a 4-byte unit gradient expanded (a view), grad w (1 MB)
    assert peak.bytes == 3 * MB + 8  # w, y (saved) and w.grad at once; the loss and its grad
    with track_peak([w, w.grad]) as again:
        w.grad = None
        z = torch.empty(MB // 4)  # w.grad's storage is freed before this allocation
    assert again.bytes == 2 * MB
    del z


def test_peak_memory_reports_the_tracker_on_cpu():
    held = torch.zeros(4)
    with peak_memory("cpu", [held, torch.zeros(8)]) as peak:  # the second dies at once
        assert peak.bytes is None  # not yet measured
        torch.empty(MB // 4)
    assert peak.bytes == MB + 16
