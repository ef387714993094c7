"""The trace-estimation paper's MNIST experiment (Louboutin et al., 2021) and a variance study.

1. Bytes saved for backward by the 3-conv net (trace-cnn) at batch 128: exact, and trace with
   r = 2 / 16 / 64 (first conv exact, as in the paper; and all convs), per module.
2. Weight-gradient time: forward + backward of single conv layers (input without grad, so only
   the weight gradient is computed), trace against exact in the same run.
3. Training: Adam 3e-3, batch 32 / 128 / 256, exact and r in {2, 16, 64} with the first conv
   exact; test accuracy with the saved bytes beside it.
4. Variance: relative variance of the conv weight gradients against r for each probe kind (and
   independent per-channel probes), and RAD's convolution sampling at equal stored bytes.
"""

from __future__ import annotations

import copy
import json
import math
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import randprop as rp
from randprop.data import Splits, load_dataset
from randprop.experiments import report
from randprop.experiments.registry import quick_splits, suite
from randprop.measure.profile import saved_for_backward
from randprop.train import TrainConfig, train
from randprop.train.loop import build_seeded

MODEL = "trace-cnn"
TRAINED_CONVS = ("3", "6")  # conv2 and conv3 of trace-cnn; conv "0" stays exact
FULL = {"batches": (32, 128, 256), "probes": (2, 16, 64), "examples": 135_000, "draws": 24,
        "var_probes": (2, 4, 8, 16, 32, 64), "time_repeats": 10}  # fmt: skip
# a smoke run of every row, table and plot, on the first ``split_examples`` of each split
QUICK = {"batches": (32,), "probes": (2,), "examples": 64, "draws": 2,
         "var_probes": (2, 16), "time_repeats": 1, "split_examples": 256}  # fmt: skip


def first_exact(method: str) -> dict[str, str]:
    """The paper's setting: the first convolution exact, everything else ``method``."""
    return {"0": "exact", "*": method}


def converted(model: nn.Module, method) -> nn.Module:
    clone = copy.deepcopy(model)
    rp.convert(clone, method)
    return clone


# --- 1. memory ------------------------------------------------------------------------------


def memory_table(batch: int = 128) -> list[dict]:
    model = build_seeded(MODEL, 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    methods = {"exact": "exact"}
    for r in (2, 16, 64):
        methods[f"trace r={r} (first conv exact)"] = first_exact(f"trace:probes={r}")
    methods["trace r=16 (all convs)"] = "trace:probes=16"
    methods["trace r=16 independent (first conv exact)"] = first_exact(
        "trace:probes=16,channels=independent"
    )
    rows, exact_bytes = [], None
    for label, method in methods.items():
        saved = saved_for_backward(converted(model, method), x, y)
        exact_bytes = exact_bytes or saved.bytes
        rows.append({"method": label, "batch": batch, "saved_bytes": saved.bytes,
                     "exact_over_method": exact_bytes / saved.bytes,
                     "by_module": saved.by_module})  # fmt: skip
    return rows


# --- 2. weight-gradient time ----------------------------------------------------------------


def _layer_times(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> tuple[float, float]:
    """Seconds of (forward + backward, backward alone) with only the weight (and bias) gradient
    (the input does not require grad)."""
    layer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = layer(x)
    middle = time.perf_counter()
    out.backward(upstream)
    end = time.perf_counter()
    return end - start, end - middle


TIME_LAYERS = {
    "trace-cnn conv2 16->32 3x3, 14x14, B=128": (nn.Conv2d(16, 32, 3, padding=1), (128, 16, 14, 14)),
    "trace-cnn conv3 32->32 3x3, 7x7, B=128": (nn.Conv2d(32, 32, 3, padding=1), (128, 32, 7, 7)),
    "64->64 3x3, 32x32, B=64": (nn.Conv2d(64, 64, 3, padding=1), (64, 64, 32, 32)),
    "depthwise 64 3x3, 32x32, B=64": (nn.Conv2d(64, 64, 3, padding=1, groups=64), (64, 64, 32, 32)),
}  # fmt: skip
TIME_METHODS = ("trace:probes=16", "trace:probes=64", "trace:probes=16,channels=independent")


def time_table(repeats: int) -> list[dict]:
    """Minimum over ``repeats`` rounds, methods interleaved within a round so that a burst of
    load on the shared machine hits all of them alike."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for label, (layer, shape) in TIME_LAYERS.items():
        x = torch.randn(shape, generator=gen)
        upstream = torch.randn_like(layer(x))
        layers = {"exact": layer, **{m: converted(layer, m) for m in TIME_METHODS}}
        best = {m: (math.inf, math.inf) for m in layers}
        for _ in range(repeats + 1):  # the first round warms up
            for m, mod in layers.items():
                both, back = _layer_times(mod, x, upstream)
                best[m] = (min(best[m][0], both), min(best[m][1], back))
        for m, (both, back) in best.items():
            rows.append({"layer": label, "method": m, "seconds": both, "backward_seconds": back,
                         "over_exact": both / best["exact"][0],
                         "backward_over_exact": back / best["exact"][1]})  # fmt: skip
    return rows


# --- 3. training ----------------------------------------------------------------------------


def train_run(splits, method, batch: int, examples: int, seed: int = 0) -> dict:
    """Adam 3e-3 with cosine decay over ``examples`` training examples (reshuffled each epoch);
    test accuracy at the end."""
    steps = max(1, examples // batch)
    xb, yb = (t[:batch].clone() for t in splits.train.tensors)  # own storage, not x_train's
    saved = saved_for_backward(converted(build_seeded(MODEL, seed), method), xb, yb).bytes
    cfg = TrainConfig(model=MODEL, method=method, batch=batch, steps=steps, seed=seed,
                      lr=3e-3, schedule="cosine", log_every=0, progress=False)  # fmt: skip
    s = train(cfg, splits=splits)
    return {"batch": batch, "steps": steps, "test_accuracy": s["test_accuracy"],
            "test_loss": s["test_loss"], "saved_bytes": saved,
            "train_seconds": s["train_seconds"]}  # fmt: skip


def _mnist(p: dict) -> Splits:
    splits = load_dataset("mnist", seed=0)
    return quick_splits(splits, p["split_examples"]) if "split_examples" in p else splits


def training_table(p: dict) -> list[dict]:
    splits = _mnist(p)
    rows = []
    for batch in p["batches"]:
        methods = {"exact": "exact"}
        methods.update({f"r={r}": first_exact(f"trace:probes={r}") for r in p["probes"]})
        for label, method in methods.items():
            rows.append({"method": label, **train_run(splits, method, batch, p["examples"])})
    return rows


# --- 4. variance ----------------------------------------------------------------------------


def relative_variance(model, method, x, y, exact: dict, draws: int) -> dict[str, float]:
    """sum_i Var(g_i) / |g|^2 of each trained conv's weight gradient over ``draws`` draws."""
    est = converted(model, first_exact(method))
    grads = {name: [] for name in TRAINED_CONVS}
    for _ in range(draws):
        est.zero_grad(set_to_none=True)
        F.cross_entropy(est(x), y).backward()
        for name in TRAINED_CONVS:
            grads[name].append(est.get_submodule(name).weight.grad.flatten().double())
    out = {}
    for name, gs in grads.items():
        g = torch.stack(gs)
        out[name] = (g.var(0).sum() / exact[name].double().pow(2).sum()).item()
    return out


def _stored_values(model, method, x, y, name: str) -> int:
    saved = saved_for_backward(converted(model, first_exact(method)), x, y)
    return saved.by_module[name] // 4


def variance_table(p: dict) -> list[dict]:
    """Trace (three probe kinds, multi-channel; gaussian independent) against r, and RAD at the
    same number of stored values per example in conv2 (16 channels x 14 x 14 inputs)."""
    splits = _mnist(p)
    x, y = (t[:128] for t in splits.train.tensors)
    model = build_seeded(MODEL, 0)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    exact = {n: model.get_submodule(n).weight.grad.clone() for n in TRAINED_CONVS}
    rows = []
    for r in p["var_probes"]:
        methods = {f"trace {kind}": f"trace:probes={r},probe={kind}"
                   for kind in ("gaussian", "rademacher", "orthogonal")}  # fmt: skip
        methods["trace gaussian independent"] = f"trace:probes={r},channels=independent"
        c, hw = 16, 14 * 14  # conv2's input: stored values per example at equal bytes = r
        if r >= c:
            # kept_count = ceil(keep * 196): half a value below k gives exactly k projections
            methods["RAD project (equal bytes)"] = (
                f"rad:keep={(r // c - 0.5) / hw:.6g},mode=project"
            )
        methods["RAD sample (equal bytes)"] = f"rad:keep={r / (c * hw):.6g}"
        for label, method in methods.items():
            rel = relative_variance(model, method, x, y, exact, p["draws"])
            stored = _stored_values(model, method, x, y, "3") / len(x)
            rows.append({"method": label, "probes": r, "spec": method,
                         "conv2_stored_per_example": stored,
                         "rel_var_conv2": rel["3"], "rel_var_conv3": rel["6"]})  # fmt: skip
    return rows


def slope(rows: list[dict], method: str, key: str = "rel_var_conv2") -> float:
    """Least-squares slope of log variance against log r (-1 for variance ~ 1/r)."""
    pts = [(math.log(r["probes"]), math.log(r[key])) for r in rows if r["method"] == method]
    if len(pts) < 2:
        return math.nan
    mx = sum(a for a, _ in pts) / len(pts)
    my = sum(b for _, b in pts) / len(pts)
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


# --- report ---------------------------------------------------------------------------------


def _method_plot(
    path: Path,
    rows: list[dict],
    x: str,
    y: str,
    axes: str,
    legend_size: int | None = None,
    **labels,
) -> str:
    """One line per method of ``rows``, y against x on ``axes`` ("loglog", "semilogx"), labelled
    by ``labels`` (xlabel, ylabel, title); written to ``path``, whose name it returns."""
    fig, ax = report.pyplot().subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(r[x], r[y]) for r in rows if r["method"] == method]
        getattr(ax, axes)(*zip(*pts, strict=True), marker="o", label=method)
    ax.set(**labels)
    ax.legend(fontsize=legend_size)
    return report.save_figure(fig, path, dpi=120)


def _plots(out: Path, results: dict) -> list[str]:
    variance = _method_plot(
        out / "variance.png",
        results["variance"],
        "probes",
        "rel_var_conv2",
        "loglog",
        legend_size=7,
        xlabel="probes r (RAD: same stored values per example as trace multi-channel)",
        ylabel="relative variance of conv2 dW",
        title="trace-cnn, MNIST batch 128",
    )
    accuracy = _method_plot(
        out / "accuracy.png",
        results["training"],
        "batch",
        "test_accuracy",
        "semilogx",
        xlabel="batch size",
        ylabel="test accuracy",
        title=f"trace-cnn on MNIST, {results['params']['examples']} training examples",
    )
    return [variance, accuracy]


def _report(out: Path, results: dict, quick: bool) -> str:
    p = results["params"]
    mem, times, train, var = (results[k] for k in ("memory", "time", "training", "variance"))
    lines = [
        "# Trace estimation on MNIST: the paper's 3-conv net, memory, time, variance",
        "",
        f"Command: `randprop bench trace-mnist --out {out}{' --quick' if quick else ''}`  ",
        f"Machine: {results['machine']}; load average at start {results['load_start']}, "
        f"at end {results['load_end']}; date {results['date']}; "
        f"total {results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU.",
        "",
        "Scaled down to fit about 15 minutes of a shared 2-core CPU: each training run sees "
        f"{p['examples']:,} examples (about {p['examples'] / 54000:.2f} epoch; the paper trained "
        "20 epochs, decaying the rate when validation accuracy stalled), one seed per setting, "
        "Adam 3e-3 with cosine decay to 0 over the run; the "
        f"variance study uses {p['draws']} draws per setting. Trace keeps the first conv exact "
        "in training, as the paper did.",
        "",
        "## Bytes saved for backward (trace-cnn, one forward + loss, rp.track_saved)",
        "",
        "ReLU and max pooling are exact under every method; under memory-saving methods convert "
        "swaps them for 1-bit ReLU masks and 1-byte max-pool window offsets.",
        "",
        "| method | batch | saved bytes | exact / method |",
        "|---|---|---|---|",
    ]
    for r in mem:
        lines.append(f"| {r['method']} | {r['batch']} | {r['saved_bytes']:,} | "
                     f"{r['exact_over_method']:.1f}x |")  # fmt: skip
    r16 = next(r for r in mem if r["method"] == "trace r=16 (first conv exact)")
    lines += ["", "Per module at r=16, first conv exact (bytes): " + ", ".join(
        f"{k or 'loss'}: {v:,}" for k, v in r16["by_module"].items()), ""]  # fmt: skip
    lines += [
        "## Weight-gradient time (one conv, input without grad: weight and bias gradient only)",
        "",
        f"Minimum over {p['time_repeats']} interleaved rounds. Forward + backward includes "
        "trace's projection of the input; backward is the weight-gradient computation itself.",
        "",
        "| layer | method | fwd+bwd s | / exact | bwd s | / exact |",
        "|---|---|---|---|---|---|",
    ]
    for r in times:
        lines.append(f"| {r['layer']} | {r['method']} | {r['seconds']:.4f} | "
                     f"{r['over_exact']:.2f}x | {r['backward_seconds']:.4f} | "
                     f"{r['backward_over_exact']:.2f}x |")  # fmt: skip
    lines += [
        "",
        "## Test accuracy (Adam 3e-3, cosine decay; trace with the first conv exact)",
        "",
        "| batch | method | steps | test accuracy | saved bytes | train seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in train:
        lines.append(f"| {r['batch']} | {r['method']} | {r['steps']} | {r['test_accuracy']:.4f} "
                     f"| {r['saved_bytes']:,} | {r['train_seconds']:.0f} |")  # fmt: skip
    lines += [
        "",
        "Paper (20 epochs): exact 0.992-0.994; r=2 0.94-0.97; r=16 0.974-0.983; r=64 0.980-0.988.",
        "",
        "## Variance of the conv weight gradients (MNIST batch 128, trace-cnn at init)",
        "",
        "Relative variance = sum of per-element variances / |exact gradient|^2. RAD rows store the "
        "same number of values per example in conv2 as trace does at that r (project: k = r/16 "
        "projections per channel; sample: keep = r / (16 * 196)); their conv3 column is not "
        "byte-matched (the same keep gives conv3, 32 x 7 x 7 inputs, other counts; project keeps "
        "1 projection per channel there at every r).",
        "",
        "| r | method | conv2 stored / example | rel. var conv2 | rel. var conv3 |",
        "|---|---|---|---|---|",
    ]
    for r in var:
        lines.append(f"| {r['probes']} | {r['method']} | {r['conv2_stored_per_example']:.1f} | "
                     f"{r['rel_var_conv2']:.3g} | {r['rel_var_conv3']:.3g} |")  # fmt: skip
    lines += ["", "Slope of log variance against log r (conv2; -1 means variance ~ 1/r): " + ", ".join(
        f"{m}: {s:.2f}" for m, s in results["slopes"].items()), ""]  # fmt: skip
    lines += ["## Claims", ""] + [f"- {c}" for c in results["claims"]]
    lines += ["", "Plots: " + ", ".join(f"![{f}]({f})" for f in results["plots"])]
    return "\n".join(lines) + "\n"


def _claims(results: dict) -> list[str]:
    mem, train, times = results["memory"], results["training"], results["time"]
    r16 = next(r for r in mem if r["method"] == "trace r=16 (first conv exact)")
    claims = [
        f"Whole-network bytes at r=16 (first conv exact) {r16['exact_over_method']:.1f}x below "
        f"exact: {'HELD' if r16['exact_over_method'] >= 10 else 'NOT MET'} (target >= 10x)."
    ]
    for batch in dict.fromkeys(r["batch"] for r in train):
        rows = {r["method"]: r for r in train if r["batch"] == batch}
        if "r=64" in rows:
            gap = rows["exact"]["test_accuracy"] - rows["r=64"]["test_accuracy"]
            claims.append(
                f"Batch {batch}: r=64 test accuracy {rows['r=64']['test_accuracy']:.4f} vs exact "
                f"{rows['exact']['test_accuracy']:.4f} (gap {100 * gap:.2f} points): "
                f"{'HELD' if gap <= 0.01 else 'NOT MET'} (target within 1 point)."
            )
    ratios = [f"{r['over_exact']:.2f}x / {r['backward_over_exact']:.2f}x" for r in times
              if r["method"] == "trace:probes=16"]  # fmt: skip
    claims.append("Weight-gradient time recorded: trace r=16 over exact, forward+backward / "
                  "backward, per layer in the table's order: " + ", ".join(ratios) + ".")  # fmt: skip
    for method, s in results["slopes"].items():
        if method in ("trace gaussian", "trace rademacher", "trace gaussian independent"):
            claims.append(f"{method}: variance slope {s:.2f} against log r (expected -1).")
    return claims


@suite("trace-mnist", "trace estimation (Louboutin et al.): trace-cnn memory, time, MNIST "
       "accuracy over batch and r, gradient variance vs r and vs RAD")  # fmt: skip
def run(out: Path, quick: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    p = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs on a shared CPU: one thread is fastest and fairest
    start = time.perf_counter()
    try:
        results = {
            "machine": report.machine(),
            "date": report.date(),
            "load_start": report.load(),
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
            "memory": memory_table(),
            "time": time_table(p["time_repeats"]),
            "variance": variance_table(p),
        }
        results["training"] = training_table(p)
    finally:
        torch.set_num_threads(threads)
    results["slopes"] = {
        m: slope(results["variance"], m)
        for m in dict.fromkeys(r["method"] for r in results["variance"])
    }
    results["seconds"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    results["load_end"] = report.load()
    results["claims"] = _claims(results)
    results["plots"] = _plots(out, results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(_report(out, results, quick))
    return results
