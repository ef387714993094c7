"""`randprop memory`: bytes saved for backward by module and by op, for a built-in model and
for a user's package.module:function."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from randprop.cli import main
from randprop.measure.saved import saved_by_op, track_saved


def tiny_model():
    """(model, batch): model(*batch) returns the loss."""
    torch.manual_seed(0)

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))

        def forward(self, x, y):
            return F.cross_entropy(self.net(x), y)

    return WithLoss(), (torch.randn(16, 8), torch.randint(0, 4, (16,)))


def tiny_model_with_loss_fn():
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    return model, torch.randn(16, 8), lambda m, x: m(x).square().mean()


def not_a_pair():
    return nn.Linear(2, 2)


def run_json(capsys, *argv):
    assert main(["memory", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_memory_of_a_user_function_by_module_and_op(capsys):
    result = run_json(capsys, "--model", f"{__name__}:tiny_model", "--method", "rad:keep=0.1")
    exact, method = result["by_op"]["exact"], result["by_op"]["method"]
    # exact: the two Linear inputs (16 x 8, and the Tanh output 16 x 32, which Tanh also saves:
    # one storage, counted once, for the op met first from the loss) and the loss's tensors
    assert exact["Addmm"] == (16 * 8 + 16 * 32) * 4 and "Tanh" not in exact
    assert "_RADLinearFn" in method and "Addmm" not in method
    assert set(result["by_module"]["exact"]) >= {"net.0", "net.1"}
    assert sum(exact.values()) >= result["exact_bytes"]  # no backward ran in between
    assert result["method_bytes"] < result["exact_bytes"]


def test_memory_of_a_user_function_with_loss_fn_and_by_choice(capsys):
    spec = f"{__name__}:tiny_model_with_loss_fn"
    result = run_json(capsys, "--model", spec, "--by", "op")
    assert "by_op" in result and "by_module" not in result
    assert result["by_op"]["exact"]["Addmm"] == (16 * 8 + 16 * 32) * 4


def test_memory_of_a_builtin_model_by_op(capsys):
    result = run_json(capsys, "--model", "mlp", "--batch", "4", "--by", "both")
    assert result["batch"] == 4 and result["by_module"]["exact"]
    assert result["by_op"]["exact"]["Addmm"] > 0 and result["ratio"] > 1
    assert main(["memory", "--model", "mlp", "--batch", "4"]) == 0
    printed = capsys.readouterr().out
    assert "Addmm" in printed and "most at once" in printed


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_model", "unknown model 'no_such_model'"),
        ("no_such_pkg.mod:fn", "cannot import"),
        (f"{__name__}:missing", "has no function"),
        (f"{__name__}:not_a_pair", "returned Linear"),
        (f"{__name__}:", "package.module:function"),
    ],
)
def test_bad_model_spec_is_a_clear_error(capsys, spec, message):
    assert main(["memory", "--model", spec]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and message in err


def test_saved_by_op_sums_to_what_track_saved_counts():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    with track_saved(model) as saved:
        loss = F.cross_entropy(model(x), torch.zeros(5, dtype=torch.long))
    by_op = saved_by_op(loss, model)
    assert sum(by_op.values()) == saved.total
    assert by_op["Gelu"] == 5 * 16 * 4 and by_op["Addmm"] == (5 * 8 + 5 * 16) * 4
