"""The demo: what RAD buys on MNIST beside what a user would do otherwise.

Trains the RAD paper's MLP (784-300-300-300-10) for the same number of iterations with exact
backprop, RAD (keep 0.1), the small batch whose measured saved bytes match RAD's, and activation
checkpointing; prints the table and writes report.md, results.json and accuracy.png.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from randprop.data import load_dataset
from randprop.train.compare import plot_curves, read_curve, table, with_ratios
from randprop.train.config import TrainConfig
from randprop.train.loop import train

RUNS = (
    ("exact", {"method": "exact"}),
    ("RAD keep 0.1", {"method": "rad:keep=0.1"}),
    ("small batch (RAD's memory)", {"method": "exact", "match_memory_of": "rad:keep=0.1"}),
    ("checkpointing", {"method": "checkpoint"}),
)


def run_demo(
    out: Path, steps: int = 2000, batch: int = 150, seed: int = 0, threads: int = 1
) -> list[dict]:
    """Train the four runs on MNIST, write the report under ``out``, return the summary rows.

    threads=1: on two shared cores a second spinning OpenMP thread made steps 10x slower.
    """
    out.mkdir(parents=True, exist_ok=True)
    splits = load_dataset("mnist", seed=seed)
    rows = []
    for label, overrides in RUNS:
        print(f"training {label} ...", flush=True)
        cfg = TrainConfig(
            model="mlp",
            data="mnist",
            batch=batch,
            steps=steps,
            seed=seed,
            optimizer="adam",
            lr=1e-3,
            eval_every=max(steps // 10, 1),
            log_every=max(steps // 20, 1),
            out=str(out / label.split(" ")[0].lower()),
            threads=threads,
            **overrides,
        )
        summary = train(cfg, splits=splits)
        rows.append({"label": label, "run_dir": cfg.out, **summary})
    with_ratios(rows, rows[0])
    curves = {r["label"]: read_curve(Path(r["run_dir"])) for r in rows}
    plot_curves(curves, out / "accuracy.png", f"MNIST MLP 3x300, {steps} iterations")
    report(out, rows, steps)
    return rows


def report(out: Path, rows: list[dict], steps: int) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, load average {load:.2f}"
    )
    rad, small = rows[1], rows[2]
    verdict = "beat" if rad["test_accuracy"] > small["test_accuracy"] else "did not beat"
    text = "\n".join(
        [
            "# randprop demo: RAD against what you would do otherwise (MNIST)",
            "",
            f"Command: `randprop demo --steps {steps}`; {time.strftime('%Y-%m-%d %H:%M')}; "
            f"{machine}.",
            "",
            f"MLP 784-300-300-300-10, Adam lr 1e-3, {steps} iterations each, one seed, "
            f"{rows[0]['threads']} torch thread(s). "
            "Saved bytes: activation memory held for backward, measured by `rp.track_saved` "
            "(for checkpointing: held block inputs plus the largest recomputed block). Time: "
            "median seconds per training step; the runs are sequential, so on a busy machine the "
            "time ratios carry the load's drift (see the load average above).",
            "",
            table(rows),
            "",
            f"At the same memory (batch {small['batch']} saves {small['saved_bytes']:,} bytes, RAD "
            f"{rad['saved_bytes']:,}), RAD {verdict} the small batch after {steps} iterations "
            f"({rad['test_accuracy']:.4f} vs {small['test_accuracy']:.4f}, one seed).",
            "",
            "![test accuracy](accuracy.png)",
            "",
        ]
    )
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print()
    print(table(rows))
    print(f"\nRAD {verdict} the memory-matched small batch. Report: {out / 'report.md'}")
