"""The experiment suites: train.train's hooks reproduce a hand-written loop, and each suite's
``--quick`` run completes and writes its report."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from randprop.data import Splits
from randprop.experiments import SUITES, report
from randprop.train import TrainConfig, train
from randprop.train.baselines import largest_batch
from randprop.train.loop import epoch_batches, permutations


def _splits(n: int = 40) -> Splits:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    data = TensorDataset(x, y)
    return Splits("toy", data, data, data, num_classes=3, input_shape=(6,))


def _net() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("drop_last", [True, False])
def test_hooks_match_a_hand_written_loop(drop_last: bool) -> None:
    """model / batches / callback hooks: the same parameters and losses as the plain loop."""
    splits, batch, epochs = _splits(), 12, 3
    x, y = splits.train.tensors
    per_epoch = len(x) // batch if drop_last else -(-len(x) // batch)
    model, losses = _net(), []
    cfg = TrainConfig(model="toy", batch=batch, steps=epochs * per_epoch, optimizer="sgd",
                      lr=0.1, log_every=0, progress=False)  # fmt: skip
    order = permutations(len(x), torch.Generator().manual_seed(5))
    train(cfg, splits=splits, model=model, callback=lambda s, loss: losses.append(loss),
          batches=epoch_batches(len(x), batch, order, drop_last=drop_last))  # fmt: skip

    ref, ref_losses = _net(), []
    opt, gen = torch.optim.SGD(ref.parameters(), lr=0.1), torch.Generator().manual_seed(5)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            opt.zero_grad()
            loss = F.cross_entropy(ref(x[idx]), y[idx])
            loss.backward()
            opt.step()
            ref_losses.append(float(loss.detach()))
    assert losses == ref_losses
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


def test_loss_hook_and_regression_accuracy() -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=gen), torch.randn(30, 1, generator=gen)
    data = TensorDataset(x, y)
    splits = Splits("reg", data, data, data, num_classes=0, input_shape=(4,))
    cfg = TrainConfig(model="reg", batch=10, steps=3, log_every=0, progress=False)
    summary = train(cfg, splits=splits, model=nn.Linear(4, 1), loss=F.mse_loss)
    assert summary["test_accuracy"] != summary["test_accuracy"]  # nan: no accuracy of a regression
    assert summary["test_loss"] > 0


def test_onecycle_schedule_is_torchs() -> None:
    splits, model = _splits(), _net()
    cfg = TrainConfig(model="toy", batch=10, steps=8, schedule="onecycle", lr=0.01, log_every=0,
                      progress=False)  # fmt: skip
    train(cfg, splits=splits, model=model)
    ref = _net()
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=8)
    x, y = splits.train.tensors
    from randprop.train.loop import batch_indices

    for t in range(8):
        idx = batch_indices(len(x), 10, 0, t)
        opt.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


def test_batches_excludes_match_memory_of() -> None:
    cfg = TrainConfig(model="toy", batch=10, steps=1, match_memory_of="rad:keep=0.5")
    with pytest.raises(ValueError, match="batches and match_memory_of"):
        train(cfg, splits=_splits(), model=_net(), batches=lambda t: torch.arange(10))


def test_largest_batch() -> None:
    assert largest_batch(lambda b: b <= 21, 150) == 21
    assert largest_batch(lambda b: b <= 150, 150) == 150
    assert largest_batch(lambda b: False, 150) == 0


def test_report_helpers() -> None:
    assert report.markdown_table(["a", "b"], [[1, 2]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    assert "torch" in report.machine(1) and "1 thread" in report.machine(1)
    assert report.load() == "n/a" or len(report.load().split()) == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SUITES))
def test_quick_suite(name: str, tmp_path) -> None:
    """Each suite's quick mode (a smoke run of seconds) runs and writes report.md and
    results.json; rad-mnist-conv re-runs a part of rad-mnist's results, so these come first."""
    pytest.importorskip("matplotlib")
    if name == "rad-mnist-conv":
        SUITES["rad-mnist"].run(tmp_path, True)
    results = SUITES[name].run(tmp_path, True)
    assert (tmp_path / "report.md").read_text().strip()
    assert results and isinstance(json.loads((tmp_path / "results.json").read_text()), dict)
