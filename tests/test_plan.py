"""rp.plan: the planned model fits the budget as measured, beats every uniform setting at its
bytes, is monotone in the budget, is the exact knapsack optimum, and says when it cannot fit."""

from __future__ import annotations

import copy
import itertools
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import randprop as rp
from randprop.cli import main
from randprop.convert import convert
from randprop.methods.base import ConvertedLayer
from randprop.plan import CANDIDATES, _loss_of, choose, measure, uniform

SMALL = ("exact", "rad:keep=0.1", "rad:keep=0.3,mode=project", "rad:keep=0.5,bits=2",
         "quant:bits=2", "quant:bits=8")  # fmt: skip


def tiny() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
        nn.Linear(16, 5),
    )  # fmt: skip


def tiny_batch(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 2, 12), torch.randint(0, 5, (n,))


def tiny_spec():
    """For `randprop plan --model tests.test_plan:tiny_spec`: (model, batch, loss_fn)."""
    torch.manual_seed(0)
    x, y = tiny_batch()
    return tiny(), (x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1])


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model, batch = tiny(), tiny_batch()
    found = measure(
        model, _loss_of(batch, F.cross_entropy), candidates=SMALL, draws=4, checkpointing=False
    )  # the per-layer planner (tests/test_plan_checkpointing.py)
    return model, batch, found


def measured_bytes(model: nn.Module, method, batch) -> int:
    """Saved bytes of ``model`` converted to ``method``, measured apart from the planner."""
    clone = copy.deepcopy(model)
    convert(clone, method)
    with rp.track_saved(clone) as saved:
        loss = F.cross_entropy(clone(batch[0].clone()), batch[1])
    loss.backward()
    return saved.bytes


@pytest.mark.parametrize("budget", [0.7, 0.45, 0.25])
def test_the_planned_model_fits_the_budget_as_measured(setting, budget):
    model, batch, _ = setting
    before = copy.deepcopy(model.state_dict())
    methods, report = rp.plan(model, batch, F.cross_entropy, budget, candidates=SMALL, draws=4,
                              checkpointing=False)  # fmt: skip
    assert methods is report.methods and not report.checkpointing
    assert report.budget_bytes == int(budget * report.exact_bytes)
    assert measured_bytes(model, "exact", batch) == report.exact_bytes
    assert measured_bytes(model, methods, batch) == report.measured_bytes <= report.budget_bytes
    assert report.measured_bytes <= report.predicted_bytes
    assert {layer.name for layer in report.layers} == {"1", "3", "5"}
    assert report.total_variance == pytest.approx(sum(c.variance for c in report.layers))
    # the model given is untouched
    assert not any(isinstance(m, ConvertedLayer) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "smallest possible" in str(report)
    assert json.loads(report.to_json())["methods"] == methods


def test_at_a_uniform_settings_bytes_the_plan_has_at_most_its_variance(setting):
    model, batch, found = setting
    beaten = 0
    for method in SMALL[1:]:
        size = measured_bytes(model, method, batch)
        predicted, variance = uniform(found, method)
        assert predicted == size  # no layer shares its input: per-layer bytes add up exactly
        planned = choose(found, size)
        assert planned.predicted_bytes <= size
        assert planned.total_variance <= variance * (1 + 1e-9)
        beaten += planned.total_variance < 0.9 * variance
    assert beaten  # the per-layer choice matters somewhere (else the test shows nothing)


def test_the_choice_is_the_exact_knapsack_optimum(setting):
    """Against brute force over every assignment (the dynamic program can fail this)."""
    _, _, found = setting
    tables = found.layers
    low, high = found.minimum_bytes(), found.exact_bytes - 1  # exact: see the next test
    for budget in torch.linspace(low, high, 9).long().tolist():
        best = min(
            (sum(o.variance for o in combo), sum(o.bytes for o in combo))
            for combo in itertools.product(*(t.options for t in tables))
            if found.fixed_bytes + sum(o.bytes for o in combo) <= budget
        )
        planned = choose(found, budget)
        assert planned.total_variance == pytest.approx(best[0], rel=1e-9, abs=1e-15)
        assert planned.predicted_bytes <= budget


def test_variance_and_bytes_are_monotone_in_the_budget(setting):
    _, _, found = setting
    budgets = torch.linspace(found.minimum_bytes(), found.exact_bytes, 40).long().tolist()
    plans = [choose(found, b) for b in budgets]
    for smaller, larger in itertools.pairwise(plans):
        assert larger.total_variance <= smaller.total_variance
        assert larger.predicted_bytes >= smaller.predicted_bytes
    assert plans[0].total_variance > plans[-1].total_variance == 0.0  # exact fits at the end
    # at exact's bytes, plain PyTorch (the compact ops' masks would add bytes to exact layers)
    assert plans[-1].methods == dict.fromkeys(["1", "3", "5"], "exact")
    assert plans[-1].predicted_bytes == found.exact_bytes


def test_a_budget_below_the_minimum_names_it(setting):
    model, batch, found = setting
    minimum = found.minimum_bytes()
    with pytest.raises(ValueError, match=rf"smallest achievable total, {minimum:,} B \(0\.\d+ of"):
        choose(found, minimum - 1)
    assert choose(found, minimum).predicted_bytes == minimum
    with pytest.raises(ValueError, match="smallest achievable"):
        rp.plan(model, batch, F.cross_entropy, 0.001, candidates=SMALL, draws=2,
                checkpointing=False)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": 0}, ValueError, "positive int"),
        ({"budget": 1.5}, ValueError, r"\(0, 1\]"),
        ({"budget": "0.1"}, TypeError, "int \\(bytes\\) or a float"),
        ({"budget": True}, TypeError, "budget must be"),
        ({"draws": 1}, ValueError, "draws must be an int >= 2"),
        ({"candidates": ["aop"]}, ValueError, "input gradient"),
        ({"candidates": []}, ValueError, "non-empty"),
        ({"candidates": ["rad:keep=2"]}, ValueError, "keep"),
        ({"checkpointing": "yes"}, TypeError, "checkpointing must be True or False"),
    ],
)
def test_bad_arguments_are_named(setting, kwargs, error, match):
    model, batch, _ = setting
    kwargs = {"budget": 0.5, "candidates": SMALL, "draws": 2, **kwargs}
    with pytest.raises(error, match=match):
        rp.plan(model, batch, F.cross_entropy, **kwargs)


def test_a_model_no_candidate_converts_is_refused():
    with pytest.raises(ValueError, match="no candidate converts"):
        rp.plan(nn.Sequential(nn.ReLU()), tiny_batch(), F.cross_entropy, 0.5, candidates=SMALL)


def test_trace_is_a_candidate_for_convolutions_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))  # fmt: skip
    batch = (torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)))
    found = measure(model, _loss_of(batch, F.cross_entropy),
                    candidates=("trace:probes=4", "quant:bits=4"), draws=2)  # fmt: skip
    methods = {t.name: [o.method for o in t.options] for t in found.layers}
    assert methods == {"0": ["exact", "trace:probes=4,probe=gaussian,channels=multi",
                             "quant:bits=4,group=0"],
                       "3": ["exact", "quant:bits=4,group=0"]}  # fmt: skip
    assert found.ops == ["1"]  # the ReLU's 1-bit mask
    assert all(o.variance >= 0 for t in found.layers for o in t.options)
    assert "exact" in CANDIDATES


def test_cli_plan_json(capsys):
    spec = ["--model", f"{__name__}:tiny_spec", "--candidate", "rad:keep=0.3",
            "--candidate", "quant:bits=2"]  # fmt: skip
    code = main(["plan", *spec, "--budget", "1/3", "--json", "--draws", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["measured_bytes"] <= result["budget_bytes"] == result["exact_bytes"] // 3
    assert set(result["methods"]) >= {"1", "3", "5"}
    assert all(m.split(":")[0] in ("exact", "rad", "quant") for m in result["methods"].values())
    assert main(["plan", *spec, "--budget", "2"]) == 2
    assert "smallest achievable" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--budget", "1.5"])
    assert "fraction of exact's saved bytes" in capsys.readouterr().err


def test_cli_train_with_a_budget(tmp_path, monkeypatch, capsys):
    module = sys.modules["randprop.plan"]  # rp.plan, the attribute, is the function
    monkeypatch.setattr(module, "CANDIDATES", ("exact", "rad:keep=0.2", "quant:bits=2"))
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--budget", "0.25", "--steps", "2", "--batch", "16",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    planned = json.loads((out / "plan.json").read_text())
    assert summary["method"] == planned["methods"]
    assert summary["checkpointing"] == planned["checkpointing"]
    assert summary["saved_bytes"] == planned["measured_bytes"] <= planned["budget_bytes"]
    assert summary["exact_saved_bytes"] == planned["exact_bytes"]
    capsys.readouterr()
    assert main([*args, "--method", "rad"]) == 2
    assert "--budget plans" in capsys.readouterr().err
    assert main([*args, "--checkpointing"]) == 2
    assert "drop --method, --match-memory-of and --checkpointing" in capsys.readouterr().err
    assert main([*args[:3], "--no-checkpointing", "--out", str(out)]) == 2
    assert "--no-checkpointing goes with --budget" in capsys.readouterr().err


class TwoHeads(nn.Module):
    """Two Linear layers reading one tensor (as attention's q, k and v projections do)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.act = nn.Linear(24, 32), nn.ReLU()
        self.a, self.b = nn.Linear(32, 5), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x.flatten(1)))  # a 1-bit mask: only a and b hold h
        return self.a(h) + self.b(h)


def test_layers_sharing_an_input_are_planned_conservatively():
    """Freeing the shared tensor takes both heads: the per-layer bytes miss that saving, so the
    measured total is at most the predicted one, never above the budget."""
    torch.manual_seed(0)
    model, batch = TwoHeads(), tiny_batch()
    found = measure(model, _loss_of(batch, F.cross_entropy), candidates=SMALL, draws=2)
    both = {"inp": "exact", "act": "rad:keep=0.1", "a": "rad:keep=0.1", "b": "rad:keep=0.1"}
    inp, a, b = found.layers
    predicted = found.fixed_bytes + inp.options[0].bytes + a.options[1].bytes + b.options[1].bytes
    assert (a.options[1].method, b.options[1].method) == (str(rp.parse_method("rad:keep=0.1")),) * 2
    assert measured_bytes(model, both, batch) < predicted  # the joint saving of freeing h
    assert found.minimum_bytes() < found.layer_minimum_bytes()  # a uniform setting, measured whole
    for budget in (0.9, 0.6, 0.4):
        _, report = rp.plan(model, batch, F.cross_entropy, budget, candidates=SMALL, draws=2)
        assert report.measured_bytes <= report.predicted_bytes <= report.budget_bytes
        if report.budget_bytes < found.layer_minimum_bytes():  # only converting both fits
            assert report.methods["a"] == report.methods["b"] != "exact"
