"""What every suite's report shares: the machine and load line, markdown tables, plotting."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def machine(threads: int | str | None = None) -> str:
    """'arch processor, N CPUs, T thread(s), torch V, CPU' (T: torch's current setting unless
    given, e.g. "1 per run")."""
    threads = torch.get_num_threads() if threads is None else threads
    return (
        f"{' '.join(filter(None, (platform.machine(), platform.processor())))}, {os.cpu_count()} CPUs, "
        f"{threads} thread(s), torch {torch.__version__}, CPU"
    )


def load() -> str:
    """The 1 / 5 / 15 minute load averages, 'n/a' where the system has none."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def date() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def run_meta(command: str, start: float, load_before: str, threads: int | str = 1) -> dict:
    """What a suite's results.json says of its run: the command, machine, date, the load
    averages before and now, and the minutes since ``start`` (a ``time.time()``)."""
    return {
        "command": command,
        "machine": machine(threads),
        "date": date(),
        "load_before": load_before,
        "load_after": load(),
        "minutes": (time.time() - start) / 60,
    }


def run_header(title: str, meta: dict, suffix: str = "") -> list[str]:
    """A report's first lines: its title, then the command and machine lines of
    :func:`run_meta`'s ``meta`` (``suffix``: appended to the wall time, e.g. " so far")."""
    return [
        f"# {title}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['date']}; load average {meta['load_before']} at the "
        f"start, {meta['load_after']} at the end; {meta['minutes']:.1f} min wall{suffix}.",
        "",
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a markdown table (cells formatted with str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int) -> str:
    """Lay ``fig`` out, write it to ``path`` at ``dpi`` and close it; returns the file's name."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path.name
