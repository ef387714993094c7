"""RAD paper, recurrent networks: IRNN (hidden 100) on sequential MNIST.

Three runs at (about) one memory budget, as in the paper: exact backprop at batch 150, RAD
(keep 0.1: a tenth of every input row and hidden state stored, 1-bit ReLU masks) at batch 150,
and exact backprop at the largest batch whose measured saved bytes (rp.track_saved) do not
exceed RAD's at 150 (the memory-matched small batch). Rows of the image are the 28 time steps;
``rad-rnn-pixels`` reads one pixel per step (784 steps).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from randprop.convert import convert
from randprop.data import load_dataset
from randprop.experiments import report
from randprop.experiments.registry import quick_splits, suite
from randprop.measure.profile import saved_for_backward
from randprop.models import build_model
from randprop.random import derive_seed, generator
from randprop.train import TrainConfig, evaluate, train
from randprop.train.baselines import largest_batch

BATCH = 150
KEEP = 0.1
LR = 1e-3


def _build(name: str, seed: int, pixels: bool = False):
    with torch.random.fork_rng():  # the head's default init draws from the global RNG
        torch.manual_seed(seed)
        return build_model(name, pixels=pixels, **({"seed": seed} if name == "irnn" else {}))


def _model(name: str, method: str, seed: int, pixels: bool = False):
    model = _build(name, seed, pixels)
    convert(model, method, seed=seed)
    return model


def saved_bytes(name: str, method: str, x: torch.Tensor, y: torch.Tensor, pixels: bool) -> int:
    """Bytes saved for backward by one forward + loss (mean over 3 draws for RAD)."""
    draws = 3 if method != "exact" else 1
    x, y = x.clone(), y.clone()  # a view would count its whole base storage as saved
    values = [saved_for_backward(_model(name, method, s, pixels), x, y).bytes for s in range(draws)]
    return round(statistics.mean(values))


def memory_table(train, pixels: bool, batch: int = BATCH) -> tuple[list[dict], int]:
    x, y = train.tensors
    x, y = x[:batch], y[:batch]
    steps = 784 if pixels else 28
    rows = []
    for name in ("irnn", "lstm"):
        exact = None
        for method in ("exact", f"rad:keep={KEEP}", f"rad:keep={KEEP},mode=project"):
            b = saved_bytes(name, method, x, y, pixels)
            exact = exact or b
            rows.append(
                {
                    "model": name,
                    "steps": steps,
                    "method": method,
                    "batch": batch,
                    "saved_bytes": b,
                    "exact_over": exact / b,
                }
            )
        if name == "irnn":
            budget = rows[1]["saved_bytes"]
            small = largest_batch(
                lambda b, budget=budget: (
                    saved_bytes("irnn", "exact", x[:b], y[:b], pixels) <= budget
                ),
                len(x),
            )
            b = saved_bytes(name, "exact", x[:small], y[:small], pixels)
            rows.append(
                {
                    "model": name,
                    "steps": steps,
                    "method": "exact",
                    "batch": small,
                    "saved_bytes": b,
                    "exact_over": exact / b,
                }
            )
    return rows, small


def train_run(
    splits,
    method: str,
    batch: int,
    iterations: int,
    seed: int,
    pixels: bool,
    every: int,
    val_size: int,
) -> dict:
    """Adam on the IRNN; train loss per iteration, validation accuracy every ``every``."""
    model = _build("irnn", seed, pixels)
    n = len(splits.train)
    val = TensorDataset(*(t[:val_size] for t in splits.val.tensors))
    gen = generator(derive_seed(seed, 7))
    losses, val_acc, cpu = [], [], {"seconds": 0.0, "last": time.process_time()}

    def on_step(it: int, loss: float) -> None:
        cpu["seconds"] += time.process_time() - cpu["last"]
        losses.append(loss)
        if it % every == 0 or it == iterations:
            val_acc.append((it, evaluate(model, val, 2000, torch.device("cpu"))["accuracy"]))
        cpu["last"] = time.process_time()

    cfg = TrainConfig(model="irnn", data="seq-mnist", method=method, batch=batch,
                      steps=iterations, seed=seed, lr=LR, log_every=0, eval_batch=2000,
                      progress=False)  # fmt: skip
    summary = train(cfg, splits=splits, model=model, callback=on_step,
                    batches=lambda _: torch.randint(0, n, (batch,), generator=gen))  # fmt: skip
    return {
        "method": method,
        "batch": batch,
        "seed": seed,
        "train_loss": losses,
        "val_accuracy": val_acc,
        "test_accuracy": summary["test_accuracy"],
        "cpu_seconds_per_iteration": cpu["seconds"] / iterations,
    }


def _first_reaching(val: list, level: float) -> int | None:
    return next((it for it, acc in val if acc >= level), None)


def _smooth(values: list[float], width: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def _plots(out: Path, results: dict) -> None:
    plt = report.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {}
    for run in results["runs"]:
        label = f"{run['method']} b={run['batch']}"
        color = colors.setdefault(label, f"C{len(colors)}")
        kw = {"color": color, "label": label if run["seed"] == results["seeds"][0] else None}
        axes[0].semilogy(_smooth(run["train_loss"], 50), lw=0.8, **kw)
        its, acc = zip(*run["val_accuracy"], strict=True)
        axes[1].plot(its, acc, "o-", ms=3, **kw)
    axes[0].set(xlabel="iteration", ylabel="train loss (moving mean of 50)")
    axes[1].set(xlabel="iteration", ylabel="validation accuracy", ylim=(0.5, 1.0))
    for ax in axes:
        ax.legend()
    fig.suptitle(f"IRNN on sequential MNIST ({results['steps']} steps), one line per seed")
    report.save_figure(fig, out / "curves.png", dpi=120)


def _report(out: Path, name: str, r: dict) -> str:
    lines = [
        f"# RAD for recurrent networks: IRNN on sequential MNIST ({r['steps']} steps)",
        "",
        f"Command: `randprop bench {name} --out {out}{' --quick' if r['quick'] else ''}`  ",
        f"Machine: {r['machine']}; load average {r['load']} at start; date {r['date']}; "
        f"wall time {r['wall_seconds']:.0f} s, CPU time {r['cpu_seconds']:.0f} s.",
        "",
        "## Bytes saved for backward (one forward + loss, rp.track_saved; RAD: mean of 3 draws)",
        "",
        f"| model | steps | method | batch | saved bytes | exact@{r['batch']} / this |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["memory"]:
        lines.append(
            f"| {row['model']} | {row['steps']} | {row['method']} | {row['batch']} "
            f"| {row['saved_bytes']:,} | {row['exact_over']:.2f}x |"
        )
    lines += [
        "",
        f"Memory-matched small batch: **{r['small_batch']}** (the largest batch whose exact "
        f"saved bytes do not exceed RAD keep={KEEP}'s at batch {r['batch']}; the paper found 21). "
        "The IRNN stores 1-bit masks of its hidden states and a tenth of inputs and hidden "
        "states; the LSTM must also store its gates and cell states exactly, so it saves less.",
        "",
        f"## Training (Adam lr {LR}, {r['iterations']} iterations, seeds {r['seeds']})",
        "",
        "| method | batch | seed | final val acc | test acc | iterations to 90% val "
        "| to 95% val | CPU s / iteration |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        reach = [_first_reaching(run["val_accuracy"], level) for level in (0.9, 0.95)]
        reach = [str(i) if i is not None else "not reached" for i in reach]
        lines.append(
            f"| {run['method']} | {run['batch']} | {run['seed']} "
            f"| {run['val_accuracy'][-1][1]:.4f} | {run['test_accuracy']:.4f} "
            f"| {reach[0]} | {reach[1]} | {run['cpu_seconds_per_iteration']:.4f} |"
        )
    lines += ["", "Plot: curves.png (train loss, validation accuracy).", "", *r["notes"], ""]
    return "\n".join(lines)


def _summary(runs: list[dict]) -> dict:
    """Mean test accuracy and mean iterations to 90% per (method, batch)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(f"{run['method']} b={run['batch']}", []).append(run)
    return {
        key: {
            "test_accuracy": statistics.mean(g["test_accuracy"] for g in group),
            "iterations_to_90": [_first_reaching(g["val_accuracy"], 0.9) for g in group],
            "iterations_to_95": [_first_reaching(g["val_accuracy"], 0.95) for g in group],
        }
        for key, group in groups.items()
    }


def run_suite(out: Path, quick: bool, pixels: bool, name: str) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hidden 100: a second thread mostly spins
    try:
        return _run(out, quick, pixels, name)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, quick: bool, pixels: bool, name: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    began, cpu_began = time.perf_counter(), time.process_time()
    splits = load_dataset("seq-mnist", seed=0)
    if quick:  # a smoke run: every row and plot, on a few hundred examples
        splits, batch = quick_splits(splits, 100), 20
        iterations, seeds, every, val_size = 2, (0,), 1, 20
    elif pixels:
        batch, iterations, seeds, every, val_size = BATCH, 400, (0,), 50, 1000
    else:
        batch, iterations, seeds, every, val_size = BATCH, 8000, (0, 1, 2), 100, 2000
    memory, small = memory_table(splits.train, pixels, batch)
    runs = [
        train_run(splits, method, b, iterations, seed, pixels, every, val_size)
        for seed in seeds
        for method, b in (("exact", batch), (f"rad:keep={KEEP}", batch), ("exact", small))
    ]
    results = {
        "quick": quick,
        "machine": report.machine(),
        "load": report.load(),
        "date": report.date(),
        "steps": 784 if pixels else 28,
        "batch": batch,
        "iterations": iterations,
        "seeds": list(seeds),
        "small_batch": small,
        "memory": memory,
        "runs": runs,
        "summary": _summary(runs),
        "wall_seconds": time.perf_counter() - began,
        "cpu_seconds": time.process_time() - cpu_began,
    }
    results["notes"] = _notes(results, val_size)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plots(out, results)
    (out / "report.md").write_text(_report(out, name, results))
    return results


def _notes(r: dict, val_size: int) -> list[str]:
    s = r["summary"]
    batch = r["batch"]
    rad, small = s[f"rad:keep={KEEP} b={batch}"], s[f"exact b={r['small_batch']}"]
    exact = s[f"exact b={batch}"]
    return [
        "Scaled down from the paper (20k iterations, 5 seeds, learning rate tuned per method): "
        f"{r['iterations']} iterations, {len(r['seeds'])} seed(s), one learning rate for all, "
        f"validation accuracy on the first {val_size} validation examples; to fit ~15 minutes "
        "of CPU.",
        "",
        f"Mean test accuracy: exact b={batch} {exact['test_accuracy']:.4f}, RAD b={batch} "
        f"{rad['test_accuracy']:.4f}, exact b={r['small_batch']} {small['test_accuracy']:.4f}. "
        f"Iterations to 90% validation accuracy per seed: exact b={batch} "
        f"{exact['iterations_to_90']}, RAD {rad['iterations_to_90']}, small batch "
        f"{small['iterations_to_90']}; to 95%: exact {exact['iterations_to_95']}, RAD "
        f"{rad['iterations_to_95']}, small batch {small['iterations_to_95']} (None: not reached).",
        "",
        *(
            [
                f"No run learned within {r['iterations']} iterations (test accuracy at chance, "
                "one class predicted): the IRNN on 784 pixel steps needs far longer training "
                "than this budget allows, so only the memory figures above are informative.",
                "",
            ]
            if max(g["test_accuracy"] for g in s.values()) < 0.2
            else []
        ),
        f"Paper's claim for RNNs (at a fixed memory budget RAD converges in a similar number of "
        f"iterations as the small batch): {_verdict(rad, small)}",
    ]


def _verdict(rad: dict, small: dict) -> str:
    def mean_reach(d: dict) -> float:
        reached = [i for i in d["iterations_to_90"] if i is not None]
        return statistics.mean(reached) if len(reached) == len(d["iterations_to_90"]) else None

    a, b = mean_reach(rad), mean_reach(small)
    acc = f"final test accuracy RAD {rad['test_accuracy']:.4f} vs small batch {small['test_accuracy']:.4f}"
    if a is None or b is None:
        return f"not decided by the 90% criterion (not reached by every seed); {acc}."
    relation = "fewer" if a < 0.8 * b else "more" if a > 1.25 * b else "a similar number of"
    return (
        f"RAD needed {relation} iterations ({a:.0f} vs {b:.0f} to 90% validation accuracy); {acc}."
    )


@suite("rad-rnn", "IRNN on sequential MNIST rows: exact vs RAD keep 0.1 vs memory-matched batch")
def run(out: Path, quick: bool = False) -> dict:
    return run_suite(out, quick, pixels=False, name="rad-rnn")


@suite("rad-rnn-pixels", "IRNN on pixel-by-pixel MNIST (784 steps): the rad-rnn comparison")
def run_pixels(out: Path, quick: bool = False) -> dict:
    return run_suite(out, quick, pixels=True, name="rad-rnn-pixels")
