"""Side-by-side runs (method vs exact): the table, the markdown report and the accuracy plot."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, test accuracy) of every evaluation in ``run_dir``/metrics.jsonl."""
    points = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "test_accuracy" in record:
            points.append((record["step"], record["test_accuracy"]))
    return points


def with_ratios(rows: list[dict], reference: dict) -> list[dict]:
    """Add memory_vs_exact and time_vs_exact (this / reference) to each summary row."""
    for row in rows:
        row["memory_vs_exact"] = row["saved_bytes"] / max(reference["saved_bytes"], 1)
        row["time_vs_exact"] = row["seconds_per_step"] / reference["seconds_per_step"]
    return rows


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f} MiB"


def table(rows: list[dict], label_key: str = "label") -> str:
    """Markdown table: label, method, batch, test accuracy, saved bytes, peak memory (forward +
    backward, and the whole training step with the optimizer's) and ratios to exact."""
    lines = [
        "| run | method | batch | test accuracy | saved bytes | memory vs exact "
        "| peak fwd+bwd | peak step | s / step | time vs exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = r["test_accuracy"]
        acc_text = (
            f"{acc:.4f}"
            if "test_accuracy_std" not in r
            else (f"{acc:.4f} ± {r['test_accuracy_std']:.4f}")
        )
        lines.append(
            f"| {r[label_key]} | `{r['method']}` | {r['batch']} | {acc_text} "
            f"| {r['saved_bytes']:,} | {r['memory_vs_exact']:.2f}x "
            f"| {_mib(r.get('peak_forward_backward_bytes'))} | {_mib(r.get('peak_bytes'))} "
            f"| {r['seconds_per_step'] * 1000:.2f} ms | {r['time_vs_exact']:.2f}x |"
        )
    return "\n".join(lines)


def plot_curves(
    curves: dict[str, list[tuple[int, float]]], path: Path, title: str, bands: dict | None = None
) -> Path:
    """Test accuracy against iteration, one line per run (with a +-std band where given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ("-", "--", "-.", ":")  # runs that coincide (exact, checkpointing) stay visible
    for i, (label, points) in enumerate(curves.items()):
        steps = [p[0] for p in points]
        acc = [p[1] for p in points]
        (line,) = ax.plot(steps, acc, styles[i % 4], marker=".", label=label)
        if bands and label in bands:
            std = bands[label]
            ax.fill_between(
                steps,
                [a - s for a, s in zip(acc, std, strict=True)],
                [a + s for a, s in zip(acc, std, strict=True)],
                color=line.get_color(),
                alpha=0.2,
            )
    finite = [p[1] for pts in curves.values() for p in pts if not math.isnan(p[1])]
    if finite:
        ax.set_ylim(max(0.0, min(sorted(finite)[len(finite) // 10], 0.98) - 0.02), 1.0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
