"""`randprop bench plan`: the verdict compares the plan with the best uniform setting in the task's
direction (accuracy up, loss down), seed by seed; a quick run covers every task, keeps the plans
within their budgets, reports unreachable budgets, and resumes from the runs on disk."""

from __future__ import annotations

import pytest

from randprop.experiments import plan_bench as pb
from randprop.experiments import transformer_lm as tlm


def _fake(plan: list[float], uni: list[float], error: str | None = None) -> tuple[dict, dict]:
    """Setups and records of 3 seeds: a plan and one uniform setting at 1/4, nothing fits below."""
    seeds = range(len(plan))
    budgets = {label: {"budget_bytes": 100 >> i, "plan": None, "plan_error": "n/a: minimum is 90 B",
                       "small_batch": 0} for i, label in enumerate(pb.BUDGET_LABELS)}  # fmt: skip
    budgets["1/4"] = {"budget_bytes": 100, "small_batch": 0, "plan_error": error,
                      "plan": None if error else {"total_variance": 0.5, "layers": {"0": "u"},
                                                  "checkpointing": False, "measured_bytes": 95}}  # fmt: skip
    setup = {"exact_bytes": 400, "minimum_bytes": 90, "fixed_bytes": 10, "plan_exact_bytes": 400,
             "uniform": {"u": [95, 1.0]}, "budgets": budgets}  # fmt: skip
    records = {}
    for s in seeds:
        for label, q in (("plan 1/4", plan[s]), ("uniform u", uni[s]), ("exact", 0.0),
                         ("checkpointing", 0.0)):  # fmt: skip
            if not (error and label.startswith("plan")):
                records[label, s] = {
                    "quality": q,
                    "saved_bytes": 95,
                    "batch": 8,
                    "seed": s,
                    "seconds_per_step": 1.0,
                }
    return dict.fromkeys(seeds, setup), records


def _verdict(name: str, plan: list[float], uni: list[float], error: str | None = None) -> str:
    setups, records = _fake(plan, uni, error)
    return pb.verdicts(name, pb.aggregate(name, list(setups), setups, records))[0]


def test_verdict_follows_the_direction_of_the_quality() -> None:
    # validation loss: lower is better; the seed-paired differences are all -0.02 or so
    line = _verdict("gpt2", [2.00, 2.10, 2.20], [2.02, 2.12, 2.21])
    assert "at least as good as" in line and "lower is better" in line and "-0.0167 nats" in line
    assert "beyond one std" in line  # the paired differences vary far less than their mean
    # the same numbers as accuracies: now the plan is behind
    line = _verdict("mlp", [0.9700, 0.9710, 0.9720], [0.9702, 0.9712, 0.9721])
    assert "**behind**" in line and "higher is better" in line and "-0.02 points" in line


def test_verdict_says_whether_the_gap_is_within_one_std() -> None:
    # paired differences -0.002, +0.004, -0.005: mean -0.001, std 0.0046
    line = _verdict("mlp", [0.970, 0.975, 0.980], [0.972, 0.971, 0.985])
    assert "**behind**" in line and "-0.10 points" in line
    assert "within one std of the seed-paired differences (0.46 points)" in line
    line = _verdict("gpt2", [2.1, 2.2, 2.3], [2.0, 2.1, 2.2])
    assert "**behind**" in line and "+0.1000 nats" in line and "beyond one std" in line


def test_more_than_three_seeds_also_give_the_first_three() -> None:
    line = _verdict("mlp", [0.970, 0.975, 0.980, 0.990, 0.990], [0.972, 0.971, 0.985, 0.980, 0.980])
    assert "+0.34 points" in line and "at least as good as" in line
    assert "over the first 3 seeds -0.10 points" in line


def test_unreachable_budget_is_reported_not_raised() -> None:
    setups, records = _fake([0.9] * 3, [0.9] * 3, error="n/a: minimum is 120 B (0.3 of exact)")
    result = pb.aggregate("mlp", [0, 1, 2], setups, records)
    assert result["budgets"][0]["plan"] is None
    assert "no plan: n/a: minimum is 120 B" in pb.verdicts("mlp", result)[0]
    assert "| n/a: minimum is 120 B (0.3 of exact) |" in "\n".join(pb.table("mlp", result))


@pytest.mark.slow
def test_quick_run_covers_every_task_and_resumes(tmp_path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    first = pb.run(tmp_path, quick=True)
    expected = list(pb.TASKS) if pb.has_transformers() else ["mlp", "cnn"]
    assert list(first["results"]) == expected
    text = (tmp_path / "report.md").read_text()
    if not pb.has_transformers():
        assert "Not run: the GPT-2-style language model" in text
    for result in first["results"].values():
        assert result["exact"] and result["checkpointing"]
        for row in result["budgets"]:
            if row["plan"] is None:
                assert row["plan_error"].startswith("n/a: minimum is")
            else:  # the planned model's measured bytes in training fit the budget
                assert row["plan"]["saved_bytes"] <= row["budget_bytes"]
    if "gpt2" in first["results"]:
        rows = first["results"]["gpt2"]["budgets"]
        assert rows[0]["plan"] is not None and rows[-1]["plan"] is None  # 1/32: below the fixed
        assert "lower is better" in text and "n/a: minimum is" in text

    # a second run trains only the runs missing on disk
    missing = ["mlp-exact-seed0.json"] + (["gpt2-plan-1-4-seed0.json"] if "gpt2" in expected
                                          else [])  # fmt: skip
    for name in missing:
        (tmp_path / "runs" / name).unlink()
    trained = []
    real_image, real_lm = pb.train, tlm.train_run
    monkeypatch.setattr(pb, "train", lambda cfg, **kw: trained.append(cfg.model) or
                        real_image(cfg, **kw))  # fmt: skip
    monkeypatch.setattr(tlm, "train_run", lambda task, *a: trained.append(task.name) or
                        real_lm(task, *a))  # fmt: skip
    again = pb.run(tmp_path, quick=True)
    assert trained == [name.split("-")[0] for name in missing]
    for name, result in again["results"].items():
        assert result["exact"]["quality"] == first["results"][name]["exact"]["quality"]


def test_without_transformers_the_language_model_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(pb, "has_transformers", lambda: False)
    result = pb.run(tmp_path, quick=True, tasks=("gpt2",))
    assert result["results"] == {}
    assert (
        "Not run: the GPT-2-style language model: the optional package transformers is not "
        "installed" in (tmp_path / "report.md").read_text()
    )


def test_unknown_tasks_are_named(tmp_path):
    with pytest.raises(ValueError, match="tasks must be among mlp, cnn, gpt2; got \\['vit'\\]"):
        pb.run(tmp_path, quick=True, tasks=("mlp", "vit"))
