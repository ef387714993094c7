"""Forward + backward time and weight-gradient variance of every Linear estimator on a
transformer-shaped layer ([coverage] item 8): Linear 768 -> 3072, input 8 x 128 x 768 (its
gradient needed, as inside a transformer), each estimator storing about a quarter of X's bytes.

    PYTHONPATH=src .venv/bin/python benchmarks/transformer_layer_speed.py \
        benchmarks/results/transformer-layer-speed.md [SETTING ...]

SETTINGS after the output path time only those rows (and skip the CRS ``winners`` table).

Time: exact and every estimator alternate in one process, REPEATS rounds after a warm-up, at 1
torch thread and at the machine's thread count; each round gives each estimator's time over
exact's in that round, and the table shows the median of those ratios (fair under a changing
load). Variance: E|dW_hat - dW|^2 / |dW|^2 over DRAWS draws (fresh seeds, the same X and dY), the
weight gradient only (forward, input and bias gradients are exact for every unbiased estimator
here); "similar norms": Gaussian X and dY; "varied norms": rows of X and dY scaled by
log-normal factors (sigma 1), the case where keeping high-score rows could pay. CRS at several
``winners`` on both.
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

SHAPE, IN, OUT = (8, 128), 768, 3072
REPEATS, DRAWS = 9, 16
SETTINGS = (
    "rad:keep=0.25",
    "rad:keep=0.25,mode=project",
    "rad:keep=0.2,bits=2",
    "crs:keep=0.25",
    "crs:keep=0.25,winners=0.5",
    "sparsevjp:density=0.25,structure=row",
    "quant:bits=8",
    "quant:bits=2",
    "aop:keep=0.25",
)
WINNERS = (0.0, 0.25, 0.5, 0.75)


def layer(base: nn.Linear, setting: str | None) -> nn.Module:
    model = nn.Sequential(copy.deepcopy(base))
    if setting is not None:
        rp.convert(model, setting)
    return model


def step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Seconds of one forward and backward pass with upstream gradient ``dy``."""
    x.grad = None
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(x).backward(dy)
    return time.perf_counter() - start


def saved_bytes(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> int:
    with rp.track_saved(model) as saved:
        y = model(x)
    y.backward(dy)
    return saved.bytes


def time_ratios(models: dict[str, nn.Module], x, dy, threads: int) -> dict[str, tuple]:
    """{name: (median seconds, median ratio to exact in the same round)} at ``threads``."""
    torch.set_num_threads(threads)
    for model in models.values():
        step(model, x, dy)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(REPEATS):
        for name, model in models.items():
            times[name].append(step(model, x, dy))
    exact = times["exact"]
    return {
        name: (
            statistics.median(t),
            statistics.median(a / b for a, b in zip(t, exact, strict=True)),
        )
        for name, t in times.items()
    }


def inputs(varied: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*SHAPE, IN, generator=gen)
    dy = torch.randn(*SHAPE, OUT, generator=gen)
    if varied:
        x = x * torch.randn(*SHAPE, 1, generator=gen).exp()
        dy = dy * torch.randn(*SHAPE, 1, generator=gen).exp()
    return x.requires_grad_(), dy


def relative_variance(base: nn.Linear, setting: str, x, dy) -> float:
    """E|dW_hat - dW|^2 / |dW|^2 over DRAWS draws (after 3 warm-up steps for running state)."""
    exact = dy.reshape(-1, OUT).T @ x.detach().reshape(-1, IN)
    model = layer(base, setting)
    for _ in range(3):
        step(model, x, dy)
    errors = []
    for _ in range(DRAWS):
        step(model, x, dy)
        errors.append((model[0].weight.grad - exact).square().sum().item())
    return statistics.fmean(errors) / exact.square().sum().item()


def main(path: Path, settings: tuple[str, ...] = SETTINGS) -> None:
    start, load = time.time(), os.getloadavg()
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    x, dy = inputs(varied=False)
    models = {"exact": layer(base, None)} | {s: layer(base, s) for s in settings}
    nbytes = {name: saved_bytes(m, x, dy) for name, m in models.items()}
    threads = os.cpu_count() or 1
    timing = {t: time_ratios(models, x, dy, t) for t in sorted({1, threads})}
    torch.set_num_threads(1)
    variance = {
        varied: {s: relative_variance(base, s, *inputs(varied)) for s in settings}
        for varied in (False, True)
    }
    winners = {
        varied: {w: relative_variance(base, f"crs:keep=0.25,winners={w}", *inputs(varied))
                 for w in WINNERS}
        for varied in (False, True)
        if settings == SETTINGS
    }  # fmt: skip
    end_load = os.getloadavg()
    head = " | ".join(f"{t} thread{'s' * (t > 1)}: ms, / exact" for t in timing)
    lines = [
        f"# Linear {IN} -> {OUT} on a {SHAPE[0]} x {SHAPE[1]} x {IN} input: time and variance "
        "per estimator",
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/transformer_layer_speed.py {path}"
        f"{'' if settings == SETTINGS else ' ' + ' '.join(settings)}`  ",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, torch "
        f"{torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load "
        f"average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start, "
        f"{end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f} at the end; "
        f"{time.time() - start:.0f} s.",
        "",
        f"Forward + backward (input, weight and bias gradients), {REPEATS} rounds in alternation "
        "after a warm-up; ms: the median time; / exact: the median over rounds of the time over "
        "exact's in the same round. Saved bytes: rp.track_saved (exact: X, 3 MiB). Variance: "
        f"E|dW_hat - dW|^2 / |dW|^2 over {DRAWS} draws at 1 thread (AOP: biased, its memory "
        "corrects it over steps; the figure is its error per step).",
        "",
        f"| method | saved bytes | {head} | variance, similar norms | variance, varied norms |",
        "|---|---|" + "---|" * len(timing) + "---|---|",
    ]
    for name in models:
        cells = " | ".join(
            f"{timing[t][name][0] * 1e3:.1f}, {timing[t][name][1]:.2f}x" for t in timing
        )
        var = " | ".join(
            "0" if name == "exact" else f"{variance[v][name]:.3f}" for v in (False, True)
        )
        lines.append(f"| {name} | {nbytes[name]} | {cells} | {var} |")
    if winners:
        lines += [
            "",
            "CRS (keep 0.25) by `winners`, the least fraction of the K rows kept deterministically:",
            "",
            "| winners | variance, similar norms | variance, varied norms |",
            "|---|---|---|",
        ]
        for w in WINNERS:
            lines.append(f"| {w} | {winners[False][w]:.3f} | {winners[True][w]:.3f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]), tuple(sys.argv[2:]) or SETTINGS)
