"""Measure the gradient bias of rp.quantize_saved per op and code width, as markdown.

Model: Linear(32, 64) -> op -> Linear(64, 10), batch 64, cross-entropy. For each op and bits in
{2, 4, 8}, K draws of the full parameter gradient g_k with either only the op's saved tensors
quantized (allow=["1"]) or every floating tensor saved (the weights stay exact either way).
With d = mean_k g_k - g and tr S the summed per-coordinate variance of the draws:
  |bias| / |g| = sqrt(max(|d|^2 - tr S / K, 0)) / |g|   (|d|^2 less its noise: unbiased for |bias|^2)
  noise / |g|  = sqrt(tr S / K) / |g|                    (what |d| / |g| is from the noise alone)
  z = (K |d|^2 - tr S) / sqrt(2 tr S^2)                   (~N(0, 1) when unbiased; S^2 from the
                                                           sample covariance, so conservative)
  scale = <mean_k g_k, g> / |g|^2                         (1 when unbiased along g)

    PYTHONPATH=src .venv/bin/python benchmarks/quant_saved_bias.py \
        benchmarks/results/quant/saved-bias.md [draws]
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import randprop as rp

OPS = {
    "identity (linear only)": nn.Identity,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softmax": lambda: nn.Softmax(dim=-1),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "layernorm": lambda: nn.LayerNorm(64),
}
#: what the op saves for backward, and whether its backward is linear in it
SAVES = {
    "identity (linear only)": "nothing (the Linears save their inputs: linear)",
    "tanh": "output y; (1 - y^2) g: quadratic",
    "sigmoid": "output y; y (1 - y) g: quadratic",
    "softmax": "output y; y (g - <g, y>): quadratic",
    "gelu": "input x; GELU'(x) g: nonlinear",
    "silu": "input x; SiLU'(x) g: nonlinear",
    "relu": "output y; 1[y > 0] g: a threshold",
    "layernorm": "input x (mean, rstd too small); quadratic in x-hat",
}


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def bias_stats(draws: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    k = draws.shape[0]
    norm = exact.norm().item()
    d = draws.mean(0) - exact
    centred = draws - draws.mean(0)
    tr = centred.square().sum().item() / (k - 1)
    tr2 = (centred @ centred.T).square().sum().item() / (k - 1) ** 2
    d2 = d.square().sum().item()
    return {
        "bias": max(d2 - tr / k, 0.0) ** 0.5 / norm,
        "noise": (tr / k) ** 0.5 / norm,
        "z": (k * d2 - tr) / (2 * tr2) ** 0.5 if tr2 > 0 else float("nan"),
        "scale": (draws.mean(0) @ exact).item() / norm**2,
    }


def measure(draws: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    rows = []
    for op, make in OPS.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), make(), nn.Linear(64, 10))
        exact = gradient(model, x, y)
        modes = {"all": None} if op.startswith("identity") else {"op only": ["1"], "all": None}
        for mode, allow in modes.items():
            for bits in (2, 4, 8):
                with rp.quantize_saved(model, bits, allow=allow, min_numel=0, seed=bits):
                    samples = torch.stack([gradient(model, x, y) for _ in range(draws)])
                rows.append({"op": op, "mode": mode, "bits": bits, **bias_stats(samples, exact)})
                print(rows[-1], flush=True)
    return rows


def main(path: Path, draws: int = 1000) -> None:
    torch.set_num_threads(1)
    start, load = time.time(), os.getloadavg()
    rows = measure(draws)
    lines = [
        "# Gradient bias of rp.quantize_saved, per op and code width",
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/quant_saved_bias.py {path} "
        f"{draws}`  ",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"1 thread; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before "
        f"{load[0]:.2f}; {time.time() - start:.0f} s.",
        "",
        "Model Linear(32, 64) -> op -> Linear(64, 10), batch 64, cross-entropy; per-row scale and "
        f"minimum; {draws} draws of the whole parameter gradient per row. `op only`: only the "
        "op's saved tensors are quantized (allow=['1']); `all`: every floating tensor saved "
        "(the weights stay exact). |bias| / |g|: the norm of E[g_k] - g relative to the exact "
        "gradient, its noise removed; noise: what that norm would read from noise alone (its "
        "resolution); z: standard scores of the bias, about N(0, 1) when unbiased (conservative); "
        "scale: <E[g_k], g> / |g|^2. Rows with z > 5 are biased.",
        "",
        "| op | saves; backward in it | mode | bits | abs bias / abs g | noise | z | scale | "
        "verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "biased" if r["z"] > 5 else "no bias resolved"
        lines.append(
            f"| {r['op']} | {SAVES[r['op']]} | {r['mode']} | {r['bits']} | {r['bias']:.4f} "
            f"| {r['noise']:.4f} | {r['z']:.1f} | {r['scale']:.4f} | {verdict} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]), *map(int, sys.argv[2:3]))
