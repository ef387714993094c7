"""`randprop train`, `randprop demo` and `randprop list` from the command line."""

from __future__ import annotations

import json

import pytest

from randprop.cli import main

CONTRACT = ("method", "model", "data", "batch", "steps", "seed", "test_accuracy", "train_loss",
            "saved_bytes", "peak_bytes", "wall_seconds")  # fmt: skip


def test_train_writes_the_contract_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--data", "mnist", "--method", "rad:keep=0.1",
            "--batch", "16", "--steps", "3", "--seed", "1", "--out", str(out), "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert all(key in summary for key in CONTRACT)
    assert summary["method"] == "rad:keep=0.1" and summary["steps"] == 3 and summary["seed"] == 1
    assert (out / "metrics.jsonl").exists() and (out / "checkpoint.pt").exists()
    assert json.loads(capsys.readouterr().out)["batch"] == 16
    assert main([*args, "--steps", "5", "--resume"]) == 0  # the last --steps wins
    assert json.loads((out / "summary.json").read_text())["steps"] == 5


def test_train_errors_are_one_line_with_the_choices(tmp_path, capsys):
    assert main(["train", "--method", "nope", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "choose from" in capsys.readouterr().err
    cifar = ["train", "--data", "cifar10", "--model", "rad-cnn-cifar", "--out", str(tmp_path)]
    assert main([*cifar, "--data-root", str(tmp_path)]) == 2
    assert "cs.toronto.edu" in capsys.readouterr().err


def test_list_shows_datasets_and_models(capsys):
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"mnist", "shakespeare", "cifar10"} <= set(listing["datasets"])
    assert {"mlp", "rad-cnn", "rad-cnn-cifar"} <= set(listing["models"])


def test_demo_writes_table_report_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "memory vs exact" in printed and "the memory-matched small batch" in printed
    report = (out / "report.md").read_text()
    assert "| checkpointing |" in report and "![test accuracy](accuracy.png)" in report
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((out / "results.json").read_text())
    assert [r["label"].split()[0] for r in rows] == ["exact", "RAD", "small", "checkpointing"]
    exact, rad, small, ckpt = rows
    assert rad["saved_bytes"] < exact["saved_bytes"] / 4  # keep 0.1 plus 1-bit masks
    assert small["saved_bytes"] <= rad["saved_bytes"] and small["batch"] < exact["batch"]
    assert ckpt["saved_bytes"] < exact["saved_bytes"]


def test_train_out_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    args = ["train", "--steps", "1", "--out", str(tmp_path / "file" / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lies below the file" in err and "Traceback" not in err


def test_train_with_a_method_that_converts_nothing_is_one_line(tmp_path, capsys):
    assert main(["train", "--method", "trace", "--steps", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'trace' converts no layer of model 'mlp'" in err


@pytest.mark.parametrize(
    "argv, flag, low",
    [
        (["memory", "--batch", "0"], "--batch", 1),
        (["check", "--batch", "-3"], "--batch", 1),
        (["check", "--draws", "1"], "--draws", 2),
        (["train", "--batch", "0"], "--batch", 1),
        (["train", "--steps", "0"], "--steps", 1),
        (["train", "--log-every", "-1"], "--log-every", 0),
        (["train", "--threads", "two"], "--threads", 0),
        (["demo", "--steps", "0"], "--steps", 1),
    ],
)
def test_integer_flags_out_of_range_name_the_flag_and_range(argv, flag, low, tmp_path, capsys):
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}: must be an integer >= {low}" in capsys.readouterr().err
