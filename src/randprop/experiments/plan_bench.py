"""rp.plan against the uniform settings and the baselines at equal bytes (the [plan] suite).

For the MNIST MLP and the small CNN, per seed: rp.plan's measurements on the first training
batch of the seeded model, then at budgets of 1/4, 1/8, 1/16 and 1/32 of exact's saved bytes:
- the plan: the per-layer methods of least total relative gradient variance that fit;
- the best uniform setting that fits: the UNIFORM_TOP settings of rp.plan's candidates of least
  total relative variance whose bytes fit (chosen on seed 0's measurements, then the same for
  every seed), each trained, and the most accurate (mean over seeds) reported;
- the memory-matched small batch: exact backprop at the largest batch whose measured saved
  bytes fit the budget;
and once per seed exact backprop and activation checkpointing (its bytes do not depend on a
budget). All train the same iterations with the same optimizer; test accuracy after the last.
The GPT-2-style language model of the issue is not run: randprop has no such built-in model yet.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from randprop.data import load_dataset
from randprop.experiments import report
from randprop.experiments.registry import quick_splits, suite
from randprop.plan import choose, measure, uniform
from randprop.train import TrainConfig, train
from randprop.train.baselines import largest_batch, saved_bytes_of
from randprop.train.loop import build_seeded, loss_fn

BUDGETS = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
BUDGET_LABELS = ("1/4", "1/8", "1/16", "1/32")
UNIFORM_TOP = 2
NETS = {"mlp": {"batch": 150, "lr": 2e-3}, "cnn": {"batch": 64, "lr": 1e-3}}
FULL = {"steps": {"mlp": 2000, "cnn": 400}, "seeds": (0, 1, 2), "draws": 8,
        "candidates": None}  # fmt: skip
QUICK = {
    "steps": {"mlp": 2, "cnn": 1},
    "seeds": (0,),
    "draws": 2,
    "candidates": (
        "exact",
        "rad:keep=0.1",
        "rad:keep=0.05,bits=1",
        "quant:bits=2",
        "trace:probes=4",
    ),  # fmt: skip
    "examples": 200,
}


def _train(net: str, splits, p: dict, seed: int, runs: Path, tag: str, **kw) -> dict:
    cfg = TrainConfig(model=net, data=splits.name, steps=p["steps"][net], seed=seed,
                      optimizer="adam", threads=1, progress=False, log_every=0,
                      out=str(runs / f"{net}-{tag}-{seed}"),
                      **{**NETS[net], **kw})  # fmt: skip
    return train(cfg, splits=splits)


def _first_batch(splits, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = splits.train.tensors
    first = torch.arange(min(n, len(x)))  # index copies, as the training loop takes them
    return x[first], y[first]


def _small_batch(net: str, seed: int, x, y, budget: int) -> int:
    """The largest batch whose exact saved bytes fit ``budget`` (0: none)."""
    model = build_seeded(net, seed)

    def fits(b: int) -> bool:
        xb, yb = x[:b].clone(), y[:b].clone()
        return saved_bytes_of(lambda: model, "exact", xb, yb, loss_fn, seed) <= budget

    return largest_batch(fits, len(x))


def _uniform_choices(found, budget: int) -> list[dict]:
    """The UNIFORM_TOP fitting uniform settings (measured whole) of least total variance."""
    rows = []
    for method in found.uniform_bytes:  # the candidates that convert a layer of the net
        if method == "exact":
            continue
        size, variance = uniform(found, method)
        if size <= budget:
            rows.append({"method": method, "predicted_bytes": size, "variance": variance})
    return sorted(rows, key=lambda r: r["variance"])[:UNIFORM_TOP]


def _aggregate(summaries: list[dict]) -> dict:
    accs = [s["test_accuracy"] for s in summaries]
    return {
        "test_accuracy": float(np.mean(accs)),
        "test_accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
        "saved_bytes": max(s["saved_bytes"] for s in summaries),
        "batch": summaries[0]["batch"],
        "seeds": [s["seed"] for s in summaries],
    }


def run_net(net: str, splits, p: dict, runs: Path) -> dict:
    """Every run of ``net``, seed by seed; aggregated per budget and setting."""
    batch = NETS[net]["batch"]
    x, y = _first_batch(splits, batch)
    per: dict[str, list[dict]] = {}
    plans: dict[str, list[dict]] = {}
    uniforms: dict[str, list[dict]] = {}
    info: dict[str, dict] = {}
    exact_bytes = None
    for seed in p["seeds"]:
        model = build_seeded(net, seed)
        found = measure(copy.deepcopy(model), lambda m: loss_fn(m(x), y),
                        candidates=p["candidates"], draws=p["draws"], seed=seed)  # fmt: skip
        exact_bytes = found.exact_bytes
        per.setdefault("exact", []).append(_train(net, splits, p, seed, runs, "exact",
                                                  method="exact"))  # fmt: skip
        per.setdefault("checkpointing", []).append(
            _train(net, splits, p, seed, runs, "ckpt", method="checkpoint"))  # fmt: skip
        for label, fraction in zip(BUDGET_LABELS, BUDGETS, strict=True):
            budget = math.floor(fraction * found.exact_bytes)
            entry = info.setdefault(label, {"budget_bytes": budget, "minimum_bytes":
                                            found.minimum_bytes()})  # fmt: skip
            if seed == p["seeds"][0]:
                entry["uniform"] = _uniform_choices(found, budget)
            try:
                planned = choose(found, budget)
            except ValueError as err:  # below the smallest total: said in the report
                entry["plan_error"], planned = str(err), None
            if planned is not None:
                summary = _train(net, splits, p, seed, runs, f"plan-{fraction:g}",
                                 method=planned.methods)  # fmt: skip
                summary["total_variance"] = planned.total_variance
                summary["methods"] = {c.name: c.method for c in planned.layers}
                plans.setdefault(label, []).append(summary)
            for i, u in enumerate(entry["uniform"]):
                s = _train(net, splits, p, seed, runs, f"uniform{i}-{fraction:g}",
                           method=u["method"])  # fmt: skip
                s["total_variance"] = uniform(found, u["method"])[1]
                uniforms.setdefault(f"{label}|{u['method']}", []).append(s)
            small = _small_batch(net, seed, x, y, budget)
            entry["small_batch"] = small
            if small:
                per.setdefault(f"small{label}", []).append(
                    _train(net, splits, p, seed, runs, f"small-{fraction:g}", method="exact",
                           batch=small))  # fmt: skip
    rows = []
    for label in BUDGET_LABELS:
        entry = info[label]
        row = {"budget": label, **entry}
        if label in plans:
            row["plan"] = {**_aggregate(plans[label]),
                           "total_variance": float(np.mean([s["total_variance"]
                                                            for s in plans[label]])),
                           "methods": plans[label][0]["methods"]}  # fmt: skip
        candidates = []
        for u in entry["uniform"]:
            runs_u = uniforms.get(f"{label}|{u['method']}", [])
            if runs_u:
                candidates.append({"method": u["method"], **_aggregate(runs_u),
                                   "total_variance": float(np.mean([s["total_variance"]
                                                                    for s in runs_u]))})  # fmt: skip
        row["uniform_runs"] = candidates
        row["best_uniform"] = max(candidates, key=lambda r: r["test_accuracy"], default=None)
        if f"small{label}" in per:
            row["small"] = _aggregate(per[f"small{label}"])
        rows.append(row)
    return {"exact_bytes": exact_bytes, "exact": _aggregate(per["exact"]),
            "checkpointing": _aggregate(per["checkpointing"]), "budgets": rows}  # fmt: skip


def verdicts(net: str, result: dict) -> list[str]:
    """Per budget: whether the plan is at least as accurate as the best uniform setting."""
    lines = []
    for row in result["budgets"]:
        plan, best = row.get("plan"), row["best_uniform"]
        if plan is None:
            lines.append(f"- {net}, {row['budget']}: no plan: {row['plan_error']}")
        elif best is None:
            lines.append(f"- {net}, {row['budget']}: plan {plan['test_accuracy']:.4f}; no "
                         "uniform setting fits this budget")  # fmt: skip
        else:
            diff = 100 * (plan["test_accuracy"] - best["test_accuracy"])
            word = "at least as accurate as" if diff >= 0 else "**less accurate than**"
            lines.append(
                f"- {net}, {row['budget']}: the plan ({plan['test_accuracy']:.4f}) is {word} the "
                f"best uniform setting `{best['method']}` ({best['test_accuracy']:.4f}), "
                f"{diff:+.2f} points"
            )
    return lines


def _cell(r: dict | None) -> str:
    if r is None:
        return "n/a"
    return f"{r['test_accuracy']:.4f} ± {r['test_accuracy_std']:.4f}"


def table(result: dict) -> list[str]:
    exact = result["exact_bytes"]
    header = ["budget", "bytes", "plan", "plan bytes", "plan rel var", "best uniform",
              "uniform bytes", "uniform rel var", "small batch", "checkpointing"]  # fmt: skip
    rows = []
    for row in result["budgets"]:
        plan, best, small = row.get("plan"), row["best_uniform"], row.get("small")
        rows.append([
            row["budget"], f"{row['budget_bytes']:,}", _cell(plan),
            "n/a" if plan is None else f"{plan['saved_bytes'] / exact:.4f}",
            "n/a" if plan is None else f"{plan['total_variance']:.3g}",
            "n/a" if best is None else f"{_cell(best)} `{best['method']}`",
            "n/a" if best is None else f"{best['saved_bytes'] / exact:.4f}",
            "n/a" if best is None else f"{best['total_variance']:.3g}",
            "none fits" if small is None else f"{_cell(small)} (batch {small['batch']})",
            _cell(result["checkpointing"]),
        ])  # fmt: skip
    return report.markdown_table(header, rows)


def plot(results: dict[str, dict], path: Path) -> str:
    """Test accuracy against the budget (fraction of exact's saved bytes), one panel per net."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, (net, result) in zip(axes[0], results.items(), strict=True):
        rows = result["budgets"]
        for key, label in (("plan", "rp.plan"), ("best_uniform", "best uniform"),
                           ("small", "small batch")):  # fmt: skip
            pts = [(f, r[key]) for f, r in zip(BUDGETS, rows, strict=True) if r.get(key)]
            if pts:
                ax.errorbar([f for f, _ in pts], [r["test_accuracy"] for _, r in pts],
                            yerr=[r["test_accuracy_std"] for _, r in pts], marker="o",
                            capsize=3, label=label)  # fmt: skip
        for key, style in (("exact", "--"), ("checkpointing", ":")):
            r = result[key]
            ax.axhline(r["test_accuracy"], linestyle=style, color="gray",
                       label=f"{key} ({r['saved_bytes'] / result['exact_bytes']:.2f} of exact)")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget: fraction of exact's saved bytes")
        ax.set_ylabel("test accuracy")
        ax.set_title(net)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return report.save_figure(fig, path, dpi=110)


def write_report(out: Path, results: dict[str, dict], p: dict, meta: dict) -> str:
    lines = [
        "# rp.plan: per-layer estimators under a byte budget, against uniform settings",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['date']}; load average {meta['load_before']} at the "
        f"start, {meta['load_after']} at the end; {meta['minutes']:.1f} min wall.",
        "",
        *[line for net, result in results.items() for line in verdicts(net, result)],
        "",
        "Set-up: Adam with a constant learning rate (MLP 2e-3, CNN 1e-3), "
        + ", ".join(
            f"{net} batch {NETS[net]['batch']}, {p['steps'][net]} iterations" for net in results
        )  # fmt: skip
        + f", seeds {list(p['seeds'])}; test accuracy (mean ± std over seeds) on the MNIST test "
        "set after the last iteration. Budgets are fractions of exact's saved bytes on the "
        "training batch (measured by `rp.track_saved`); the bytes columns are the runs' measured "
        "saved bytes as fractions of exact's. rp.plan measures every candidate's bytes and "
        f"relative gradient variance ({p['draws']} draws) on the seed's model and first batch, "
        f"then solves the knapsack exactly. Best uniform: the {UNIFORM_TOP} fitting uniform "
        "settings of least total relative variance (from seed 0's measurements) are trained; the "
        "more accurate is shown. Small batch: exact backprop at the largest batch that fits. "
        "Checkpointing does not depend on the budget (its bytes are in the plot's legend). "
        "Not run: the GPT-2-style language model (randprop has no such built-in model yet).",
        "",
    ]
    for net, result in results.items():
        lines += [f"## {net}", "", f"Exact: {_cell(result['exact'])}, "
                  f"{result['exact_bytes']:,} saved bytes.", "", *table(result), ""]  # fmt: skip
        lines += ["Plans (seed 0):", ""]
        for row in result["budgets"]:
            if row.get("plan"):
                lines.append(f"- {row['budget']}: " + ", ".join(
                    f"{k}: `{v}`" for k, v in row["plan"]["methods"].items()))  # fmt: skip
        lines.append("")
    lines += ["![test accuracy against the budget](accuracy_vs_budget.png)", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


@suite("plan", "rp.plan vs the best uniform setting, small batch, checkpointing at 1/4..1/32 bytes")
def run(out: Path, quick: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    p = QUICK if quick else FULL
    start, load_before = time.time(), report.load()
    splits = load_dataset("mnist", seed=0)
    if quick:
        splits = quick_splits(splits, p["examples"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the measurements too (training runs set their own)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for net in NETS:
                results[net] = run_net(net, splits, p, Path(tmp))
    finally:
        torch.set_num_threads(threads)
    plot(results, out / "accuracy_vs_budget.png")
    meta = {
        "command": f"randprop bench plan --out {out}" + (" --quick" if quick else ""),
        "machine": report.machine(1),
        "date": report.date(),
        "load_before": load_before,
        "load_after": report.load(),
        "minutes": (time.time() - start) / 60,
    }
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()}
    payload = {"settings": settings, "meta": meta, "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    write_report(out, results, p, meta)
    return payload
