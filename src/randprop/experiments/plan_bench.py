"""rp.plan against the uniform settings and the baselines at equal bytes (the [plan] suite).

For the MNIST MLP, the small CNN and a GPT-2-style character language model (Shakespeare), per
seed: rp.plan's measurements on the first training batch of the seeded model, then at budgets of
1/4, 1/8, 1/16 and 1/32 of exact's saved bytes:
- the plan: the per-layer methods of least total relative gradient variance that fit (a budget
  below the smallest total any plan reaches is reported as "n/a: minimum is X");
- the best uniform setting that fits: the UNIFORM_TOP settings of rp.plan's candidates of least
  total relative variance whose bytes fit (chosen on the first seed's measurements, then the same
  for every seed), each trained, and the best one (mean over seeds) reported;
- the memory-matched small batch: exact backprop at the largest batch whose measured saved
  bytes fit the budget;
and once per seed exact backprop and activation checkpointing (its bytes do not depend on a
budget). Every setting trains the same iterations with the same optimizer and learning-rate
schedule (linear warm-up for the language model, then a cosine decay to 0 for all); quality
after the last iteration: test accuracy (images), validation loss (language model, lower is
better). Seeds are paired: a seed fixes the initial weights and the order of the batches of
every setting alike, so the plan is compared with the best uniform setting seed by seed.

The language model's exact and checkpointing rows are plain transformers GPT-2 (its attention,
logits and cross-entropy); the plan and the uniform settings also use randprop's attention core
and the fused lm-head + cross-entropy (as ``randprop bench transformer`` does), whose bytes,
with the compact non-weight ops, no plan changes. Budgets are fractions of the plain exact run's
saved bytes.

Every finished run is written to OUT/runs/<task>-<label>-seed<k>.json at once (and each seed's
measurements to OUT/runs/<task>-setup-seed<k>.json), so an interrupted suite loses at most the
run in progress; run it again with the same OUT to resume.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from randprop.data import load_dataset
from randprop.experiments import report
from randprop.experiments import transformer_lm as tlm
from randprop.experiments.registry import check_tasks, quick_splits, suite
from randprop.plan import Measurements, Plan, choose, measure, measured_bytes, uniform
from randprop.train import TrainConfig, train
from randprop.train.baselines import largest_batch, saved_bytes_of
from randprop.train.loop import build_seeded, loss_fn

BUDGETS = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
BUDGET_LABELS = ("1/4", "1/8", "1/16", "1/32")
UNIFORM_TOP = 2
#: what rp.plan chooses among beyond its candidates (a change re-plans, reusing other runs)
PLAN_OPTIONS = (
    "checkpointing of blocks (where it divides the variance by more than 1.1); the "
    "model's own randomness fixed across draws"
)
#: the learning-rate schedule of every run: a cosine decay to 0 over the run
SCHEDULE = "cosine"
TASKS = ("mlp", "cnn", "gpt2")
TITLES = {"mlp": "MNIST MLP", "cnn": "MNIST CNN", "gpt2": "GPT-2-style char LM, Shakespeare"}
#: per task: the quality reported and whether lower is better
QUALITY = {"mlp": ("test_accuracy", False), "cnn": ("test_accuracy", False),
           "gpt2": ("val_loss", True)}  # fmt: skip
LM_SIZE = {"layers": 2, "hidden": 128, "heads": 4, "context": 64, "intermediate": 512}
FULL = {
    "steps": {"mlp": 2000, "cnn": 400, "gpt2": 300},
    "batch": {"mlp": 150, "cnn": 64, "gpt2": 16},
    "lr": {"mlp": 2e-3, "cnn": 1e-3, "gpt2": 2e-3},
    "seeds": (0, 1, 2, 3, 4),
    "draws": 8,
    "candidates": None,
    "lm": {"size": LM_SIZE, "eval_examples": 256, "warmup": 10},
}
QUICK = {
    "steps": {"mlp": 2, "cnn": 1, "gpt2": 2},
    "batch": {"mlp": 150, "cnn": 64, "gpt2": 4},
    "lr": FULL["lr"],
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
    "lm": {"size": tlm.QUICK_LM_SIZE, "eval_examples": 4, "warmup": 1},
}


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text).split())


def has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


class ImageTask:
    """The MNIST MLP or CNN: trained by randprop.train (Adam), test accuracy after the last step."""

    def __init__(self, net: str, splits, p: dict, tmp: Path) -> None:
        self.name, self.splits, self.p, self.tmp = net, splits, p, tmp
        self.batch = p["batch"][net]
        x, y = splits.train.tensors
        first = torch.arange(min(self.batch, len(x)))  # index copies, as the loop takes them
        self.x, self.y = x[first], y[first]

    def loss_of(self, model) -> torch.Tensor:
        return loss_fn(model(self.x), self.y)

    def setup(self, seed: int) -> tuple[int, Measurements]:
        """(exact's saved bytes, rp.plan's measurements) on the seeded model's first batch."""
        model = build_seeded(self.name, seed)
        found = measure(copy.deepcopy(model), self.loss_of, candidates=self.p["candidates"],
                        draws=self.p["draws"], seed=seed)  # fmt: skip
        return found.exact_bytes, found

    def plan_bytes(self, seed: int, planned: Plan) -> int:
        """The planned model's measured peak saved bytes (blocks' recomputation included)."""
        return measured_bytes(build_seeded(self.name, seed), planned, self.loss_of, seed=seed)

    def exact_bytes_at(self, seed: int, batch: int) -> int:
        model = build_seeded(self.name, seed)
        xb, yb = self.x[:batch].clone(), self.y[:batch].clone()
        return saved_bytes_of(lambda: model, "exact", xb, yb, loss_fn, seed)

    def train(self, seed: int, label: str, method, batch: int, checkpointing: bool) -> dict:
        plain = checkpointing and method == "exact"  # the checkpointing baseline
        cfg = TrainConfig(model=self.name, data=self.splits.name, steps=self.p["steps"][self.name],
                          seed=seed, optimizer="adam", lr=self.p["lr"][self.name], batch=batch,
                          schedule=SCHEDULE, threads=1, progress=False, log_every=0,
                          method="checkpoint" if plain else method,
                          checkpointing=checkpointing and not plain,
                          out=str(self.tmp / f"{self.name}-{_slug(label)}-{seed}"))  # fmt: skip
        return train(cfg, splits=self.splits)


class LMTask:
    """The GPT-2-style char LM of ``randprop bench transformer`` (its builders and training run:
    AdamW, linear warm-up, then the cosine decay), validation loss after the last step."""

    def __init__(self, p: dict, cache: dict) -> None:
        lm = p["lm"]
        steps = p["steps"]["gpt2"]
        self.name, self.batch = "gpt2", p["batch"]["gpt2"]
        self.p = p
        self.task = tlm.Task("gpt2", TITLES["gpt2"], "lm", "gpt2", lm["size"], batch=self.batch,
                             steps=steps, seeds=tuple(p["seeds"]), lr=p["lr"]["gpt2"],
                             eval_every=steps, eval_examples=lm["eval_examples"],
                             warmup=lm["warmup"], schedule=SCHEDULE)  # fmt: skip
        self.splits = tlm.task_data(self.task, cache)
        x, y = self.splits.train.tensors
        self.x, self.y = x[: self.batch].clone(), y[: self.batch].clone()

    def setup(self, seed: int) -> tuple[int, Measurements]:
        """(plain exact's saved bytes, rp.plan's measurements of the model with randprop's
        attention core and the fused lm-head loss) on the seeded model's first batch."""
        exact = tlm.Setting("exact")
        model = tlm.build(self.task, exact, seed, self.splits)
        exact_bytes = tlm.saved_bytes(self.task, exact, model, self.x, self.y)
        from randprop.methods.attention import use_compact_attention

        use_compact_attention(model)
        found = measure(model, self.loss_of, candidates=self.p["candidates"],
                        draws=self.p["draws"], seed=seed)  # fmt: skip
        return exact_bytes, found

    def loss_of(self, model) -> torch.Tensor:
        fused = tlm.Setting("fused", method="exact")  # any method: the fused loss
        return tlm.loss_of(self.task, fused, model, self.x, self.y)

    def plan_bytes(self, seed: int, planned: Plan) -> int:
        """The planned model's measured peak saved bytes (blocks' recomputation included)."""
        from randprop.methods.attention import use_compact_attention

        model = tlm.build(self.task, tlm.Setting("exact"), seed, self.splits)
        use_compact_attention(model)
        return measured_bytes(model, planned, self.loss_of, seed=seed)

    def exact_bytes_at(self, seed: int, batch: int) -> int:
        exact = tlm.Setting("exact")
        model = tlm.build(self.task, exact, seed, self.splits)
        return tlm.saved_bytes(self.task, exact, model, self.x[:batch].clone(),
                               self.y[:batch].clone())  # fmt: skip

    def train(self, seed: int, label: str, method, batch: int, checkpointing: bool) -> dict:
        setting = tlm.Setting(label, None if method == "exact" else method, checkpointing)
        return tlm.train_run(self.task, setting, seed, batch, self.splits)


def _fingerprint(task, p: dict) -> dict:
    return {"steps": p["steps"][task.name], "lr": p["lr"][task.name], "schedule": SCHEDULE,
            "examples": p.get("examples"), "lm": p["lm"] if task.name == "gpt2" else None,
            "draws": p["draws"], "candidates": p["candidates"] and list(p["candidates"])}  # fmt: skip


def _write(path: Path, record: dict) -> None:
    """Write ``record`` as JSON atomically (an interrupted write leaves no partial file)."""
    part = path.with_suffix(".part")
    part.write_text(json.dumps(record, indent=2))
    part.replace(path)


def _load(path: Path, fingerprint: dict) -> dict | None:
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == fingerprint:
            return stored
        _log(f"bench plan: {path.name} is from other settings; run again")
    return None


def uniform_choices(uniforms: dict[str, list], budget: int) -> list[dict]:
    """The UNIFORM_TOP fitting uniform settings (bytes measured whole) of least total variance."""
    rows = [{"method": m, "predicted_bytes": size, "variance": var}
            for m, (size, var) in uniforms.items() if size <= budget]  # fmt: skip
    return sorted(rows, key=lambda r: r["variance"])[:UNIFORM_TOP]


def setup_seed(task, seed: int, runs: Path, fingerprint: dict) -> dict:
    """The seed's measurements, plans and small batches per budget (from disk when there)."""
    path = runs / f"{task.name}-setup-seed{seed}.json"
    fingerprint = {**fingerprint, "plan_options": PLAN_OPTIONS}
    stored = _load(path, fingerprint)
    if stored is not None:
        return stored
    _log(f"[plan {task.name}] seed {seed}: measuring the candidates ...")
    t0 = time.perf_counter()
    exact_bytes, found = task.setup(seed)
    minimum = found.minimum_bytes()
    cache: dict[int, int] = {}

    def fits(b: int, budget: int) -> bool:
        if b not in cache:
            cache[b] = task.exact_bytes_at(seed, b)
        return cache[b] <= budget

    budgets = {}
    for label, fraction in zip(BUDGET_LABELS, BUDGETS, strict=True):
        budget = math.floor(fraction * exact_bytes)
        entry: dict = {"budget_bytes": budget, "plan": None}
        if budget < minimum:  # the compact non-weight ops, the loss's bytes: no plan changes them
            entry["plan_error"] = (f"n/a: minimum is {minimum:,} B "
                                   f"({minimum / exact_bytes:.4f} of exact)")  # fmt: skip
        else:
            planned = choose(found, budget)
            entry["plan"] = {"methods": planned.methods, "total_variance": planned.total_variance,
                             "checkpointing": planned.checkpointing,
                             "predicted_bytes": planned.predicted_bytes,
                             "measured_bytes": task.plan_bytes(seed, planned),
                             "layers": {c.name: c.method for c in planned.layers}}  # fmt: skip
        entry["small_batch"] = largest_batch(lambda b, budget=budget: fits(b, budget), task.batch)
        budgets[label] = entry
    setup = {
        "fingerprint": fingerprint,
        "exact_bytes": exact_bytes,
        "plan_exact_bytes": found.exact_bytes,
        "minimum_bytes": minimum,
        "fixed_bytes": found.fixed_bytes,
        "uniform": {m: list(uniform(found, m)) for m in found.uniform_bytes if m != "exact"},
        "budgets": budgets,
        "seconds": time.perf_counter() - t0,
    }
    _write(path, setup)
    return setup


def run_task(task, p: dict, runs: Path) -> dict:
    """Every run of ``task``, seed by seed (each reused from disk when there); aggregated per
    budget and setting."""
    fingerprint = _fingerprint(task, p)
    key, _ = QUALITY[task.name]
    records: dict[tuple[str, int], dict] = {}
    done: dict[str, dict] = {}  # the records by (seed, settings)

    def get(seed: int, label: str, method, batch: int, checkpointing: bool = False) -> dict:
        path = runs / f"{task.name}-{_slug(label)}-seed{seed}.json"
        want = {**fingerprint, "method": method, "batch": batch, "checkpointing": checkpointing}
        record = _load(path, want)
        same = done.get(json.dumps([seed, want], sort_keys=True))
        if record is None and same is not None:  # e.g. one plan for two budgets: not trained twice
            record = {**same, "label": label}
            _write(path, record)
        if record is None:
            _log(f"[plan {task.name}] seed {seed}: {label} (batch {batch}, "
                 f"{p['steps'][task.name]} steps) ...")  # fmt: skip
            s = task.train(seed, label, method, batch, checkpointing)
            record = {"fingerprint": want, "label": label, "seed": seed, "batch": batch,
                      "method": method, "quality": s[key], "saved_bytes": s["saved_bytes"],
                      "seconds_per_step": s["seconds_per_step"],
                      "wall_seconds": s["wall_seconds"]}  # fmt: skip
            _write(path, record)
            _log(f"[plan {task.name}] seed {seed}: {label}: {key} {record['quality']:.4f}, "
                 f"{record['saved_bytes']:,} B saved, {record['seconds_per_step']:.3f} s/step, "
                 f"{record['wall_seconds']:.0f} s")  # fmt: skip
        records[label, seed] = done[json.dumps([seed, want], sort_keys=True)] = record
        return record

    setups = {}
    for seed in p["seeds"]:
        setups[seed] = setup = setup_seed(task, seed, runs, fingerprint)
        first = setups[p["seeds"][0]]
        get(seed, "exact", "exact", task.batch)
        get(seed, "checkpointing", "exact", task.batch, checkpointing=True)
        for label in BUDGET_LABELS:
            entry = setup["budgets"][label]
            if entry["plan"] is not None:
                get(
                    seed,
                    f"plan {label}",
                    entry["plan"]["methods"],
                    task.batch,
                    checkpointing=entry["plan"]["checkpointing"],
                )
            for u in uniform_choices(first["uniform"], first["budgets"][label]["budget_bytes"]):
                get(seed, f"uniform {u['method']}", u["method"], task.batch)
            small = entry["small_batch"]
            if small:
                get(seed, f"small batch {small}", "exact", small)
    return aggregate(task.name, p["seeds"], setups, records)


def _time_ratio(records: dict, label: str, seeds: Sequence[int]) -> float | None:
    """Mean over seeds of the run's seconds per step over exact's (same seed)."""
    ratios = [records[label, s]["seconds_per_step"] / records["exact", s]["seconds_per_step"]
              for s in seeds if (label, s) in records and ("exact", s) in records]  # fmt: skip
    return float(np.mean(ratios)) if ratios else None


def _aggregate(rs: list[dict]) -> dict:
    values = [r["quality"] for r in rs]
    return {
        "quality": float(np.mean(values)),
        "quality_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "saved_bytes": max(r["saved_bytes"] for r in rs),
        "batch": rs[0]["batch"],
        "seeds": [r["seed"] for r in rs],
        "by_seed": {str(r["seed"]): r["quality"] for r in rs},
    }


def aggregate(name: str, seeds: Sequence[int], setups: dict, records: dict) -> dict:
    """Per budget: the plan, each trained uniform setting, the best of them, the seed-paired
    difference plan - best uniform (mean and std over seeds), the small batch."""
    _, lower = QUALITY[name]
    first = setups[seeds[0]]

    def over(label: str) -> dict | None:
        rs = [records[label, s] for s in seeds if (label, s) in records]
        return _aggregate(rs) if rs else None

    rows = []
    for label in BUDGET_LABELS:
        entry = first["budgets"][label]
        row = {"budget": label, "budget_bytes": entry["budget_bytes"],
               "plan_error": entry.get("plan_error"), "small_batch": entry["small_batch"]}  # fmt: skip
        plan = over(f"plan {label}")
        if plan is not None:
            plans = [setups[s]["budgets"][label]["plan"] for s in seeds]
            variances = [q["total_variance"] for q in plans if q is not None]
            plan |= {"total_variance": float(np.mean(variances)),
                     "methods": entry["plan"]["layers"],
                     "checkpointing": entry["plan"]["checkpointing"],
                     # rp.plan's measurement: a step's peak, the blocks' recomputation included
                     "saved_bytes": max(q["measured_bytes"] for q in plans if q is not None),
                     "time_vs_exact": _time_ratio(records, f"plan {label}", seeds)}  # fmt: skip
        row["plan"] = plan
        candidates = []
        for u in uniform_choices(first["uniform"], entry["budget_bytes"]):
            r = over(f"uniform {u['method']}")
            if r is not None:
                var = float(np.mean([setups[s]["uniform"][u["method"]][1] for s in seeds]))
                candidates.append({"method": u["method"], **r, "total_variance": var})
        row["uniform_runs"] = candidates
        pick = min if lower else max
        best = pick(candidates, key=lambda r: r["quality"], default=None)
        row["best_uniform"] = best
        if plan is not None and best is not None:
            paired = [plan["by_seed"][s] - best["by_seed"][s] for s in plan["by_seed"]
                      if s in best["by_seed"]]  # fmt: skip
            diff = float(np.mean(paired))
            std = float(np.std(paired, ddof=1)) if len(paired) > 1 else None
            row["difference"] = {"mean": diff, "std": std, "seeds": len(paired),
                                 "plan_better_or_equal": diff <= 0 if lower else diff >= 0,
                                 "within_one_std": None if std is None else abs(diff) <= std,
                                 "first_three_mean": float(np.mean(paired[:3]))}  # fmt: skip
        small = entry["small_batch"]
        row["small"] = over(f"small batch {small}") if small else None
        rows.append(row)
    return {"exact_bytes": first["exact_bytes"], "minimum_bytes": first["minimum_bytes"],
            "fixed_bytes": first["fixed_bytes"], "plan_exact_bytes": first["plan_exact_bytes"],
            "exact": over("exact"), "checkpointing": over("checkpointing"),
            "budgets": rows}  # fmt: skip


def _units(name: str, value: float) -> str:
    """A quality difference in the task's units (accuracy: points; loss: nats)."""
    return f"{value:+.4f} nats" if QUALITY[name][1] else f"{100 * value:+.2f} points"


def verdicts(name: str, result: dict) -> list[str]:
    """Per budget: whether the plan is at least as good as the best uniform setting, by how much
    (seed-paired mean difference) and whether that is within one std of the paired differences."""
    lower = QUALITY[name][1]
    better = "lower" if lower else "higher"
    lines = []
    for row in result["budgets"]:
        plan, best, diff = row["plan"], row["best_uniform"], row.get("difference")
        head = f"- {name}, {row['budget']}:"
        if plan is None:
            lines.append(f"{head} no plan: {row['plan_error'] or 'not run'}")
        elif best is None:
            lines.append(f"{head} plan {plan['quality']:.4f}; no uniform setting fits this budget")
        else:
            word = ("at least as good as" if diff["plan_better_or_equal"] else
                    "**behind**")  # fmt: skip
            if diff["std"] is None:
                noise = "one seed: no std"
            else:
                inside = "within" if diff["within_one_std"] else "beyond"
                noise = (f"{inside} one std of the seed-paired differences "
                         f"({_units(name, diff['std'])[1:]})")  # fmt: skip
            if diff["seeds"] > 3:
                noise += f"; over the first 3 seeds {_units(name, diff['first_three_mean'])}"
            ckpt = ", blocks checkpointed" if plan["checkpointing"] else ""
            lines.append(
                f"{head} the plan ({plan['quality']:.4f}{ckpt}) is {word} the best uniform setting "
                f"`{best['method']}` ({best['quality']:.4f}; {better} is better): plan - uniform "
                f"{_units(name, diff['mean'])}, {noise}"
            )
    return lines


def _cell(r: dict | None) -> str:
    return "n/a" if r is None else f"{r['quality']:.4f} ± {r['quality_std']:.4f}"


def table(name: str, result: dict) -> list[str]:
    exact = result["exact_bytes"]
    header = ["budget", "bytes", "plan", "plan bytes", "plan rel var", "plan s/step", "best uniform",
              "uniform bytes", "uniform rel var", "plan - uniform (paired std)", "small batch",
              "checkpointing"]  # fmt: skip
    rows = []
    for row in result["budgets"]:
        plan, best, small, diff = row["plan"], row["best_uniform"], row["small"], row.get(
            "difference")  # fmt: skip
        std = "" if diff is None or diff["std"] is None else f" ({_units(name, diff['std'])[1:]})"
        rows.append([
            row["budget"], f"{row['budget_bytes']:,}",
            (row["plan_error"] or "n/a") if plan is None else
            _cell(plan) + (" (blocks checkpointed)" if plan["checkpointing"] else ""),
            "n/a" if plan is None else f"{plan['saved_bytes'] / exact:.4f}",
            "n/a" if plan is None else f"{plan['total_variance']:.3g}",
            "n/a" if plan is None or plan["time_vs_exact"] is None else
            f"{plan['time_vs_exact']:.2f}x exact",
            "n/a" if best is None else f"{_cell(best)} `{best['method']}`",
            "n/a" if best is None else f"{best['saved_bytes'] / exact:.4f}",
            "n/a" if best is None else f"{best['total_variance']:.3g}",
            "n/a" if diff is None else _units(name, diff["mean"]) + std,
            "none fits" if small is None else f"{_cell(small)} (batch {small['batch']})",
            _cell(result["checkpointing"]),
        ])  # fmt: skip
    return report.markdown_table(header, rows)


def plot(results: dict[str, dict], path: Path) -> str:
    """Quality against the budget (fraction of exact's saved bytes), one panel per task."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        rows = result["budgets"]
        for key, label in (("plan", "rp.plan"), ("best_uniform", "best uniform"),
                           ("small", "small batch")):  # fmt: skip
            pts = [(f, r[key]) for f, r in zip(BUDGETS, rows, strict=True) if r.get(key)]
            if pts:
                ax.errorbar([f for f, _ in pts], [r["quality"] for _, r in pts],
                            yerr=[r["quality_std"] for _, r in pts], marker="o",
                            capsize=3, label=label)  # fmt: skip
        for key, style in (("exact", "--"), ("checkpointing", ":")):
            r = result[key]
            ax.axhline(r["quality"], linestyle=style, color="gray",
                       label=f"{key} ({r['saved_bytes'] / result['exact_bytes']:.2f} of exact)")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(BUDGETS, BUDGET_LABELS)
        ax.set_xlabel("budget: fraction of exact's saved bytes")
        lower = QUALITY[name][1]
        ax.set_ylabel("validation loss (lower is better)" if lower else "test accuracy")
        ax.set_title(TITLES[name])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return report.save_figure(fig, path, dpi=110)


def scale_lines(p: dict, names: Sequence[str]) -> list[str]:
    lines = []
    for name in names:
        head = (f"- {TITLES[name]}: batch {p['batch'][name]}, {p['steps'][name]} iterations, "
                f"learning rate {p['lr'][name]:g} ")  # fmt: skip
        if name == "gpt2":
            lm, size = p["lm"], p["lm"]["size"]
            lines.append(
                head + f"(AdamW, {lm['warmup']}-step linear warm-up, then the cosine decay); "
                f"{size['layers']} layers, hidden {size['hidden']}, {size['heads']} heads, "
                f"context {size['context']}; validation loss (nats per character) on the first "
                f"{lm['eval_examples']} validation windows "
                f"({lm['eval_examples'] * size['context']:,} characters)."
            )
        else:
            lines.append(head + "(Adam, the cosine decay); test accuracy on the MNIST test set.")
    return lines


def write_report(out: Path, results: dict[str, dict], p: dict, meta: dict) -> str:
    lines = [
        *report.run_header(
            "rp.plan: per-layer estimators under a byte budget, against uniform settings", meta
        ),
        *[line for name, result in results.items() for line in verdicts(name, result)],
        "",
        "## Set-up and scale",
        "",
        *scale_lines(p, list(results)),
        "",
        f"Seeds {list(p['seeds'])}, paired: a seed fixes the initial weights, the order of the "
        "batches and the estimators' draws of every setting alike; quality is the mean ± std "
        "over seeds after the last iteration, and plan - uniform is the mean (and std) over "
        "seeds of the seed-by-seed difference in the task's quality (test accuracy: positive "
        "is better for the plan; validation loss: negative is). Every setting of a task trains "
        "with the same optimizer, learning rate and schedule: the learning rate decays to 0 by "
        "a cosine over the run, so the final quality is not one noisy constant-rate iterate; "
        "nothing is tuned per setting.",
        "",
        "Budgets are fractions of exact's saved bytes on the training batch (measured by "
        "`rp.track_saved`); the bytes columns are the runs' measured saved bytes as fractions "
        "of exact's. rp.plan measures every candidate's bytes and relative gradient variance "
        f"({p['draws']} draws) on the seed's model and first batch, then solves the knapsack "
        f"exactly. Best uniform: the {UNIFORM_TOP} fitting uniform settings of least total "
        "relative variance (from the first seed's measurements) are trained and the better "
        "(mean over seeds) is shown: picking the better of two noisy means favours the uniform "
        "side slightly. Small batch: exact backprop at the largest batch that fits. "
        "Checkpointing does not depend on the budget (its bytes are in the plot's legend). "
        "n/a: minimum is X: the budget is below the smallest total any plan reaches (the bytes "
        "no choice changes: the compact non-weight ops, the loss's and, for the language model, "
        "randprop's attention core).",
        "",
        "The plan may also checkpoint the blocks (the layers' methods then apply in the "
        "recomputed blocks): rp.plan takes it where it divides the least total variance without it "
        "by more than 1.1 (rp.plan's checkpoint_gain), or where nothing else fits. "
        "A plan's bytes are rp.plan's measurement of a training step's peak on the seed's first "
        "batch (the largest over seeds), with checkpointed blocks' recomputation counted; plan "
        "s/step is the mean over seeds of its training step time over exact's (same seed, one "
        "thread, the other core busy; a run reused from an earlier pass was timed then: a rough "
        "figure, not a timing in alternation), where a checkpointed plan shows the recompute.",
        "",
    ]
    if "gpt2" in results:
        r = results["gpt2"]
        lines += [
            "Language model: exact and checkpointing are plain transformers GPT-2 (its attention "
            "and logits; transformers' `gradient_checkpointing_enable()`); the plan and the "
            "uniform settings also switch to randprop's attention core (no T x T tensor kept) "
            "and train with the fused lm-head + cross-entropy on the last hidden state. With "
            f"every weight layer exact that model saves {r['plan_exact_bytes']:,} B "
            f"({r['plan_exact_bytes'] / r['exact_bytes']:.4f} of exact); no plan goes below "
            f"{r['minimum_bytes']:,} B ({r['minimum_bytes'] / r['exact_bytes']:.4f}).",
            "",
        ]
    for note in meta.get("not_run", []):
        lines += [f"Not run: {note}", ""]
    for name, result in results.items():
        lines += [f"## {TITLES[name]}", "", f"Exact: {_cell(result['exact'])}, "
                  f"{result['exact_bytes']:,} saved bytes.", "", *table(name, result), ""]  # fmt: skip
        lines += ["Plans (first seed):", ""]
        for row in result["budgets"]:
            if row["plan"]:
                ckpt = "; blocks checkpointed" if row["plan"]["checkpointing"] else ""
                lines.append(f"- {row['budget']}: " + ", ".join(
                    f"{k}: `{v}`" for k, v in row["plan"]["methods"].items()) + ckpt)  # fmt: skip
        lines.append("")
    if results:
        lines += ["![quality against the budget](quality_vs_budget.png)", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


@suite(
    "plan",
    "rp.plan vs the best uniform setting, small batch, checkpointing at 1/4..1/32 bytes",
    TASKS,
)
def run(out: Path, quick: bool = False, tasks: Sequence[str] = TASKS) -> dict:
    """Run (or resume from OUT/runs) the suite for ``tasks`` (a subset of TASKS)."""
    asked = check_tasks("plan", tasks, TASKS)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    p = QUICK if quick else FULL
    start, load_before = time.time(), report.load()
    not_run = []
    if "gpt2" in tasks and not has_transformers():
        note = ("the GPT-2-style language model: the optional package transformers is not "
                "installed (`pip install --no-deps transformers`)")  # fmt: skip
        _log(f"bench plan: skipped {note}")
        not_run.append(note)
        tasks = [t for t in tasks if t != "gpt2"]
    splits = None
    if {"mlp", "cnn"} & set(tasks):
        splits = load_dataset("mnist", seed=0)
        if quick:
            splits = quick_splits(splits, p["examples"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the measurements too (training runs set their own)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in tasks:
                task = LMTask(p, {}) if name == "gpt2" else ImageTask(name, splits, p, Path(tmp))
                results[name] = run_task(task, p, runs)
    finally:
        torch.set_num_threads(threads)
    if results:
        plot(results, out / "quality_vs_budget.png")
    command = f"randprop bench plan{asked} --out {out}" + (" --quick" if quick else "")
    meta = {**report.run_meta(command, start, load_before), "not_run": not_run}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()}
    payload = {"settings": settings, "meta": meta, "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    write_report(out, results, p, meta)
    return payload
