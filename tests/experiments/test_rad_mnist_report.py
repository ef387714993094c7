"""The rad-mnist suite's aggregation and verdicts (the training itself is tested in test_train)."""

from __future__ import annotations

import pytest

from randprop.experiments.rad_mnist import (
    aggregate,
    conv_data,
    conv_verdict,
    first_reaching,
    headline,
    verdicts,
)


def summary(seed: int, curve: list[float], batch: int = 150, saved: int = 100) -> dict:
    steps = [10 * (i + 1) for i in range(len(curve))]
    return {"seed": seed, "method": "m", "batch": batch, "lr": 1e-3, "saved_bytes": saved,
            "seconds_per_step": 0.01 * (seed + 1), "test_accuracy": curve[-1],
            "curve": list(zip(steps, curve, strict=True))}  # fmt: skip


def rows(rad_curves, small_curves) -> dict:
    out = {
        "small batch": aggregate(
            "small batch", [summary(i, c, 18) for i, c in enumerate(small_curves)]
        )
    }
    for label in ("RAD sample", "RAD project"):
        out[label] = aggregate(label, [summary(i, c) for i, c in enumerate(rad_curves)])
    return out


def test_aggregate_means_and_stds_over_seeds():
    row = aggregate("x", [summary(0, [0.5, 0.8]), summary(1, [0.7, 0.9])])
    assert row["curve_mean"] == pytest.approx([0.6, 0.85])
    assert row["test_accuracy"] == pytest.approx(0.85)
    assert row["test_accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert row["seconds_per_step"] == pytest.approx(0.015)
    assert first_reaching(row, 0.8) == 20 and first_reaching(row, 0.95) is None


def test_verdict_says_which_way_it_came_out():
    won = verdicts(rows([[0.8, 0.95], [0.82, 0.96]], [[0.6, 0.9], [0.62, 0.91]]))
    assert all("beat the memory-matched" in v and "did not" not in v for v in won)
    assert "a clear margin" in won[0] and "iteration 20" in won[0]
    assert "higher at 2 of 2 evaluations" in won[0]
    lost = verdicts(rows([[0.5, 0.85], [0.52, 0.86]], [[0.6, 0.9], [0.62, 0.91]]))
    assert all("did not beat" in v and "never reached" in v for v in lost)


def test_conv_verdict():
    conv = [
        {"label": "RAD sample", "test_accuracy": 0.90},
        {"label": "small batch", "batch": 91, "test_accuracy": 0.95},
    ]
    assert "RAD sample did not beat" in conv_verdict(conv)
    conv[0]["test_accuracy"] = 0.96
    assert "RAD sample beat" in conv_verdict(conv)


def test_headline_answers_for_both_variants():
    text = headline(rows([[0.8, 0.95], [0.82, 0.96]], [[0.6, 0.9], [0.62, 0.91]]), [])
    assert text.count(" beat it (a clear margin") == 2
    text = headline(rows([[0.5, 0.85], [0.52, 0.86]], [[0.6, 0.9], [0.62, 0.91]]), [])
    assert text.count("did not beat it") == 2


def test_conv_runs_use_cifar10_when_its_files_are_given(tmp_path, monkeypatch):
    monkeypatch.setenv("RANDPROP_CIFAR10", str(tmp_path))
    assert conv_data() == ("mnist", "rad-cnn")
    for name in ("data_batch_1", "test_batch"):
        (tmp_path / name).write_bytes(b"")
    assert conv_data() == ("cifar10", "rad-cnn-cifar")
