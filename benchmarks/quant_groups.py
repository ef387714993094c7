"""The default grouping of rp.Quant for convolution inputs: weight-gradient variance against
stored bytes, per (sample, channel) plane versus fixed groups of elements, on the convolutions of
trace-cnn and rad-cnn (MNIST batch, default initialisation, cross-entropy), and write it as
markdown with the command, machine, load and date.

    PYTHONPATH=src .venv/bin/python benchmarks/quant_groups.py benchmarks/results/quant/groups.md

Relative variance: the mean over draws of |dW_hat - dW|^2 / |dW|^2, summed over the model's
convolutions; bytes: the quantized inputs of all of them (codes plus 8 bytes per group).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import randprop as rp
from randprop.data.sources import mnist
from randprop.methods.quant import conv_group_size
from randprop.models.rad import rad_cnn
from randprop.models.trace import trace_cnn
from randprop.quantize import quantize

BATCH, DRAWS = 64, 32
GROUPS = {"plane (default)": 0, "64": 64, "256": 256, "1024": 1024}


def conv_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(conv, its input X, dL/d(output)) for every Conv2d of ``model``."""
    records = []

    def hook(module, args, out):
        out.retain_grad()
        records.append((module, args[0].detach(), out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    F.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    return [(m, inp, out.grad.detach()) for m, inp, out in records]


def measure(model: nn.Module, x, y, bits: int, group: int) -> tuple[int, float]:
    cfg = rp.Quant(bits=bits, group=group)
    total_bytes, total_var = 0, 0.0
    for conv, inp, grad in conv_inputs(model, x, y):
        w = conv.weight.detach().requires_grad_()
        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        (exact,) = torch.autograd.grad(F.conv2d(inp, w, None, *args), w, grad)
        errs = []
        for seed in range(DRAWS):
            out = rp.functional.quant_conv2d(inp, w, None, *args, method=cfg, seed=seed)
            (est,) = torch.autograd.grad(out, w, grad)
            errs.append(((est - exact).square().sum() / exact.square().sum()).item())
        total_var += sum(errs) / len(errs)
        q = quantize(inp, bits, conv_group_size(inp.shape, cfg), generator=None, stochastic=False)
        total_bytes += q.nbytes
    return total_bytes, total_var


def main(path: Path) -> None:
    torch.set_num_threads(1)
    load = os.getloadavg()
    data = mnist().train
    x = torch.stack([data[i][0] for i in range(BATCH)])
    y = torch.stack([torch.as_tensor(data[i][1]) for i in range(BATCH)])
    lines = [
        "# rp.Quant: default grouping of convolution inputs",
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/quant_groups.py {path}`  ",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"1 thread; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.",
        "",
        f"MNIST batch of {BATCH}, default initialisation (torch seed 0), cross-entropy; "
        f"{DRAWS} draws per layer. Relative variance: mean |dW_hat - dW|^2 / |dW|^2, summed over "
        "the model's convolutions. Bytes: the stored quantized inputs of all of them; fp32 is "
        "the exact input's.",
        "",
        "| model | bits | grouping | stored bytes | fp32 bytes | relative variance |",
        "|---|---|---|---|---|---|",
    ]
    for name, build in (("trace-cnn", trace_cnn), ("rad-cnn", rad_cnn)):
        torch.manual_seed(0)
        model = build()
        fp32 = sum(inp.numel() * 4 for _, inp, _ in conv_inputs(model, x, y))
        for bits in (2, 4):
            for label, group in GROUPS.items():
                nbytes, var = measure(model, x, y, bits, group)
                lines.append(f"| {name} | {bits} | {label} | {nbytes} | {fp32} | {var:.4g} |")
                print(lines[-1], flush=True)
    lines.append(f"\nLoad average after: {os.getloadavg()[0]:.2f}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
