"""MEM-DFA's experiments (Chu et al., 2020): MNIST accuracy and the memory / time profile in depth.

- accuracy: BP, FA, DFA and MEM-DFA train the paper's 784-100-30-10 MLP (several seeds) and a
  small conv net on MNIST with Adam and a one-cycle schedule (warm-up, cosine decay); test
  accuracy at the end.
- depth: MLPs of 2..32 hidden layers of width 256; one training step (forward, loss, backward) of
  BP, activation checkpointing (ceil(sqrt(depth + 1)) segments of the blocks), FA (B stored / regenerated), DFA and
  MEM-DFA: peak bytes saved for backward (rp.track_saved over the whole step), peak bytes held
  during the step (randprop.measure.peak.track_peak: parameters, gradients, batch, feedback
  matrices, what autograd saves and every temporary), the resident memory of a fresh subprocess
  per point (Linux only) and median step time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from randprop.checkpointing import install_checkpointing
from randprop.experiments import report
from randprop.experiments.registry import quick_splits, suite
from randprop.measure.peak import state_tensors, track_peak
from randprop.measure.saved import track_saved
from randprop.models import build_model
from randprop.models.feedforward import mlp
from randprop.random import derive_seed, generator
from randprop.rules import DFA, FA, MemDFA
from randprop.train import TrainConfig, train
from randprop.train.loop import epoch_batches, permutations

RULES = ("bp", "fa", "dfa", "memdfa")
DEPTH_METHODS = ("bp", "checkpoint", "fa", "fa-regen", "dfa", "memdfa")

# Scaled to ~15 min of one CPU core (the paper: batch 10, 20 epochs).
FULL = {
    "mlp": {"model": "dfa-mlp", "kwargs": {}, "seeds": (0, 1, 2), "epochs": 12, "batch": 32},
    "cnn": {
        "model": "dfa-cnn",
        "kwargs": {"channels": (8, 16)},
        "seeds": (0,),
        "epochs": 2,
        "batch": 64,
    },
    "lr": 2e-3,
    "train_subset": None,
    "depths": (2, 4, 8, 16, 32),
    "width": 256,
    "depth_batch": 1024,
    "repeats": 5,
}
# a smoke run of every row, table and plot: the first ``examples`` of each split, one depth
QUICK = FULL | {
    "mlp": FULL["mlp"] | {"seeds": (0,), "epochs": 1},
    "cnn": FULL["cnn"] | {"epochs": 1},
    "train_subset": 256,
    "examples": 256,
    "depths": (2,),
    "width": 32,
    "depth_batch": 16,
    "repeats": 1,
    "resident_methods": ("memdfa",),  # the fresh-process measurement of one method only
}


# --- accuracy ---------------------------------------------------------------------------------


def _install(
    rule: str, model: nn.Module, seed: int
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A function running one forward + backward of ``rule`` on a batch."""
    if rule == "memdfa":
        mem = MemDFA(model, F.cross_entropy, seed=seed)
        return mem.backward
    if rule == "fa":
        FA(model, seed=seed)
    elif rule == "dfa":
        DFA(model, seed=seed)
    elif rule != "bp":
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return lambda x, y: F.cross_entropy(model(x), y).backward()


def train_run(splits, plan: dict, rule: str, seed: int, lr: float, subset: int | None) -> dict:
    """Train one model with one rule; the global RNG (init, dropout) is forked and seeded."""
    x_all, y_all = splits.train.tensors
    if subset is not None:
        x_all, y_all = x_all[:subset], y_all[:subset]
        splits = dataclasses.replace(splits, train=TensorDataset(x_all, y_all))
    n, batch, epochs = len(y_all), plan["batch"], plan["epochs"]
    order = permutations(n, generator(derive_seed(seed, 0, 0)))
    cfg = TrainConfig(model=plan["model"], method="exact" if rule == "bp" else rule, batch=batch,
                      steps=epochs * math.ceil(n / batch), seed=seed, lr=lr,
                      schedule="onecycle", log_every=0, eval_batch=2000, progress=False)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(plan["model"], **plan["kwargs"])
        summary = train(cfg, splits=splits, model=model,
                        batches=epoch_batches(n, batch, order, drop_last=False))  # fmt: skip
    return {
        "model": plan["model"],
        "rule": rule,
        "seed": seed,
        "epochs": epochs,
        "batch": batch,
        "train_examples": n,
        "val_accuracy": summary["val_accuracy"],
        "test_accuracy": summary["test_accuracy"],
        "seconds": summary["wall_seconds"],
    }


def accuracy_table(cfg: dict) -> list[dict]:
    from randprop.data import load_dataset

    splits = load_dataset("mnist", seed=0)
    if "examples" in cfg:
        splits = quick_splits(splits, cfg["examples"])
    rows = []
    for key in ("mlp", "cnn"):
        plan = cfg[key]
        for seed in plan["seeds"]:
            for rule in RULES:
                rows.append(train_run(splits, plan, rule, seed, cfg["lr"], cfg["train_subset"]))
                print(json.dumps(rows[-1]), flush=True)
    return rows


# --- memory and time against depth -------------------------------------------------------------


def depth_step(method: str, model: nn.Sequential, depth: int) -> Callable:
    """One training step (forward, loss, backward) of ``method`` on an MLP of ``depth``."""
    if method == "checkpoint":
        install_checkpointing(model)
        return lambda x, y: F.cross_entropy(model(x), y).backward()
    if method == "fa-regen":
        FA(model, store=False)
        return lambda x, y: F.cross_entropy(model(x), y).backward()
    return _install(method, model, seed=0)


def _depth_setup(method: str, depth: int, width: int, batch: int):
    with torch.random.fork_rng():
        torch.manual_seed(depth)
        model = mlp(hidden=width, depth=depth)
    gen = generator(derive_seed(depth, 1, 0))
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, depth_step(method, model, depth), x, y


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_peak(method: str, depth: int, width: int, batch: int) -> dict:
    """Peak resident memory (Linux VmHWM) of one step in this (fresh) process and the resident
    memory before it; the high-water mark is reset just before the step (/proc/self/clear_refs),
    so import-time transients do not hide it. None for both where Linux's counters are missing."""
    torch.set_num_threads(1)
    model, step, x, y = _depth_setup(method, depth, width, batch)
    step(x[:2], y[:2])  # warm-up on two examples: lazy initialisation is not the step's memory
    model.zero_grad(set_to_none=True)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return {"before": None, "peak": None}
    before = _proc_status("VmRSS")
    step(x, y)
    peak = _proc_status("VmHWM")
    return {"before": before, "peak": peak if before is not None else None}


# glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay in a
# fragmented heap and the resident peak grows with the number of allocations rather than with
# what is held; pinning the threshold (at its default value) returns them to the system.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _resident_peak_in_child(
    method: str, depth: int, width: int, batch: int, env: dict | None = None
) -> dict:
    code = (
        "import json; from randprop.experiments.feedback import resident_peak; "
        f"print(json.dumps(resident_peak({method!r}, {depth}, {width}, {batch})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _increase(resident: dict) -> int | None:
    return None if resident["peak"] is None else resident["peak"] - resident["before"]


def depth_table(cfg: dict) -> list[dict]:
    rows = []
    width, batch = cfg["width"], cfg["depth_batch"]
    for depth in cfg["depths"]:
        for method in DEPTH_METHODS:
            model, step, x, y = _depth_setup(method, depth, width, batch)
            with track_peak([*state_tensors(model), x, y]) as peak, track_saved(model) as saved:
                step(x, y)
            times = []
            for i in range(cfg["repeats"] + 1):
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                step(x, y)
                if i:  # the first is a warm-up
                    times.append(time.perf_counter() - start)
            resident = default = {"before": None, "peak": None}
            if method in cfg.get("resident_methods", DEPTH_METHODS):
                resident = _resident_peak_in_child(method, depth, width, batch, FIXED_MALLOC)
                default = _resident_peak_in_child(method, depth, width, batch)
            rows.append(
                {
                    "method": method,
                    "depth": depth,
                    "width": width,
                    "batch": batch,
                    "saved_bytes": saved.bytes,
                    "peak_bytes": peak.bytes,
                    "resident_peak_bytes": resident["peak"],
                    "step_resident_increase_bytes": _increase(resident),
                    "step_resident_increase_default_malloc_bytes": _increase(default),
                    "step_seconds": statistics.median(times),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    by_key = {(r["method"], r["depth"]): r for r in rows}
    for r in rows:
        bp = by_key[("bp", r["depth"])]
        r["saved_vs_bp"] = r["saved_bytes"] / bp["saved_bytes"]
        r["time_vs_bp"] = r["step_seconds"] / bp["step_seconds"]
    return rows


# --- report -----------------------------------------------------------------------------------


def _summary(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["model"], r["rule"]) for r in rows):
        accs = [r["test_accuracy"] for r in rows if (r["model"], r["rule"]) == key]
        out.append(
            {
                "model": key[0],
                "rule": key[1],
                "runs": len(accs),
                "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "min": min(accs),
            }
        )
    return out


def _claims(summary: list[dict], depth: list[dict]) -> list[str]:
    acc = {(s["model"], s["rule"]): s for s in summary}
    lines, names = [], {"dfa": "DFA", "memdfa": "MEM-DFA"}
    for rule in ("dfa", "memdfa"):
        s = acc[("dfa-mlp", rule)]
        held = "held" if s["min"] >= 0.97 else "did NOT hold"
        lines.append(
            f"- {names[rule]} >= 97% test accuracy on the MLP: {held} "
            f"(mean {s['mean']:.2%}, worst seed {s['min']:.2%}, {s['runs']} seeds)."
        )
    bp = acc[("dfa-mlp", "bp")]
    lines.append(f"- Backprop about 98%: mean {bp['mean']:.2%} (worst seed {bp['min']:.2%}).")
    saved = {(r["method"], r["depth"]): r["saved_bytes"] for r in depth}
    lo, hi = min(r["depth"] for r in depth), max(r["depth"] for r in depth)
    mem, bpg = saved[("memdfa", hi)] / saved[("memdfa", lo)], saved[("bp", hi)] / saved[("bp", lo)]
    lines.append(
        f"- MEM-DFA's peak saved bytes at depth {hi} <= 1.25x depth {lo}: "
        f"{'held' if mem <= 1.25 else 'did NOT hold'} ({mem:.2f}x); backprop's grow >= 5x: "
        f"{'held' if bpg >= 5 else 'did NOT hold'} ({bpg:.2f}x)."
    )
    return lines


def plot(depth: list[dict], path: Path) -> None:
    plt = report.pyplot()

    fields = (
        ("saved_bytes", "peak saved for backward (MiB)", 2**20),
        ("peak_bytes", "peak held during the step (MiB)", 2**20),
        ("step_seconds", "step time (s)", 1),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (field, label, unit) in zip(axes, fields, strict=True):
        for method in DEPTH_METHODS:
            pts = [(r["depth"], r[field] / unit) for r in depth if r["method"] == method]
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden layers (width 256)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"MLP 784-256x d-10, batch {depth[0]['batch']}: one training step against depth")
    report.save_figure(fig, path, dpi=110)


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def write_report(out: Path, results: dict, quick: bool) -> None:
    cfg = results["config"]
    lines = [
        "# MEM-DFA: MNIST accuracy and memory against depth (BP, checkpointing, FA, DFA, MEM-DFA)",
        "",
        f"Command: `randprop bench feedback --out {out}{' --quick' if quick else ''}`  ",
        f"Machine: {results['machine']}; date {results['date']}; load before / after: "
        f"{results['load_before']} / {results['load_after']}; wall {results['wall_seconds']:.0f} s.",
        "",
        "## Claims",
        "",
        *_claims(results["accuracy_summary"], results["depth"]),
        "- One MEM-DFA step equals one DFA step (same seed, state, batch): tests/rules/test_rules.py; "
        "here the DFA and MEM-DFA runs of each seed follow the same trajectory.",
        "",
        "## Scale",
        "",
        f"Scaled to ~15 min of CPU (the paper: batch 10, 20 epochs). MLP 784-100-30-10: "
        f"{cfg['mlp']['epochs']} epochs, batch {cfg['mlp']['batch']}, seeds "
        f"{list(cfg['mlp']['seeds'])}. Conv net (channels {list(cfg['cnn']['kwargs']['channels'])},"
        f" conv-BN-ReLU-maxpool x2, FC 128 + dropout 0.2): {cfg['cnn']['epochs']} epochs, batch "
        f"{cfg['cnn']['batch']}, seeds {list(cfg['cnn']['seeds'])}. Adam, one-cycle schedule "
        f"(max lr {cfg['lr']}); training examples: "
        f"{cfg['train_subset'] or 'all 54,000'} (6,000 held out for validation); test: 10,000. "
        "Feedback matrices He-normal, fixed per seed; one intra-op thread.",
        "",
        "## MNIST test accuracy",
        "",
        "| model | rule | seeds | mean | std | worst |",
        "|---|---|---|---|---|---|",
    ]
    for s in results["accuracy_summary"]:
        lines.append(
            f"| {s['model']} | {s['rule']} | {s['runs']} | {s['mean']:.2%} | {s['std']:.2%} "
            f"| {s['min']:.2%} |"
        )
    lines += ["", "| model | rule | seed | val | test | seconds |", "|---|---|---|---|---|---|"]
    for r in results["accuracy"]:
        lines.append(
            f"| {r['model']} | {r['rule']} | {r['seed']} | {r['val_accuracy']:.2%} "
            f"| {r['test_accuracy']:.2%} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "## One training step against depth (MLP, hidden width 256)",
        "",
        f"Batch {cfg['depth_batch']}. saved: peak bytes held for backward at once over forward, "
        "loss and backward (rp.track_saved; parameters excluded). peak: the most tensor bytes "
        "held at once during the step (randprop.measure.peak.track_peak: parameters, their "
        "gradients, the batch, stored feedback matrices, what autograd saves and every "
        "temporary; not the Python heap). resident: peak resident memory of a fresh process "
        "during one step (Linux VmHWM, reset just before the step, after a two-example warm-up "
        "step; n/a elsewhere), and its increase over the resident memory before the step, "
        "with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=131072) and, last "
        "column, with the default dynamic threshold (heap fragmentation then inflates the "
        "peak of rules that allocate and free per block). The increase includes the parameter "
        "gradients (0.25 MiB per hidden layer) and, for DFA, all B_l e at once (one block "
        "output per hidden layer) in its backward. time: median of "
        f"{cfg['repeats']} steps after a warm-up. checkpoint: train.baselines' checkpointing "
        "(non-reentrant torch.utils.checkpoint over ceil(sqrt(depth + 1)) segments of the "
        "Linear + ReLU blocks). fa-regen: FA regenerating B in every backward.",
        "",
        "![depth profile](depth_profile.png)",
        "",
        "| method | depth | saved MiB | saved / BP | peak MiB | resident peak MiB "
        "| resident increase MiB | step s | time / BP | increase, default malloc MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["depth"]:
        lines.append(
            f"| {r['method']} | {r['depth']} | {_mib(r['saved_bytes'])} | {r['saved_vs_bp']:.2f} "
            f"| {_mib(r['peak_bytes'])} | {_mib(r['resident_peak_bytes'])} "
            f"| {_mib(r['step_resident_increase_bytes'])} "
            f"| {r['step_seconds']:.4f} | {r['time_vs_bp']:.2f} "
            f"| {_mib(r['step_resident_increase_default_malloc_bytes'])} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")


@suite("feedback", "MEM-DFA: MNIST accuracy of BP/FA/DFA/MEM-DFA; memory and time against depth")
def run(out: Path, quick: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cfg = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start, load_before = time.perf_counter(), report.load()
    try:
        depth = depth_table(cfg)
        acc = accuracy_table(cfg)
    finally:
        torch.set_num_threads(threads)
    results = {
        "machine": report.machine(1),
        "date": report.date(),
        "load_before": load_before,
        "load_after": report.load(),
        "wall_seconds": time.perf_counter() - start,
        "config": cfg,
        "accuracy": acc,
        "accuracy_summary": _summary(acc),
        "depth": depth,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(depth, out / "depth_profile.png")
    write_report(out, results, quick)
    return results
