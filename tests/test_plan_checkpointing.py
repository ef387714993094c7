"""rp.plan with checkpointing of blocks: the predicted peak is the measured one (reentrant
checkpointing under rp.track_saved, an independent measurement), the choice is the brute-force
optimum, budgets only checkpointing reaches are planned, and equal variance prefers no
recomputation."""

from __future__ import annotations

import copy
import itertools
import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import randprop as rp
from randprop.blocks import find_block_list
from randprop.checkpointing import install_checkpointing, remove_checkpointing
from randprop.cli import main
from randprop.convert import convert
from randprop.plan import CHECKPOINT_GAIN, _checkpointed_knapsack, _loss_of, choose, measure
from randprop.train import TrainConfig, train
from randprop.train.baselines import install

SMALL = ("exact", "rad:keep=0.1", "rad:keep=0.5,bits=2", "quant:bits=2", "quant:bits=8")


class Blocks(nn.Module):
    """A stem, residual blocks 8 -> width -> 8 (wide inside, narrow between: what checkpointing
    suits) and a head."""

    def __init__(self, depth: int = 8, width: int = 256) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 8)) for _ in range(depth)
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def blocks_batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 12), torch.randint(0, 4, (n,))


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model, batch = Blocks(), blocks_batch()
    found = measure(model, _loss_of(batch, F.cross_entropy), candidates=SMALL, draws=3)
    return model, batch, found


@pytest.fixture(scope="module")
def few():
    """Two blocks and three options per layer: 3^6 assignments, few enough for brute force."""
    torch.manual_seed(0)
    model, batch = Blocks(depth=2, width=64), blocks_batch()
    candidates = ("exact", "rad:keep=0.1", "quant:bits=2")
    return measure(model, _loss_of(batch, F.cross_entropy), candidates=candidates, draws=3)


def reentrant_peak(model: nn.Module, methods: dict[str, str], batch) -> int:
    """The planned model's peak saved bytes over a forward and backward with each block under
    reentrant checkpointing, which recomputes under rp.track_saved's hooks (so it counts it)."""
    clone = copy.deepcopy(model)
    convert(clone, methods)
    for block in clone.blocks:
        forward = block.forward
        block.forward = types.MethodType(
            lambda self, h, f=forward: checkpoint(f, h, use_reentrant=True), block
        )
    with rp.track_saved(clone) as saved:
        F.cross_entropy(clone(batch[0].clone()), batch[1]).backward()
    return saved.bytes


def test_blocks_are_found_and_measured(setting):
    model, _, found = setting
    assert [b.name for b in found.blocks] == [f"blocks.{k}" for k in range(8)]
    assert [b.layers for b in found.blocks] == [[f"blocks.{k}.0", f"blocks.{k}.2"]
                                                for k in range(8)]  # fmt: skip
    assert all(b.input_bytes == 32 * 8 * 4 for b in found.blocks)  # one float32 h each
    assert all(o.checkpointed_delta is not None for t in found.layers for o in t.options)
    assert all(t.options[0].checkpointed_delta == 0 for t in found.layers)  # exact: reference
    # checkpointing reaches budgets no per-layer choice does (the blocks' insides are freed)
    assert found.checkpointed_minimum_bytes() < found.layer_minimum_bytes()
    assert found.minimum_bytes() == found.checkpointed_minimum_bytes()


@pytest.mark.parametrize("where", [0.0, 0.3, 0.7, 1.0])
def test_a_checkpointed_plan_fits_as_measured_independently(setting, where):
    model, batch, found = setting
    low, high = found.checkpointed_minimum_bytes(), found.layer_minimum_bytes()
    budget = int(low + where * (high - 1 - low))  # below what any plan without it reaches
    methods, report = rp.plan(model, batch, F.cross_entropy, budget, candidates=SMALL, draws=3)
    assert report.checkpointing
    assert reentrant_peak(model, methods, batch) == report.measured_bytes
    assert report.measured_bytes <= report.predicted_bytes <= budget
    assert "blocks checkpointed" in str(report)
    # the same layers' choices without checkpointing would not fit
    with pytest.raises(ValueError, match="smallest achievable"):
        rp.plan(model, batch, F.cross_entropy, budget, candidates=SMALL, draws=2,
                checkpointing=False)  # fmt: skip


def test_the_checkpointed_choice_is_the_brute_force_optimum(few):
    """Over every assignment of options, with the peak formula of the module docstring."""
    found = few
    names = [t.name for t in found.layers]
    inside = [[names.index(n) for n in b.layers] for b in found.blocks]
    outside = [i for i in range(len(names)) if all(i not in m for m in inside)]
    inputs = [b.input_bytes for b in found.blocks]

    def peak(combo) -> int:
        held = found.checkpointed_held_bytes + sum(combo[i].checkpointed_delta for i in outside)
        held += max(b.recompute_bytes - sum(inputs[k + 1 :])
                    + sum(combo[i].checkpointed_delta for i in inside[k])
                    for k, b in enumerate(found.blocks))  # fmt: skip
        forward = found.checkpointed_forward_bytes + sum(
            o.checkpointed_forward_delta for o in combo
        )  # fmt: skip
        return max(held, forward)

    combos = [(sum(o.variance for o in c), peak(c))
              for c in itertools.product(*(t.options for t in found.layers))]  # fmt: skip
    low = found.checkpointed_minimum_bytes()
    assert low == min(size for _, size in combos)
    for budget in torch.linspace(low, found.exact_bytes, 7).long().tolist():
        best = min(v for v, size in combos if size <= budget)
        layers, size, _ = _checkpointed_knapsack(found, budget, 1 << 18)
        assert sum(c.variance for c in layers) == pytest.approx(best, rel=1e-9, abs=1e-15)
        assert size <= budget


def test_equal_variance_prefers_no_recomputation(setting):
    _, _, found = setting
    planned = choose(found, found.exact_bytes)
    assert not planned.checkpointing and planned.total_variance == 0.0
    # exact everywhere also fits with checkpointing at a budget where the plain model does not
    zero = max(b.recompute_bytes for b in found.blocks) + found.checkpointed_held_bytes
    planned = choose(found, zero)
    assert planned.total_variance == 0.0 and planned.checkpointing
    assert planned.predicted_bytes < found.exact_bytes


def test_variance_is_monotone_in_the_budget_with_checkpointing(setting):
    """Strictly with checkpoint_gain 1; within the factor checkpoint_gain otherwise (a larger
    budget may trade a checkpointed plan for one without, up to that factor in variance)."""
    _, _, found = setting
    budgets = torch.linspace(found.minimum_bytes(), found.exact_bytes, 25).long().tolist()
    for gain in (1.0, CHECKPOINT_GAIN, 4.0):
        variances = [choose(found, b, checkpoint_gain=gain).total_variance for b in budgets]
        assert all(b <= a * gain for a, b in itertools.pairwise(variances))
        assert variances[0] > variances[-1] == 0.0


def test_checkpointing_is_taken_only_for_the_gain_asked(setting):
    _, _, found = setting
    low, high = found.checkpointed_minimum_bytes(), found.layer_minimum_bytes()
    # a budget where plans with and without checkpointing fit and checkpointing lowers a
    # non-zero variance (with variance 0, i.e. every layer exact, any gain is exceeded)
    both, eager = next(
        (b, p) for b in torch.linspace(high, found.exact_bytes, 50).long().tolist()
        if (p := choose(found, b, checkpoint_gain=1.0)).checkpointing and p.total_variance > 0
    )  # fmt: skip
    plain = choose(found, both, checkpoint_gain=1e12)
    assert not plain.checkpointing and plain.total_variance > eager.total_variance
    ratio = plain.total_variance / eager.total_variance
    assert choose(found, both, checkpoint_gain=ratio * 0.99).checkpointing
    assert not choose(found, both, checkpoint_gain=ratio * 1.01).checkpointing
    assert choose(found, (low + high) // 2, checkpoint_gain=1e12).checkpointing  # only it fits
    for bad in (0.5, True, "2"):
        with pytest.raises(ValueError, match="checkpoint_gain must be a number >= 1"):
            choose(found, both, checkpoint_gain=bad)


def test_apply_converts_and_checkpoints_with_the_gradients_unchanged(setting):
    """Checkpointing changes no gradient: the plan applied with and without it agree
    (deterministic choices: exact and 8-bit codes; the same global RNG state)."""
    model, batch, found = setting
    planned = choose(found, found.checkpointed_minimum_bytes())
    methods = {n: m if m.startswith(("exact", "quant")) else "quant:bits=8"
               for n, m in planned.methods.items()}  # fmt: skip
    planned.methods = methods
    plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
    convert(plain, methods)
    planned.apply(checkpointed)
    assert all(hasattr(b.forward, "fn") for b in checkpointed.blocks)  # checkpointed
    grads = []
    for m in (plain, checkpointed):
        torch.manual_seed(1)
        F.cross_entropy(m(batch[0]), batch[1]).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nested_block_lists_are_found():
    inner = Blocks()
    wrapper = nn.Module()
    wrapper.body = inner
    assert find_block_list(wrapper) is inner.blocks
    units = install_checkpointing(wrapper)
    assert len(units) == 8
    assert all("forward" in b.__dict__ for b in inner.blocks)
    remove_checkpointing(wrapper)  # undone: the blocks' own forward again
    assert not any("forward" in b.__dict__ for b in inner.blocks)
    assert not hasattr(wrapper, "rp_checkpoint_units")
    sequential = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    install_checkpointing(sequential)
    remove_checkpointing(sequential)
    assert "forward" not in sequential.__dict__
    with pytest.raises(ValueError, match="list named one of"):
        install_checkpointing(nn.Module())


def test_install_checkpointing_goes_with_a_per_layer_method_only():
    with pytest.raises(ValueError, match="per-layer method"):
        install(Blocks(), "fa", F.cross_entropy, 0, checkpointing=True)
    with pytest.raises(TypeError, match="checkpointing must be True or False"):
        install(Blocks(), "exact", F.cross_entropy, 0, checkpointing=1)


def test_train_with_a_method_and_checkpointing(tmp_path):
    common = {"model": "mlp", "steps": 2, "batch": 16, "progress": False, "log_every": 0}
    method = {"1": "quant:bits=2", "3": "exact"}
    plain = train(TrainConfig(**common, method=method))
    both = train(TrainConfig(**common, method=method, checkpointing=True,
                             out=str(tmp_path / "run")))  # fmt: skip
    assert both["checkpointing"] and not plain["checkpointing"]
    assert both["saved_bytes"] != plain["saved_bytes"]
    assert both["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-5)  # same gradients
    with pytest.raises(ValueError, match="match_memory_of"):
        TrainConfig(**common, checkpointing=True, match_memory_of="rad")


def test_cli_train_checkpointing_with_a_method(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--method", "quant:bits=2", "--checkpointing",
            "--steps", "1", "--batch", "16", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpointing"] and summary["saved_bytes"] < summary["exact_saved_bytes"]
