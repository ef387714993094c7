"""RAD's feedforward experiment (Oktay et al., 2020, section 5) on MNIST.

MLP 784-300-300-300-10, batch 150, keep p = 0.1, Adam with the learning rate chosen per method
on the validation split, several seeds: exact backprop, RAD (sample and project), the small batch
whose *measured* saved bytes match RAD's, and activation checkpointing. Claim under test: at a
fixed memory budget RAD converges in fewer iterations than the small batch. Then a short run of
the paper's 4-conv net (16/32/32/32, 5x5) on CIFAR-10 when its files are given, else MNIST.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from randprop.data import Splits, load_dataset
from randprop.data.sources import cifar_folder
from randprop.experiments import report as reporting
from randprop.experiments.registry import quick_splits, suite
from randprop.train.compare import plot_curves, read_curve, table, with_ratios
from randprop.train.config import TrainConfig
from randprop.train.loop import train

RAD = "rad:keep=0.1"
MLP_RUNS = {
    "exact": {"method": "exact"},
    "RAD sample": {"method": RAD},
    "RAD project": {"method": "rad:keep=0.1,mode=project"},
    "small batch": {"method": "exact", "match_memory_of": RAD},
    "checkpointing": {"method": "checkpoint"},
}
CONV_RUNS = ("exact", "RAD sample", "small batch")
NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
TUNE_SEED = 100  # the learning-rate search uses a seed none of the reported runs use

FULL = {"steps": 4000, "tune_steps": 1000, "seeds": (0, 1, 2), "grid": (5e-4, 1e-3, 2e-3),
        "conv_steps": 2000}  # fmt: skip
# a smoke run of every row, table and plot on the first ``examples`` of each split
QUICK = {"steps": 4, "tune_steps": 2, "seeds": (0, 1), "grid": (1e-3, 3e-3), "conv_steps": 1,
         "examples": 300}  # fmt: skip


def _train(runs: Path, name: str, splits, **kw) -> dict:
    cfg = TrainConfig(data=splits.name, batch=150, optimizer="adam", threads=1,
                      out=str(runs / name), **kw)  # fmt: skip
    summary = train(cfg, splits=splits)
    summary["curve"] = read_curve(runs / name)
    return summary


def _mnist(p: dict) -> Splits:
    splits = load_dataset("mnist", seed=0)
    return quick_splits(splits, p["examples"]) if "examples" in p else splits


def tune(runs: Path, splits, p: dict) -> dict[str, dict]:
    """Best learning rate per method by final validation accuracy after ``tune_steps``."""
    chosen = {}
    for label, kw in MLP_RUNS.items():
        if label == "checkpointing":  # same gradients as exact: same learning rate
            continue
        scores = {}
        for lr in p["grid"]:
            s = _train(runs, f"tune-{label}-{lr}", splits, model="mlp", steps=p["tune_steps"],
                       seed=TUNE_SEED, lr=lr, **kw)  # fmt: skip
            scores[lr] = s["val_accuracy"]
        chosen[label] = {"lr": max(scores, key=scores.get), "val_accuracy": scores}
    chosen["checkpointing"] = {"lr": chosen["exact"]["lr"], "val_accuracy": {}}
    return chosen


def mlp_runs(runs: Path, splits, p: dict, chosen: dict) -> dict[str, list[dict]]:
    results = {}
    for label, kw in MLP_RUNS.items():
        seeds = p["seeds"][:1] if label == "checkpointing" else p["seeds"]
        results[label] = [
            _train(
                runs,
                f"{label}-{seed}",
                splits,
                model="mlp",
                steps=p["steps"],
                seed=seed,
                lr=chosen[label]["lr"],
                eval_every=max(p["steps"] // 10, 1),
                log_every=max(p["steps"] // 20, 1),
                **kw,
            )  # fmt: skip
            for seed in seeds
        ]
    return results


def _std(values: list[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _largest(summaries: list[dict], key: str) -> int | None:
    """The largest of the seeds' figures, or None where a run could not measure it."""
    values = [s.get(key) for s in summaries]
    return None if None in values else max(values)


def aggregate(label: str, summaries: list[dict]) -> dict:
    accs = [s["test_accuracy"] for s in summaries]
    steps = [pt[0] for pt in summaries[0]["curve"]]
    by_step = [[s["curve"][i][1] for s in summaries] for i in range(len(steps))]
    return {
        "label": label,
        "method": summaries[0]["method"],
        "batch": summaries[0]["batch"],
        "lr": summaries[0]["lr"],
        "seeds": [s["seed"] for s in summaries],
        "test_accuracy": float(np.mean(accs)),
        "test_accuracy_std": _std(accs),
        "saved_bytes": summaries[0]["saved_bytes"],
        **{key: _largest(summaries, key) for key in ("peak_bytes", "peak_forward_backward_bytes")},
        "seconds_per_step": float(np.median([s["seconds_per_step"] for s in summaries])),
        "curve_steps": steps,
        "curve_mean": [float(np.mean(v)) for v in by_step],
        "curve_std": [_std(v) for v in by_step],
    }


def first_reaching(row: dict, target: float) -> int | None:
    """The first evaluated iteration at which the mean test accuracy reaches ``target``."""
    return next((s for s, a in zip(row["curve_steps"], row["curve_mean"], strict=True)
                 if a >= target), None)  # fmt: skip


def conv_data() -> tuple[str, str]:
    """(dataset, model) of the conv-net runs: CIFAR-10 as in the paper when its files are given
    ($RANDPROP_CIFAR10), else MNIST."""
    try:
        cifar_folder(None)
        return "cifar10", "rad-cnn-cifar"
    except FileNotFoundError:
        return "mnist", "rad-cnn"


def conv_runs(runs: Path, p: dict, mnist) -> list[dict]:
    data, model = conv_data()
    splits = mnist if data == "mnist" else load_dataset(data, seed=0)
    rows = [
        _train(
            runs,
            f"conv-{label}",
            splits,
            model=model,
            steps=p["conv_steps"],
            seed=0,
            lr=1e-3,
            eval_batch=500,
            **MLP_RUNS[label],
        )  # fmt: skip
        for label in CONV_RUNS
    ]
    for label, row in zip(CONV_RUNS, rows, strict=True):
        row["label"] = label
    return with_ratios(rows, rows[0])


def verdicts(rows: dict[str, dict]) -> list[str]:
    """One plain sentence per RAD variant: did it beat the memory-matched small batch?"""
    small = rows["small batch"]
    lines = []
    for label in ("RAD sample", "RAD project"):
        rad = rows[label]
        gap = rad["test_accuracy"] - small["test_accuracy"]
        spread = rad["test_accuracy_std"] + small["test_accuracy_std"]
        beat = "beat" if gap > 0 else "did not beat"
        clear = "a clear margin" if abs(gap) > spread else "within seed noise"
        above = sum(a > b for a, b in zip(rad["curve_mean"], small["curve_mean"], strict=True))
        reach = first_reaching(rad, small["test_accuracy"])
        lines.append(
            f"- **{label} {beat} the memory-matched small batch** (batch {small['batch']}, "
            f"{small['saved_bytes']:,} vs {rad['saved_bytes']:,} saved bytes): final test "
            f"accuracy {rad['test_accuracy']:.4f} vs {small['test_accuracy']:.4f} "
            f"(difference {gap:+.4f}, {clear}: the seed std devs sum to {spread:.4f}); its mean "
            f"curve was higher at {above} of {len(rad['curve_mean'])} evaluations and "
            + (
                f"reached the small batch's final accuracy at iteration {reach} "
                f"of {small['curve_steps'][-1]}."
                if reach is not None
                else "never reached the small batch's final accuracy."
            )
        )
    return lines


def headline(rows: dict[str, dict], conv: list[dict]) -> str:
    """The answer in one sentence: did RAD beat the memory-matched small batch?"""
    small = rows["small batch"]
    parts = []
    for label in ("RAD sample", "RAD project"):
        gap = rows[label]["test_accuracy"] - small["test_accuracy"]
        spread = rows[label]["test_accuracy_std"] + small["test_accuracy_std"]
        parts.append(
            f"{label} {'beat' if gap > 0 else 'did not beat'} it "
            f"({'a clear margin' if abs(gap) > spread else 'within seed noise'} at the end)"
        )
    text = f"**Did RAD beat the memory-matched small batch? On the MLP, {parts[0]}; {parts[1]}.**"
    if conv:
        rad, sb = (next(r for r in conv if r["label"] == k) for k in ("RAD sample", "small batch"))
        beat = "beat" if rad["test_accuracy"] > sb["test_accuracy"] else "did not beat"
        text += f" On the short 4-conv-net run, RAD sample {beat} it."
    return text


def conv_verdict(conv: list[dict]) -> str:
    rad, small = (next(r for r in conv if r["label"] == k) for k in ("RAD sample", "small batch"))
    beat = "beat" if rad["test_accuracy"] > small["test_accuracy"] else "did not beat"
    return (
        f"**On this short run RAD sample {beat} the memory-matched small batch** (batch "
        f"{small['batch']}): test accuracy {rad['test_accuracy']:.4f} vs "
        f"{small['test_accuracy']:.4f}, one seed, so no claim either way beyond this run."
    )


def conv_intro(conv: list[dict], rows: dict) -> str:
    if not conv:
        return ""
    step = conv[0]["seconds_per_step"]
    return (
        f"A short run only: one exact training step of this net took {step * 1e3:.0f} ms on one "
        f"CPU thread here, so the paper's 20,000 iterations would take {step * 20000 / 60:.0f} "
        "min per run. Its memory figures are exact measurements; the accuracies only show the "
        "runs train. Under RAD, convert also swaps the two average-pooling layers for exact ones "
        "that store only their input shape (PyTorch's keep the float input), and the ReLUs for "
        f"1-bit masks, so the net saves {conv[0]['saved_bytes'] / conv[1]['saved_bytes']:.2f}x "
        f"(the MLP: {rows['exact']['saved_bytes'] / rows['RAD sample']['saved_bytes']:.1f}x)."
    )


def peak_note(exact: dict, rad: dict, model: str) -> list[str]:
    """A paragraph comparing the measured peaks of exact and RAD with their saved bytes."""
    keys = ("peak_bytes", "peak_forward_backward_bytes")
    if any(run.get(k) is None for run in (exact, rad) for k in keys):
        return []
    mib = 2**20
    saved = (exact["saved_bytes"] - rad["saved_bytes"]) / mib
    fwd_bwd = (exact["peak_forward_backward_bytes"] - rad["peak_forward_backward_bytes"]) / mib
    step = (exact["peak_bytes"] - rad["peak_bytes"]) / mib
    return [
        f"Peak memory on {model} (`randprop.measure.track_peak`: every tensor storage alive at "
        "once, with the parameters, gradients, optimizer state and batch; the first 3 training "
        f"steps of each run). RAD saves {saved:.2f} MiB fewer bytes for backward than exact; "
        f"exact's peak minus RAD's is {fwd_bwd:+.2f} MiB over forward + backward and {step:+.2f} "
        "MiB over the whole step with the optimizer's update (positive: RAD lower). The rest of "
        "the peak is held by every method alike: parameters, gradients, Adam's state, the batch "
        "and backward's activation gradients.",
        "",
    ]


def rewrite_report(out: Path) -> str:
    """Rewrite OUT/report.md from OUT/results.json (rows re-aggregated from the per-seed runs)."""
    results = json.loads((out / "results.json").read_text())
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in results["settings"].items()}
    chosen = {
        label: {**c, "val_accuracy": {float(lr): a for lr, a in c["val_accuracy"].items()}}
        for label, c in results["learning_rates"].items()
    }
    results["mlp"] = {label: aggregate(label, runs) for label, runs in results["mlp_runs"].items()}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return report(out, settings, chosen, results["mlp"], results["conv"], results["meta"])


def report(out: Path, p: dict, chosen: dict, rows: dict, conv: list[dict], meta: dict) -> str:
    ordered = with_ratios(list(rows.values()), rows["exact"])
    lines = [
        "# RAD on MNIST: exact vs RAD vs memory-matched small batch vs checkpointing",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; date {meta['date']}; load average (1/5/15 min) before "
        f"{meta['load_before']}, after {meta['load_after']}; {meta['minutes']:.1f} min wall, "
        f"{meta['cpu_minutes']:.1f} min CPU.",
        "",
        *([f"Note: {meta['note']}", ""] if meta.get("note") else []),
        headline(rows, conv),
        "",
        "## Set-up, and what was scaled",
        "",
        "MLP 784-300-300-300-10 (ReLU), batch 150, RAD keep p = 0.1, Adam, constant learning "
        f"rate chosen per method from {list(p['grid'])} by validation accuracy after "
        f"{p['tune_steps']} iterations (seed {TUNE_SEED}, 6000 held-out training images), then "
        f"{p['steps']} iterations for seeds {list(p['seeds'])}. Test accuracy on the 10,000 "
        "official test images every "
        f"{max(p['steps'] // 10, 1)} iterations. The small batch is exact backprop with the largest "
        "batch whose saved bytes, measured by `rp.track_saved`, do not exceed RAD sample's at "
        "batch 150. Checkpointing: `torch.utils.checkpoint` (non-reentrant), 2 segments of the 4 "
        "layer blocks; its saved bytes are the held segment inputs plus the largest recomputed "
        "segment. Checkpointing computes exact gradients, so it was run for one seed with exact's "
        "learning rate.",
        "",
        f"Scaled from the paper (20,000 iterations, 5 seeds, learning rate and weight decay "
        f"tuned): {p['steps']} iterations, {len(p['seeds'])} seeds, a {len(p['grid'])}-point "
        "learning-rate grid, no weight decay; everything on one CPU thread of a shared 2-core "
        "machine. Times are medians of the per-step wall time, relative to exact in the same run.",
        "",
        "## Result",
        "",
        *verdicts(rows),
        "",
        table(ordered),
        "",
        *peak_note(rows["exact"], rows["RAD sample"], "the MLP"),
        "Learning rates chosen (validation accuracy per grid point):",
        "",
    ]
    for label, c in chosen.items():
        scores = ", ".join(f"{lr:g}: {acc:.4f}" for lr, acc in c["val_accuracy"].items())
        lines.append(f"- {label}: lr {c['lr']:g}" + (f" ({scores})" if scores else " (exact's)"))
    lines += [
        "",
        "Checkpointing's test-accuracy curve is identical to exact's with the same seed: "
        f"{meta['checkpoint_matches_exact']}.",
        "",
        "![test accuracy against iteration](accuracy.png)",
        "",
        f"## The paper's 4-conv net on {NAMES[conv[0]['data']] if conv else 'MNIST'} "
        f"({p['conv_steps']} iterations, one seed, lr 1e-3)",
        "",
        conv_intro(conv, rows),
        "",
        *(
            [
                f"This part was re-run on {r['date']} by `{r['command']}` ({r['minutes']:.1f} min).",
                "",
            ]
            if (r := meta.get("conv_rerun"))
            else []
        ),
        *([conv_verdict(conv), ""] if conv else []),
        table(conv),
        "",
        *(peak_note(conv[0], conv[1], "the 4-conv net") if len(conv) > 1 else []),
    ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


@suite("rad-mnist", "RAD (MLP 3x300, 4-conv net) vs memory-matched small batch, checkpointing")
def run(out: Path, quick: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    p = QUICK if quick else FULL
    start, load_before = time.time(), reporting.load()
    splits = _mnist(p)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        chosen = tune(runs, splits, p)
        per_seed = mlp_runs(runs, splits, p, chosen)
        conv = conv_runs(runs, p, splits) if p["conv_steps"] else []
    rows = {label: aggregate(label, summaries) for label, summaries in per_seed.items()}
    plot_curves(
        {k: list(zip(r["curve_steps"], r["curve_mean"], strict=True)) for k, r in rows.items()},
        out / "accuracy.png",
        "MNIST MLP 3x300, batch 150 (mean over seeds, band = 1 std)",
        bands={k: r["curve_std"] for k, r in rows.items()},
    )
    meta = {
        **reporting.run_meta(
            f"randprop bench rad-mnist --out {out}" + (" --quick" if quick else ""),
            start,
            load_before,
            threads="1 per run",
        ),
        "cpu_minutes": time.process_time() / 60,
        "checkpoint_matches_exact": per_seed["checkpointing"][0]["curve"]
        == per_seed["exact"][0]["curve"],
    }
    results = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
               "meta": meta, "learning_rates": chosen, "mlp": rows,
               "mlp_runs": per_seed, "conv": conv}  # fmt: skip
    report(out, p, chosen, rows, conv, meta)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


@suite("rad-mnist-conv", "re-run only the 4-conv-net part of rad-mnist in OUT (MLP part reused)")
def run_conv_only(out: Path, quick: bool = False) -> dict:
    """Re-run the conv-net runs and rewrite OUT/report.md, keeping OUT/results.json's MLP part."""
    results = json.loads((out / "results.json").read_text())
    p = QUICK if quick else FULL
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results["conv"] = conv_runs(Path(tmp), p, _mnist(p))
    results["settings"]["conv_steps"] = p["conv_steps"]
    results["meta"]["conv_rerun"] = {
        "command": f"randprop bench rad-mnist-conv --out {out}",
        "date": reporting.date(),
        "minutes": (time.time() - start) / 60,
        "load_after": reporting.load(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    rewrite_report(out)
    return results
