"""`randprop bench transformer`: the verdict names each failed bound and by how much; the quick
run writes every row and resumes from the runs already on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from randprop.experiments import transformer_lm as tlm


def _row(label: str, method: str, loss: float, seconds: float, batch: int = 8) -> dict:
    return {"label": label, "method": method, "batch": batch, "checkpointing": False,
            "seeds": [0, 1, 2], "quality": loss, "quality_std": 0.01, "saved_bytes": 100,
            "peak_bytes": None, "seconds_per_step": seconds, "curve": [[1, loss]]}  # fmt: skip


def _task() -> tlm.Task:
    return tlm.all_tasks_of(quick=True)[0]


def test_verdict_met_and_failed() -> None:
    """Every bound is checked: the same exact row, one randprop row that meets all three bounds
    and one that fails all three, each failure stated with its size."""
    exact = _row("exact", "exact", 2.00, 1.0)
    small = _row("small batch", "exact", 2.05, 0.2, batch=1)
    matched = {f"`{tlm.QUANT}`": {"batch": 1, "budget": 90, "exact_bytes": 95}}

    good = tlm.add_ratios([exact, _row(f"`{tlm.QUANT}`", tlm.QUANT, 2.04, 1.2), small])
    text = "\n".join(tlm.verdict(_task(), good, matched))
    assert text.count("**met**") == 3 and "failed" not in text

    bad = tlm.add_ratios([exact, _row(f"`{tlm.QUANT}`", tlm.QUANT, 2.10, 1.5), small])
    text = "\n".join(tlm.verdict(_task(), bad, matched))
    assert text.count("**failed**") == 3 and "**met**" not in text
    assert "1.0500x" in text and "2.00 percentage points" in text  # 5% against the 3% bound
    assert "+0.0500 nats" in text  # above the small batch
    assert "1.50x" in text  # step time


@pytest.mark.slow
def test_quick_run_writes_every_row_and_resumes(tmp_path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    results = tlm.run(tmp_path, quick=True)
    assert results["meta"]["complete"]
    for task in tlm.all_tasks_of(quick=True):
        settings = tlm.SETTINGS[task.settings]
        labels = [r["label"] for r in results["results"][task.name]["rows"]]
        assert labels == [s.label for s in settings]
    gpt2 = {r["label"]: r for r in results["results"]["gpt2"]["rows"]}
    assert gpt2[f"`{tlm.QUANT}`"]["saved_bytes"] < gpt2["exact"]["saved_bytes"]
    assert all(r["alternated_time_vs_exact"] > 0 for r in gpt2.values())  # timed in alternation
    text = (tmp_path / "report.md").read_text()
    assert "Within 3% of exact's validation loss" in text and "incomplete" not in text
    assert (tmp_path / "loss_vs_steps.png").exists() and (
        tmp_path / "quality_vs_bytes.png"
    ).exists()

    # a second run trains only what is missing on disk
    missing = next((tmp_path / "runs" / "vit").glob("exact-s0.json"))
    missing.unlink()
    trained = []
    real = tlm.train_run
    monkeypatch.setattr(tlm, "train_run", lambda *a: trained.append(a[1].label) or real(*a))
    again = tlm.run(tmp_path, quick=True)
    assert trained == ["exact"]
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["complete"]
    assert [r["label"] for r in again["results"]["vit"]["rows"]] == [s.label for s in settings]


def test_bench_data_root_reaches_the_suites(tmp_path, monkeypatch) -> None:
    """`randprop bench --data-root DIR` hands DIR to the suites as $RANDPROP_CIFAR10."""
    import randprop.experiments as experiments
    from randprop.cli import build_parser
    from randprop.experiments.registry import Suite

    seen = []

    def fake(out, quick):
        seen.append(os.environ.get("RANDPROP_CIFAR10"))
        (out / "report.md").write_text("ok")
        return {}

    monkeypatch.delenv("RANDPROP_CIFAR10", raising=False)
    monkeypatch.setattr(experiments, "get_suite", lambda name: Suite(name, fake, ""))
    tmp_path.joinpath("out").mkdir()
    for extra, expected in (([], None), (["--data-root", "/data/cifar"], "/data/cifar")):
        args = build_parser().parse_args(["bench", "x", "--out", str(tmp_path / "out"), *extra])
        assert args.fn(args) == 0
        assert seen[-1] == expected


def test_lr_factor_warms_up_then_decays_by_a_cosine() -> None:
    import dataclasses

    task = dataclasses.replace(_task(), steps=100, warmup=10, schedule="cosine")
    assert tlm.lr_factor(task, 0) == pytest.approx(0.1)  # warm-up 1/10, cosine still 1
    assert tlm.lr_factor(task, 50) == pytest.approx(0.5)
    assert 0 < tlm.lr_factor(task, 99) < 1e-3  # decayed to about 0 at the last step
    assert tlm.lr_factor(dataclasses.replace(task, schedule="constant"), 99) == 1.0
    with pytest.raises(ValueError, match="schedule must be 'constant' or 'cosine'; got 'step'"):
        tlm.lr_factor(dataclasses.replace(task, schedule="step"), 0)


def test_bench_tasks_option_passes_the_named_parts_and_refuses_others(tmp_path, monkeypatch):
    from randprop import experiments
    from randprop.cli import build_parser
    from randprop.experiments.registry import Suite

    seen = []

    def fake(out, quick, tasks=None):
        seen.append(tasks)
        (out / "report.md").write_text("ok")
        return {}

    suites = {"parts": Suite("parts", fake, "", ("a", "b")), "whole": Suite("whole", fake, "")}
    monkeypatch.setattr(experiments, "get_suite", suites.__getitem__)
    tmp_path.joinpath("out").mkdir()

    def bench(*extra: str) -> int:
        args = build_parser().parse_args(["bench", *extra, "--out", str(tmp_path / "out")])
        return args.fn(args)

    assert bench("parts", "--tasks", "b, a") == 0 and seen[-1] == ["b", "a"]
    assert bench("parts") == 0 and seen[-1] is None  # the suite's default: every task
    with pytest.raises(SystemExit, match="--tasks must name some of: a, b; got 'a,c'"):
        bench("parts", "--tasks", "a,c")
    with pytest.raises(SystemExit, match="none: this suite runs whole"):
        bench("whole", "--tasks", "a")


def test_task_names_are_the_suites_tasks() -> None:
    assert tuple(t.name for t in tlm.all_tasks_of(quick=False)) == tlm.TASK_NAMES
    assert {t.name for t in tlm.all_tasks_of(quick=True)} <= set(tlm.TASK_NAMES)
    with pytest.raises(ValueError, match="tasks must be among gpt2, llama, vit, resnet; got"):
        tlm.run(Path("unused"), quick=True, tasks=("gpt",))
