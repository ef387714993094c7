"""SparseVJP benchmark: backward time and stored bytes against exact, and the paper's trade-off
between cost per epoch and epochs to a target accuracy.

- timing: a 784-1024-1024-1024-10 MLP at batch 256 on MNIST; forward and backward time of each
  sketch / structure at density 0.25 (row also at 0.5 and 0.1), interleaved with exact so that
  load on the machine hits both alike; bytes saved for backward.
- trade-off: an MLP (784-1024-1024-10), a small BagNet and a small ViT trained on MNIST with
  row, column and element sketches at densities {1, 0.5, 0.25, 0.1} for a fixed budget of epochs (an epoch is a pass over a fixed
  seeded subset of the training set, scaled for CPU); per run the test accuracy per epoch, the
  epochs to reach the target accuracy, the measured step cost against exact, and their product.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from randprop.convert import convert
from randprop.data import Splits
from randprop.experiments import report
from randprop.experiments.registry import suite
from randprop.measure.saved import track_saved
from randprop.models.feedforward import mlp
from randprop.models.vision import bagnet, vit
from randprop.train import TrainConfig, evaluate, train
from randprop.train.loop import epoch_batches, permutations

TIMING_METHODS = (
    "vjp:density=0.5,structure=row",
    "vjp:density=0.25,structure=row",
    "vjp:density=0.1,structure=row",
    "vjp:density=0.25,sketch=lowrank,structure=row",
    "vjp:density=0.25,sketch=gaussian,structure=row",
    "vjp:density=0.25,structure=column",
    "vjp:density=0.25,sketch=lowrank,structure=column",
    "vjp:density=0.25,structure=element",
    "vjp:density=0.25,sketch=optimal,structure=element",
)
DENSITIES = (0.5, 0.25, 0.1)


@dataclasses.dataclass(frozen=True)
class Setup:
    """One model of the trade-off study and how it is trained."""

    build: Callable[[], nn.Module]
    head: str  # the output layer, left exact: sketching the logits saves nothing
    batch: int
    train_size: int  # examples per epoch (a fixed seeded subset of MNIST's training split)
    epochs: int
    variants: tuple[str, ...]  # method templates, "{q}" = density


ROW = "vjp:density={q},structure=row"
COLUMN = "vjp:density={q},structure=column"
ELEMENT = "vjp:density={q},structure=element"
OPTIMAL = "vjp:density={q},sketch=optimal,structure=element"


def setups(quick: bool) -> dict[str, Setup]:
    """The three models, each at batch 128 with row and column sketches and one element-wise
    variant; quick: a smoke run of every row, table and plot on 1/16 of the examples."""
    scale = 16 if quick else 1
    epochs = 2 if quick else 6

    def setup(build: Callable[[], nn.Module], head: str, train_size: int, element: str) -> Setup:
        return Setup(build, head, 128, train_size // scale, epochs, (ROW, COLUMN, element))

    return {
        "mlp": setup(lambda: mlp(hidden=1024, depth=2), "5", 5120, OPTIMAL),
        "bagnet": setup(lambda: bagnet(width=16), "classifier", 3200, ELEMENT),
        "vit": setup(lambda: vit(dim=64, depth=2), "head", 6400, OPTIMAL),
    }


# --- measurements ---------------------------------------------------------------------------


def _fwd_bwd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    mid = time.perf_counter()
    loss.backward()
    return mid - start, time.perf_counter() - mid


def interleaved_times(
    models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, repeats: int
) -> dict[str, dict[str, float]]:
    """Median forward / backward seconds per model, measured round-robin (2 warm-up rounds)."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for r in range(repeats + 2):
        for name, model in models.items():
            t = _fwd_bwd(model, x, y)
            if r >= 2:
                times[name].append(t)
    return {
        name: {
            "forward_s": statistics.median(f for f, _ in ts),
            "backward_s": statistics.median(b for _, b in ts),
        }
        for name, ts in times.items()
    }


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    with track_saved() as saved:
        out = model(x)
    del out
    return saved.bytes


def converted(model: nn.Module, method: str, seed: int = 0, exact: str | None = None) -> nn.Module:
    """A converted deep copy; the layer named ``exact`` (if any) is left as it is."""
    clone = copy.deepcopy(model)
    if method != "exact":
        convert(clone, method, seed=seed, module_filter_fn=lambda m, name: name != exact)
    return clone


def timing_table(x: torch.Tensor, y: torch.Tensor, repeats: int) -> list[dict]:
    base = mlp(hidden=1024, depth=3)
    models = {m: converted(base, m) for m in ("exact", *TIMING_METHODS)}
    times = interleaved_times(models, x, y, repeats)
    exact = times["exact"]
    exact_bytes = saved_bytes(models["exact"], x)
    rows = []
    for name, t in times.items():
        nbytes = saved_bytes(models[name], x)
        rows.append(
            {
                "method": name,
                **t,
                "backward_ratio": t["backward_s"] / exact["backward_s"],
                "step_ratio": (t["forward_s"] + t["backward_s"])
                / (exact["forward_s"] + exact["backward_s"]),
                "saved_bytes": nbytes,
                "saved_ratio": nbytes / exact_bytes,
            }
        )
    return rows


# --- training -------------------------------------------------------------------------------


def train_run(setup: Setup, method: str, data: dict[str, torch.Tensor], seed: int = 0) -> dict:
    """Train from the same initialisation and data order as every other run of this model."""
    with torch.random.fork_rng():  # the user's side: initialisation, global RNG restored after
        torch.manual_seed(seed)
        model = setup.build()
    xs, ys = data["train_x"], data["train_y"]
    test = TensorDataset(data["test_x"], data["test_y"])
    splits = Splits("mnist-subset", TensorDataset(xs, ys), test, test, num_classes=10,
                    input_shape=tuple(xs.shape[1:]))  # fmt: skip
    per_epoch = len(xs) // setup.batch
    order = permutations(len(xs), torch.Generator().manual_seed(seed))
    accs, losses, epoch_losses = [], [], []

    def on_step(step: int, loss: float) -> None:
        epoch_losses.append(loss)
        if step % per_epoch == 0:
            losses.append(sum(epoch_losses) / per_epoch)
            epoch_losses.clear()
            accs.append(evaluate(model, test, 1000, torch.device("cpu"))["accuracy"])

    cfg = TrainConfig(model=type(model).__name__, method={setup.head: "exact", "*": method},
                      batch=setup.batch, steps=setup.epochs * per_epoch, seed=seed,
                      log_every=0, progress=False)  # fmt: skip
    summary = train(cfg, splits=splits, model=model, callback=on_step,
                    batches=epoch_batches(len(xs), setup.batch, order))  # fmt: skip
    return {
        "method": method,
        "test_accuracy": accs,
        "train_loss": losses,
        "train_seconds": summary["wall_seconds"],
    }


def epochs_to(accs: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accs) if a >= target), None)


def load_mnist(train_size: int, test_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from randprop.data import load_dataset

    splits = load_dataset("mnist", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tx, ty = splits.train.tensors
    idx = torch.randperm(len(tx), generator=gen)[:train_size]
    sx, sy = splits.test.tensors
    return {
        "train_x": tx[idx],
        "train_y": ty[idx],
        "test_x": sx[:test_size],
        "test_y": sy[:test_size],
    }


def variant_label(method: str) -> str:
    """ "row", "column", "element" or "optimal-element" (the sketch family of a method)."""
    if method == "exact":
        return "exact"
    structure = method.split("structure=")[1].split(",")[0]
    return f"optimal-{structure}" if "sketch=optimal" in method else structure


def tradeoff(name: str, setup: Setup, test_size: int, repeats: int) -> dict:
    data = load_mnist(setup.train_size, test_size)
    methods = ["exact"] + [v.format(q=q) for v in setup.variants for q in DENSITIES]
    runs = {m: train_run(setup, m, data) for m in methods}
    exact_accs = runs["exact"]["test_accuracy"]
    # exact's accuracy after a third of the budget: a run may take up to 3x exact's epochs
    target = exact_accs[max(1, setup.epochs // 3) - 1]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = setup.build()
    # clone: a view would make track_saved count the whole training tensor's storage
    x, y = data["train_x"][: setup.batch].clone(), data["train_y"][: setup.batch].clone()
    models = {m: converted(base, m, exact=setup.head) for m in methods}
    times = interleaved_times(models, x, y, repeats)
    exact_step = times["exact"]["forward_s"] + times["exact"]["backward_s"]
    exact_bytes = saved_bytes(models["exact"], x)
    exact_epochs = epochs_to(exact_accs, target)
    rows = []
    for m in methods:
        epochs = epochs_to(runs[m]["test_accuracy"], target)
        cost = (times[m]["forward_s"] + times[m]["backward_s"]) / exact_step
        rows.append(
            {
                **runs[m],
                "density": 1.0 if m == "exact" else float(m.split("density=")[1].split(",")[0]),
                "variant": variant_label(m),
                "final_accuracy": runs[m]["test_accuracy"][-1],
                "epochs_to_target": epochs,
                "backward_ratio": times[m]["backward_s"] / times["exact"]["backward_s"],
                "cost_per_epoch_ratio": cost,
                "relative_cost_to_target": None if epochs is None else cost * epochs / exact_epochs,
                "saved_ratio": saved_bytes(models[m], x) / exact_bytes,
            }
        )
    return {
        "model": name,
        "exact_layer": setup.head,
        "target_accuracy": target,
        "batch": setup.batch,
        "train_size": setup.train_size,
        "epochs": setup.epochs,
        "runs": rows,
    }


# --- report ---------------------------------------------------------------------------------


def _plots(out: Path, results: dict) -> list[str]:
    plt = report.pyplot()

    names = []
    fig, axes = plt.subplots(1, len(results["tradeoff"]), figsize=(5 * len(results["tradeoff"]), 4))
    for ax, study in zip(axes, results["tradeoff"], strict=True):
        for variant in dict.fromkeys(r["variant"] for r in study["runs"][1:]):
            pts = [r for r in study["runs"] if r["variant"] in (variant, "exact")]
            pts.sort(key=lambda r: r["density"])
            xs = [r["density"] for r in pts if r["relative_cost_to_target"] is not None]
            ys = [
                r["relative_cost_to_target"]
                for r in pts
                if r["relative_cost_to_target"] is not None
            ]
            ax.plot(xs, ys, "o-", label=f"{variant}: cost x epochs to target")
            ax.plot(
                [r["density"] for r in pts],
                [r["cost_per_epoch_ratio"] for r in pts],
                "x--",
                label=f"{variant}: cost per epoch",
            )
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("density q")
        ax.set_ylabel("relative to exact")
        ax.set_title(f"{study['model']} (target {study['target_accuracy']:.3f})")
        ax.legend(fontsize=7)
    names.append(report.save_figure(fig, out / "tradeoff.png", dpi=110))

    fig, axes = plt.subplots(1, len(results["tradeoff"]), figsize=(5 * len(results["tradeoff"]), 4))
    for ax, study in zip(axes, results["tradeoff"], strict=True):
        for r in study["runs"]:
            label = "exact" if r["method"] == "exact" else f"{r['variant']} q={r['density']}"
            ax.plot(range(1, len(r["test_accuracy"]) + 1), r["test_accuracy"], "o-", label=label)
        ax.axhline(study["target_accuracy"], color="gray", lw=0.8, ls=":")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.set_title(study["model"])
        ax.legend(fontsize=6)
    names.append(report.save_figure(fig, out / "accuracy.png", dpi=110))

    fig, ax = plt.subplots(figsize=(8, 4))
    rows = results["timing"]
    ax.barh([r["method"].replace("vjp:", "") for r in rows], [r["backward_ratio"] for r in rows])
    ax.axvline(0.6, color="red", lw=0.8, ls="--")
    ax.set_xlabel("backward time / exact (MLP 784-1024x3-10, batch 256)")
    names.append(report.save_figure(fig, out / "backward_time.png", dpi=110))
    return names


def _fmt(v) -> str:
    if v is None:
        return "not reached"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _verdict(results: dict) -> list[str]:
    """Plain statements, computed from the numbers, of what the trade-off study showed."""
    lines = []
    for study in results["tradeoff"]:
        runs = [r for r in study["runs"] if r["method"] != "exact"]
        reached = [r for r in runs if r["relative_cost_to_target"] is not None]
        cheaper = [r for r in reached if r["relative_cost_to_target"] < 1]
        best = min(reached, key=lambda r: r["relative_cost_to_target"], default=None)
        text = f"- {study['model']}: {len(reached)} of {len(runs)} sketched runs reached the target"
        if best is not None:
            text += (
                f"; the cheapest was {best['variant']} at q={best['density']} "
                f"({best['relative_cost_to_target']:.2f}x exact's cost to target)"
            )
        text += (
            f"; {len(cheaper)} reached it at lower total cost than exact."
            if cheaper
            else "; none reached it at lower total cost than exact."
        )
        lines.append(text)
    return lines


def _report(results: dict, plots: list[str], quick: bool) -> str:
    claim = next(r for r in results["timing"] if r["method"] == "vjp:density=0.25,structure=row")
    held = claim["backward_ratio"] <= 0.6
    lines = [
        "# SparseVJP: backward time, stored bytes and the epochs-vs-cost trade-off",
        "",
        f"Command: `randprop bench vjp --out benchmarks/results/vjp{' --quick' if quick else ''}`",
        f"Machine: {results['machine']}; date {results['date']}; load average before / after "
        f"{results['load_before']} / {results['load_after']}; wall {results['wall_seconds']:.0f} s.",
        "",
        "## Backward time at width 1024 (784-1024-1024-1024-10 MLP, batch 256, MNIST batch)",
        "",
        "Medians of interleaved repeats; ratios against exact measured in the same rounds. "
        "Saved bytes: activation memory held for backward (track_saved).",
        "",
        "| method | forward ms | backward ms | backward / exact | step / exact | saved / exact |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["timing"]:
        lines.append(
            f"| {r['method']} | {1e3 * r['forward_s']:.1f} | {1e3 * r['backward_s']:.1f} | "
            f"{r['backward_ratio']:.2f} | {r['step_ratio']:.2f} | {r['saved_ratio']:.2f} |"
        )
    lines += [
        "",
        f"Claim (density 0.25, row structure, backward <= 0.6x exact at width >= 1024): "
        f"**{'held' if held else 'did not hold'}** (measured {claim['backward_ratio']:.2f}x; "
        f"stored activations {claim['saved_ratio']:.2f}x exact).",
        "",
        "## Trade-off: epochs to target x cost per epoch",
        "",
        "Each model trained with Adam (lr 1e-3) from the same initialisation and data order at "
        "every density; the sketch is inserted at the outputs of every Linear / Conv2d except the "
        "output layer (left exact: sketching the logits' gradient saves nothing), each layer "
        "with its own independent draw. Variants: row / column / element = uniform sketch with "
        "that structure; optimal-element = minimal-variance element sketch. Target = exact's "
        "test accuracy after a third of the epoch budget, so a run may need up to 3x exact's "
        "epochs. Cost per epoch = measured (forward + backward) time per step / exact's, "
        "interleaved. Relative cost to target = cost per epoch x epochs to target / exact's "
        "epochs to target (below 1: the sketch reaches the target cheaper than exact). "
        "Sketched models also swap ReLU for exact 1-bit-mask ReLU (what lets dropped rows go "
        "unstored); its packing is part of their measured cost, exact uses PyTorch's ReLU. "
        "With independent draws per layer, an example's signal survives m row-sketched layers "
        "with probability q^m (scaled by q^-m), so row variance grows geometrically with depth.",
        "",
    ]
    for study in results["tradeoff"]:
        lines += [
            f"### {study['model']} (batch {study['batch']}, {study['train_size']} training "
            f"examples per epoch, {study['epochs']} epochs, target {study['target_accuracy']:.4f}, "
            f"output layer {study['exact_layer']!r} exact)",
            "",
            "| method | final test acc | epochs to target | backward / exact | cost per epoch | "
            "relative cost to target | saved / exact |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in study["runs"]:
            lines.append(
                f"| {r['method']} | {r['final_accuracy']:.4f} | {_fmt(r['epochs_to_target'])} | "
                f"{r['backward_ratio']:.2f} | {r['cost_per_epoch_ratio']:.2f} | "
                f"{_fmt(r['relative_cost_to_target'])} | {r['saved_ratio']:.2f} |"
            )
        lines.append("")
    lines += ["## Verdict", "", *_verdict(results), ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "## Scaling", "", results["scaling"], ""]
    return "\n".join(lines)


@suite("vjp", "SparseVJP: backward time vs exact (MLP width 1024), cost x epochs trade-off")
def run(out: Path, quick: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: several threads per process oversubscribe it
    try:
        return _run(out, quick)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, quick: bool) -> dict:
    start = time.perf_counter()
    load_before = report.load()
    data = load_mnist(256, 10)
    results: dict = {
        "machine": report.machine(),
        "date": report.date(),
        "load_before": load_before,
        "timing": timing_table(data["train_x"], data["train_y"], repeats=1 if quick else 15),
    }
    test_size = 100 if quick else 2000
    results["tradeoff"] = []
    for name, setup in setups(quick).items():
        results["tradeoff"].append(tradeoff(name, setup, test_size, repeats=1 if quick else 10))
        (out / "results.json").write_text(json.dumps(results, indent=2))  # partial, as it goes
    results["scaling"] = (
        "Scaled for about 15 minutes on a shared 2-core CPU: an epoch is a pass over a fixed "
        "seeded subset of MNIST's training split (sizes above, not 54,000), test accuracy on the "
        f"first {test_size} test images, timings single-threaded, the BagNet at width 16 and the ViT at width 64 with 2 "
        "blocks; one seed per run."
        + (
            " Quick mode: everything scaled down further (smoke run, not a result)."
            if quick
            else ""
        )
    )
    results["load_after"] = report.load()
    results["wall_seconds"] = time.perf_counter() - start
    plots = _plots(out, results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(_report(results, plots, quick))
    return results
