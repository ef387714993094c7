"""Forward + backward time of rp.Quant against exact backprop on a wide MLP (four 2048 -> 2048
Linear layers with ReLU, batch 256), and write it as markdown with the command, machine, torch
threads, load and date.

    PYTHONPATH=src .venv/bin/python benchmarks/quant_time.py benchmarks/results/quant/time.md

The converted model is what rp.convert gives (Quant layers and 1-bit ReLU masks). Exact and
each Quant width run alternately in one process, so that a change in the machine's load
reaches them alike; the figures are medians over the repeats, the ratio that of the medians.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import randprop as rp

WIDTH, DEPTH, BATCH, REPEATS, THREADS = 2048, 4, 256, 15, 1


def wide_mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def step(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward and backward pass (the loss: the outputs' mean square)."""
    start = time.perf_counter()
    model(x).square().mean().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    with rp.track_saved(model) as saved:
        loss = model(x).square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved.bytes


def main(path: Path) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    load = os.getloadavg()
    exact = wide_mlp()
    models = {"exact": exact}
    for bits in (2, 4, 8):
        models[f"quant:bits={bits}"] = copy.deepcopy(exact)
        rp.convert(models[f"quant:bits={bits}"], rp.Quant(bits=bits))
    x = torch.randn(BATCH, WIDTH)
    for model in models.values():  # warm-up
        step(model, x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(REPEATS):
        for name, model in models.items():
            times[name].append(step(model, x))
    base = statistics.median(times["exact"])
    base_bytes = saved_bytes(exact, x)
    lines = [
        f"# rp.Quant: forward + backward time, wide MLP ({DEPTH} x Linear {WIDTH} -> {WIDTH} "
        f"with ReLU, batch {BATCH})",
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/quant_time.py {path}`  ",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores (shared), torch "
        f"{torch.__version__}, {torch.get_num_threads()} torch thread; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.",
        "",
        f"Exact and each Quant width alternate in one process, {REPEATS} repeats after a "
        "warm-up; medians (and the fastest) in seconds per forward + backward; the converted "
        "model also has rp.convert's 1-bit ReLU masks. Saved bytes: rp.track_saved.",
        "",
        "| method | median s | min s | median / exact | saved bytes | exact / saved |",
        "|---|---|---|---|---|---|",
    ]
    for name, model in models.items():
        med, nbytes = statistics.median(times[name]), saved_bytes(model, x)
        lines.append(
            f"| {name} | {med:.4f} | {min(times[name]):.4f} | {med / base:.3f}x | {nbytes} "
            f"| {base_bytes / nbytes:.1f}x |"
        )
    lines.append(f"\nLoad average after: {os.getloadavg()[0]:.2f}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
