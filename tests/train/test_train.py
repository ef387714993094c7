"""The training loop: resume equivalence, atomic checkpoints, Ctrl-C, baselines, rules, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch
from torch.utils.data import TensorDataset

from randprop.checkpointing import install_checkpointing
from randprop.convert import convert as rp_convert
from randprop.convert import method_state
from randprop.data import Splits, load_dataset
from randprop.models import build_model
from randprop.train import LEARNING_RULES, Backprop, TrainConfig, register_rule, train
from randprop.train import checkpoint as ckpt_io
from randprop.train.baselines import install, matched_batch, measure_step, saved_bytes_of
from randprop.train.loop import batch_indices, build_seeded, loss_fn


@pytest.fixture(scope="module")
def small():
    """1200 MNIST training images (val 200, test 300): enough to train for a few steps."""
    full = load_dataset("mnist")
    x, y = full.train.tensors
    tx, ty = full.test.tensors
    return Splits(
        name="mnist",
        train=TensorDataset(x[:1000].clone(), y[:1000].clone()),
        val=TensorDataset(x[1000:1200].clone(), y[1000:1200].clone()),
        test=TensorDataset(tx[:300].clone(), ty[:300].clone()),
        num_classes=10,
        input_shape=(1, 28, 28),
    )


def cfg(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(model="mlp", data="mnist", batch=32, steps=10, log_every=2, threads=1)
    return TrainConfig(**{**base, "out": str(tmp_path / name), **kw})


def params(path) -> dict[str, torch.Tensor]:
    return ckpt_io.load_checkpoint(path / ckpt_io.CHECKPOINT)["model"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def losses(path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.mark.parametrize("method", ["rad:keep=0.1,mode=project", "exact"])
def test_resume_equals_uninterrupted_run_bitwise(tmp_path, small, method):
    t = 6
    whole = train(cfg(tmp_path, "whole", method=method, steps=2 * t), splits=small)
    train(cfg(tmp_path, "split", method=method, steps=t), splits=small)
    resumed = train(cfg(tmp_path, "split", method=method, steps=2 * t, resume=True), splits=small)
    assert_bitwise_equal(params(tmp_path / "whole"), params(tmp_path / "split"))
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert losses(tmp_path / "whole") == losses(tmp_path / "split")
    state = ckpt_io.load_checkpoint(tmp_path / "split" / ckpt_io.CHECKPOINT)
    if method.startswith("rad"):  # the per-layer seed streams were carried over
        assert set(state["method_state"].values()) == {2 * t}


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, small):
    kw = dict(method="rad:keep=0.1", steps=8, schedule="cosine", optimizer="adamw", lr=3e-3)
    train(cfg(tmp_path, "whole", **kw), splits=small)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path, "cut", **kw), splits=small, callback=interrupt)
    assert ckpt_io.load_checkpoint(tmp_path / "cut" / ckpt_io.CHECKPOINT)["step"] == 3
    train(cfg(tmp_path, "cut", resume=True, **kw), splits=small)
    assert_bitwise_equal(params(tmp_path / "whole"), params(tmp_path / "cut"))
    assert losses(tmp_path / "whole") == losses(tmp_path / "cut")


def test_ctrl_c_mid_step_finishes_the_step_then_checkpoints(tmp_path, small):
    calls = []
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN where the tests run in the background

    @register_rule("test-sigint")
    class CtrlC(Backprop):
        def backward(self, x, y):
            calls.append(1)
            if len(calls) == 4:  # call 1 measures memory; call 4 is training step 3
                os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the step
            return super().backward(x, y)

    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg(tmp_path, "cut", method="test-sigint", steps=8), splits=small)
    finally:
        del LEARNING_RULES["test-sigint"]
    assert len(calls) == 4  # no step after the interrupted one
    assert ckpt_io.load_checkpoint(tmp_path / "cut" / ckpt_io.CHECKPOINT)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back


def test_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt_io.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save({"step": 2, "w": torch.zeros(1000)}, f)  # some bytes reach the temp file
        f.flush()
        raise KeyboardInterrupt  # then the write is cut off

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    state = ckpt_io.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_checkpoint_carries_rng_and_optimizer_state(tmp_path, small):
    train(cfg(tmp_path, checkpoint_every=5, optimizer="sgd", momentum=0.9, lr=0.05), splits=small)
    state = ckpt_io.load_checkpoint(tmp_path / "run" / ckpt_io.CHECKPOINT)
    assert state["step"] == 10 and {"torch", "numpy", "python"} <= set(state["rng"])
    assert state["optimizer"]["state"]  # momentum buffers
    assert state["identity"]["method"] == "exact"


def test_summary_and_metrics_hold_the_contract_fields(tmp_path, small):
    rng_before = torch.get_rng_state()
    summary = train(cfg(tmp_path, eval_every=5), splits=small)
    assert torch.equal(rng_before, torch.get_rng_state())  # the global RNG is never advanced
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("method", "model", "data", "batch", "steps", "seed", "test_accuracy",
                "train_loss", "saved_bytes", "peak_bytes", "wall_seconds"):  # fmt: skip
        assert key in on_disk, key
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["saved_bytes"] == summary["exact_saved_bytes"] > 0
    records = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10]
    assert [r["step"] for r in records if "test_accuracy" in r] == [5, 10]
    assert all({"time", "saved_bytes"} <= set(r) for r in records if "loss" in r)


def test_training_learns(tmp_path, small):
    summary = train(cfg(tmp_path, steps=60, lr=3e-3), splits=small)
    assert summary["test_accuracy"] > 0.7  # chance is 0.1


def test_batches_cover_each_epoch_once_and_depend_on_the_seed():
    epoch = torch.cat([batch_indices(100, 25, seed=0, step=s) for s in range(4)])
    assert sorted(epoch.tolist()) == list(range(100))
    assert not torch.equal(batch_indices(100, 25, 0, 0), batch_indices(100, 25, 0, 4))
    assert not torch.equal(batch_indices(100, 25, 0, 0), batch_indices(100, 25, 1, 0))


def test_matched_batch_is_the_largest_that_fits(small):
    x, y = (t[:150].clone() for t in small.train.tensors)

    def build():
        return build_seeded("mlp", 0)

    b, budget = matched_batch(build, "rad:keep=0.1", x, y, loss_fn)
    assert budget == saved_bytes_of(build, "rad:keep=0.1", x, y, loss_fn)
    fits = saved_bytes_of(build, "exact", x[:b].clone(), y[:b].clone(), loss_fn)
    too_big = saved_bytes_of(build, "exact", x[: b + 1].clone(), y[: b + 1].clone(), loss_fn)
    assert fits <= budget < too_big
    assert 10 <= b <= 30  # RAD paper: batch 20 matches RAD keep 0.1 at batch 150 on this MLP


def test_match_memory_of_trains_exact_with_the_matched_batch(tmp_path, small):
    summary = train(cfg(tmp_path, batch=150, steps=2, match_memory_of="rad:keep=0.1"), splits=small)
    assert summary["batch"] < 150 and summary["method"] == "exact"
    assert summary["saved_bytes"] <= summary["memory_budget_bytes"]


def test_checkpointing_gives_exact_gradients_with_less_saved_memory(small):
    x, y = (t[:64].clone() for t in small.train.tensors)
    grads = {}
    for method in ("exact", "checkpoint"):
        model = build_seeded("mlp", 0)
        keys = set(model.state_dict())
        rule = install(model, method, loss_fn, seed=0)
        assert set(model.state_dict()) == keys
        saved = measure_step(model, rule, x, y)
        rule.backward(x, y)
        grads[method] = ([p.grad.clone() for p in model.parameters()], saved)
    for g_exact, g_ckpt in zip(grads["exact"][0], grads["checkpoint"][0], strict=True):
        torch.testing.assert_close(g_ckpt, g_exact, rtol=1e-5, atol=1e-7)
    # 784-300-300-300-10 in 2 segments: held x and h2, recomputing h3 (or h1, h2) at most
    b = 64 * 4
    # (the loss's log-softmax output and targets are freed before the recomputation)
    assert grads["checkpoint"][1] == b * (784 + 300 + 300)
    assert grads["checkpoint"][1] < grads["exact"][1]


def test_checkpointing_wraps_a_block_list():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(
                [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(3)]
            )

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = Net()
    x = torch.randn(4, 8)
    expected = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    install(model, "checkpoint", loss_fn, seed=0)
    got = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="cannot find the blocks"):
        install(torch.nn.Linear(2, 2), "checkpoint", loss_fn, seed=0)


def test_checkpoint_segments_keep_batchnorm_with_the_layer_before_it():
    """The Sequential is split as rules.sequential_blocks splits it: a block starts at a Linear,
    the BatchNorm after a Linear belongs to that Linear's block (not to a block of its own)."""
    nn = torch.nn
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))  # fmt: skip
    units = install_checkpointing(model, segments=9)  # one unit per block
    assert [[type(m).__name__ for m in unit.fn.__self__] for unit in units] == [
        ["Linear", "BatchNorm1d", "ReLU"],
        ["Linear", "BatchNorm1d", "ReLU"],
        ["Linear", "BatchNorm1d"],
        ["Linear"],
    ]


def test_learning_rules_are_looked_up_in_the_registry(tmp_path, small):
    calls = []

    @register_rule("test-counting")
    class Counting(Backprop):
        def backward(self, x, y):
            calls.append(len(x))
            return super().backward(x, y)

    try:
        summary = train(cfg(tmp_path, method="test-counting", steps=3), splits=small)
    finally:
        del LEARNING_RULES["test-counting"]
    assert summary["method"] == "test-counting"
    assert calls == [32, 32, 32, 32]  # one measuring step, then the 3 training steps


def test_bad_names_list_the_choices(tmp_path, small):
    with pytest.raises(ValueError, match="unknown method 'nope'; choose from.*checkpoint.*exact"):
        train(cfg(tmp_path, method="nope"), splits=small)
    with pytest.raises(ValueError, match="unknown model 'nope'; choose from.*mlp"):
        train(cfg(tmp_path, model="nope"), splits=small)
    with pytest.raises(ValueError, match="unknown dataset 'nope'; choose from.*mnist"):
        train(cfg(tmp_path, data="nope"))
    with pytest.raises(ValueError, match="optimizer must be one of 'sgd', 'adam', 'adamw'"):
        cfg(tmp_path, optimizer="lbfgs")
    with pytest.raises(ValueError, match="takes examples of shape"):
        train(cfg(tmp_path, model="mlp"), splits=load_dataset("digits"))


def test_resume_refuses_a_different_run(tmp_path, small):
    train(cfg(tmp_path, steps=2), splits=small)
    with pytest.raises(ValueError, match="cannot resume: method"):
        train(cfg(tmp_path, steps=4, method="rad:keep=0.1", resume=True), splits=small)
    with pytest.raises(FileNotFoundError, match="run without --resume"):
        train(cfg(tmp_path, "missing", resume=True), splits=small)


def test_rad_models_shapes_and_parameter_counts():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    mlp = build_model("mlp")
    assert count(mlp) == 784 * 300 + 300 + 2 * (300 * 300 + 300) + 300 * 10 + 10
    assert mlp(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    convs = 16 * 25 + 16 + 16 * 32 * 25 + 32 + 2 * (32 * 32 * 25 + 32)
    mnist_net, cifar_net = build_model("rad-cnn"), build_model("rad-cnn-cifar")
    assert count(mnist_net) == convs + 32 * 7 * 7 * 10 + 10
    assert count(cifar_net) == convs + 2 * 16 * 25 + 2048 * 10 + 10  # 3 input channels, fc 2048
    assert mnist_net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert cifar_net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


class _SaveExtra(torch.autograd.Function):
    """Identity that saves ``n`` extra floats for backward (allocated in forward)."""

    @staticmethod
    def forward(ctx, h, n):
        ctx.save_for_backward(torch.zeros(n))
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g, None


def _extra_saving_rule(n: int):
    def factory(model, loss_fn, seed):
        model[0].register_forward_hook(lambda module, args, out: _SaveExtra.apply(out, n))
        return Backprop(model, loss_fn, seed)

    return factory


def test_peak_bytes_differ_by_the_saved_bytes_they_differ_in(tmp_path, small):
    """Two runs differing only in what autograd saves (an extra 1 MB kept from the first layer's
    output until just before its backward): summary peak_bytes differ by it within 1%. A conv
    net (activations far above parameters and gradients) and SGD without momentum (the step
    allocates nothing): the peak is where the saved tensors are all held, in both runs."""
    n = 2**18  # 1 MiB of float32
    x, y = small.train.tensors
    bigger = dataclasses.replace(small, train=TensorDataset(x.repeat(4, 1, 1, 1), y.repeat(4)))
    summaries = {}
    for extra, splits in ((0, small), (n, small), ("0-big", bigger)):
        register_rule(f"test-extra-{extra}")(_extra_saving_rule(n if extra == n else 0))
        try:
            kw = dict(model="cnn", method=f"test-extra-{extra}", steps=4, optimizer="sgd")
            summaries[extra] = train(cfg(tmp_path, str(extra), **kw), splits=splits)
        finally:
            del LEARNING_RULES[f"test-extra-{extra}"]
    base, more = summaries[0], summaries[n]
    assert more["saved_bytes"] - base["saved_bytes"] == 4 * n
    assert more["peak_bytes"] - base["peak_bytes"] == pytest.approx(4 * n, rel=0.01)
    held = 4 * sum(p.numel() for p in build_model("cnn").parameters()) + 32 * 784 * 4
    # parameters, batch, what autograd saves and some temporaries ...
    assert held + base["saved_bytes"] < base["peak_bytes"] < held + 2 * base["saved_bytes"]
    assert summaries["0-big"]["peak_bytes"] == base["peak_bytes"]  # ... never the dataset


def test_peak_forward_backward_bytes_show_the_saved_bytes(tmp_path, small):
    """peak_forward_backward_bytes (no optimizer step) is at most peak_bytes, and RAD's is below
    exact's by most of the bytes it saves less, less the batch (exact saves the batch, which is
    held anyway). Batch 1000: the MLP's activations outweigh its gradients, so the forward +
    backward peak sits where the saved tensors are held (at batch 150 it sits at the end of
    backward, where only the first layer's stored values remain, in both runs)."""
    runs = {}
    for method in ("exact", "rad:keep=0.1"):
        kw = dict(method=method, batch=1000, steps=2, optimizer="adam", log_every=0)
        runs[method] = train(cfg(tmp_path, method.replace(":", "-"), **kw), splits=small)
    for summary in runs.values():
        assert 0 < summary["peak_forward_backward_bytes"] <= summary["peak_bytes"]
    exact, rad = runs["exact"], runs["rad:keep=0.1"]
    expected = exact["saved_bytes"] - rad["saved_bytes"] - 1000 * 784 * 4
    less = exact["peak_forward_backward_bytes"] - rad["peak_forward_backward_bytes"]
    assert 0.6 * expected <= less <= expected, (less, expected)


def test_matched_batch_leaves_the_users_model_untouched(small):
    x, y = (t[:64].clone() for t in small.train.tensors)
    torch.manual_seed(0)
    plain = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 26 * 26, 10),
    )  # fmt: skip
    aop = build_seeded("mlp", 0)
    rp_convert(aop, "aop")
    install(aop, "exact", loss_fn, seed=0).backward(x, y)  # AOP memory now holds rows
    aop.zero_grad(set_to_none=True)
    for model, method in ((plain, "rad:keep=0.1"), (aop, "aop")):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        classes, state = [type(m) for m in model.modules()], method_state(model)
        matched_batch(lambda model=model: model, method, x, y, loss_fn)
        assert_bitwise_equal(model.state_dict(), before)  # BatchNorm statistics, AOP memory
        assert [type(m) for m in model.modules()] == classes
        assert_same_method_state(method_state(model), state)
        assert all(p.grad is None for p in model.parameters())
    assert any(k.startswith("aop_memory") for k in method_state(aop)["1"])


def assert_same_method_state(a: dict, b: dict) -> None:
    """Step counters equal, and state tensors (AOP memory, CRS estimate) bitwise equal."""
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            assert a[name]["step"] == b[name]["step"], name
            assert_bitwise_equal(
                {k: v for k, v in a[name].items() if k != "step"},
                {k: v for k, v in b[name].items() if k != "step"},
            )
        else:
            assert a[name] == b[name], name


def test_a_method_that_converts_no_layer_is_an_error(tmp_path, small):
    with pytest.raises(ValueError, match=r"'trace' converts no layer of model 'mlp': trace does "
                       r"not support Linear; kept exact \(1, 3, 5, 7\)"):  # fmt: skip
        train(cfg(tmp_path, method="trace"), splits=small)
    assert not (tmp_path / "run").exists()


def test_summary_carries_the_conversion_report(tmp_path, small):
    rad = train(cfg(tmp_path, "rad", method="rad:keep=0.1", steps=1), splits=small)["conversion"]
    assert rad["converted"]["1"].startswith("rad:keep=0.1") and rad["skipped"] == {}
    assert rad["converted"]["2"] == "exact, 1-bit mask"
    exact = train(cfg(tmp_path, "exact", steps=1), splits=small)["conversion"]
    assert exact["converted"] == {} and "exact: kept as plain PyTorch" in exact["skipped"]["1"]
    assert train(cfg(tmp_path, "ckpt", method="checkpoint", steps=1), splits=small)[
        "conversion"
    ] is None  # fmt: skip


def test_out_below_a_file_is_a_clear_error(tmp_path, small):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="train: out .* lies below the file"):
        train(cfg(tmp_path, "file/run"), splits=small)
    with pytest.raises(ValueError, match="train: out .* is a file"):
        train(cfg(tmp_path, "file"), splits=small)
