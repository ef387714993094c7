"""Foundation benchmark: bytes saved for backward and step time, exact vs RAD.

- mlp and cnn at batch 150: saved bytes of exact and of RAD keep=0.1 (sample and project);
- a wide MLP (width 2048, batch 256): forward + backward time of RAD relative to exact.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from randprop.experiments import report
from randprop.experiments.registry import suite
from randprop.measure.profile import converted_copy, saved_for_backward, step_time
from randprop.models import build_model, input_shape
from randprop.models.feedforward import mlp

METHODS = ("exact", "rad:keep=0.1", "rad:keep=0.1,mode=project")


def memory_table(batch: int = 150, seed: int = 0) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for name in ("mlp", "cnn"):
        model = build_model(name)
        x = torch.randn(batch, *input_shape(name), generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        exact_bytes = None
        for method in METHODS:
            saved = saved_for_backward(converted_copy(model, method, seed), x, y)
            exact_bytes = exact_bytes or saved.bytes
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "batch": batch,
                    "saved_bytes": saved.bytes,
                    "ratio_vs_exact": exact_bytes / saved.bytes,
                }
            )
    return rows


def time_table(width: int = 2048, batch: int = 256, repeats: int = 10) -> list[dict]:
    """Median forward + backward seconds per method, the methods measured in alternation so
    that drift of the machine's speed falls on all of them alike."""
    gen = torch.Generator().manual_seed(0)
    model = mlp(in_features=width, hidden=width, depth=3, classes=10)
    x = torch.randn(batch, width, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    methods = (*METHODS, "rad:keep=0.1,same_sample=True")
    models = [converted_copy(model, method) for method in methods]
    times: list[list[float]] = [[] for _ in methods]
    for _ in range(repeats):
        for model_i, seconds in zip(models, times, strict=True):
            seconds.append(step_time(model_i, x, y, repeats=1, warmup=1))
    medians = [statistics.median(t) for t in times]
    return [
        {
            "method": method,
            "width": width,
            "batch": batch,
            "seconds": seconds,
            "ratio_vs_exact": seconds / medians[0],
        }
        for method, seconds in zip(methods, medians, strict=True)
    ]


@suite("rad-memory", "bytes saved for backward (mlp, cnn) and step time (wide MLP), exact vs RAD")
def run(out: Path, quick: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": report.machine(),
        "load": report.load(),
        "date": report.date(),
        "memory": memory_table(batch=150),
        "time": time_table(width=256 if quick else 2048, repeats=3 if quick else 15),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Bytes saved for backward and step time: exact vs RAD",
        "",
        f"Command: `randprop bench rad-memory --out {out}`  ",
        f"Machine: {results['machine']}; load average {results['load']} at start; "
        f"date {results['date']}.",
        "",
        "## Bytes saved for backward (one forward + loss, measured by rp.track_saved)",
        "",
        "| model | method | batch | saved bytes | exact / method |",
        "|---|---|---|---|---|",
    ]
    for r in results["memory"]:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['batch']} | {r['saved_bytes']:,} "
            f"| {r['ratio_vs_exact']:.2f}x |"
        )
    lines += [
        "",
        "## Forward + backward time, MLP 3 hidden layers (median of steps, methods alternating)",
        "",
        "| method | width | batch | seconds | method / exact |",
        "|---|---|---|---|---|",
    ]
    for r in results["time"]:
        lines.append(
            f"| {r['method']} | {r['width']} | {r['batch']} | {r['seconds']:.4f} "
            f"| {r['ratio_vs_exact']:.2f}x |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return results
