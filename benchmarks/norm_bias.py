"""Measure the k-bit normalisation layers (randprop.methods.norms): the second-order bias of the
input gradient dX, the variance the rounding adds to dX and dW, and the bytes saved, as markdown.

For each norm, bits in {4, 8} and mode (one code of x_hat; ``paired``: two independent codes),
K draws of dX (and of dW) against the exact gradient g. With d = mean_k g_k - g and tr S the
summed per-coordinate variance of the draws:
  |bias| / |g| = sqrt(max(|d|^2 - tr S / K, 0)) / |g|   (|d|^2 less its noise: unbiased for |bias|^2)
  noise / |g|  = sqrt(tr S / K) / |g|                    (what |d| / |g| reads from noise alone)
  z = (K |d|^2 - tr S) / sqrt(2 tr S^2)                   (about N(0, 1) when unbiased)
  var / |g|^2  = tr S / |g|^2                             (the variance one draw adds)
Row-wise norms (LayerNorm, RMSNorm, GroupNorm) draw K copies of the input in one call (every
row / sample has its own codes and statistics, so the copies are independent draws).

    PYTHONPATH=src .venv/bin/python benchmarks/norm_bias.py \
        benchmarks/results/quant/norm-bias.md [draws]
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import randprop as rp
from randprop import functional as rpf


def stats(draws: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Bias, its noise, z and variance of K draws (K x n) against ``exact`` (n), all relative."""
    k = draws.shape[0]
    d = draws.mean(0) - exact
    centred = draws - draws.mean(0)
    var = centred.pow(2).sum(0) / (k - 1)
    tr_s = var.sum()
    tr_s2 = (
        (centred.T @ centred / (k - 1)).pow(2).sum() if draws.shape[1] <= 4096 else var.pow(2).sum()
    )
    norm2 = exact.pow(2).sum()
    bias2 = (d.pow(2).sum() - tr_s / k).clamp_min(0)
    return {
        "bias": float((bias2 / norm2).sqrt()),
        "noise": float((tr_s / k / norm2).sqrt()),
        "z": float((k * d.pow(2).sum() - tr_s) / (2 * tr_s2).sqrt()),
        "var": float(tr_s / norm2),
    }


def rowwise(name: str, draws: int, bits: int, paired: bool, n: int = 64):
    """dX draws of a row-wise norm, all K copies in one call; dW by a loop of 200 draws."""
    gen = torch.Generator().manual_seed(0)
    if name == "group_norm":
        x = torch.randn(4, 8, 4, 4, generator=gen, dtype=torch.float64) * 2 + 0.5
        w = torch.randn(8, generator=gen, dtype=torch.float64)

        def plain(x, w):
            return F.group_norm(x, 2, w)

        def quant(x, w, seed):
            return rpf.group_norm(x, 2, w, bits=bits, seed=seed, paired=paired)
    else:
        x = torch.randn(1024 // n * 4 if n > 64 else 16, n, generator=gen, dtype=torch.float64)
        x = x * 2 + 0.5
        w = torch.randn(n, generator=gen, dtype=torch.float64)
        if name == "layer_norm":

            def plain(x, w):
                return F.layer_norm(x, (n,), w)

            def quant(x, w, seed):
                return rpf.layer_norm(x, (n,), w, bits=bits, seed=seed, paired=paired)
        else:

            def plain(x, w):
                return F.rms_norm(x, (n,), w, 1e-6)

            def quant(x, w, seed):
                return rpf.llama_rms_norm(x, w, 1e-6, bits=bits, seed=seed, paired=paired)

    up = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    plain(xe, we).backward(up)
    big = x.repeat(draws, *([1] * (x.dim() - 1))).requires_grad_()
    quant(big, w, 1).backward(up.repeat(draws, *([1] * (x.dim() - 1))))
    dx = big.grad.reshape(draws, -1)
    dws = []
    for i in range(200):
        wi = w.clone().requires_grad_()
        quant(x, wi, 1000 + i).backward(up)
        dws.append(wi.grad)
    return stats(dx, xe.grad.reshape(-1)), stats(torch.stack(dws), we.grad)


def batchnorm(draws: int, bits: int, paired: bool):
    """dX and dW draws of BatchNorm2d in training mode, one call per draw."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 4, 4, generator=gen, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(4, generator=gen, dtype=torch.float64)
    up = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.batch_norm(xe, None, None, we, None, True).backward(up)
    dxs, dws = [], []
    for i in range(draws):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        rpf.batch_norm(xi, None, None, wi, None, True, bits=bits, seed=i, paired=paired).backward(
            up
        )
        dxs.append(xi.grad.reshape(-1))
        dws.append(wi.grad)
    return stats(torch.stack(dxs), xe.grad.reshape(-1)), stats(torch.stack(dws), we.grad)


def saved_ratio(bits: int, paired: bool) -> float:
    """Bytes saved for backward by layer_norm over F.layer_norm's, 8 x 128 x 768 float32."""
    x = torch.randn(8, 128, 768, requires_grad=True)
    w = torch.ones(768, requires_grad=True)
    with rp.track_saved() as plain:
        F.layer_norm(x, (768,), w)
    with rp.track_saved() as quant:
        rpf.layer_norm(x, (768,), w, bits=bits, paired=paired)
    return quant.bytes / plain.bytes


NORMS = ("layer_norm", "layer_norm 768", "llama_rms_norm", "group_norm", "batch_norm2d")


def main(out: Path, draws: int) -> None:
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    start = time.time()
    rows = []
    for name in NORMS:
        for bits in (2, 4, 8):
            for paired in (False, True):
                if name == "batch_norm2d":
                    dx, dw = batchnorm(max(draws // 10, 200), bits, paired)
                elif name == "layer_norm 768":
                    dx, dw = rowwise("layer_norm", max(draws // 5, 200), bits, paired, n=768)
                else:
                    dx, dw = rowwise(name, draws, bits, paired)
                rows.append((name, bits, paired, dx, dw))
    ratios = {(b, p): saved_ratio(b, p) for b in (4, 8) for p in (False, True)}
    command = f"PYTHONPATH=src .venv/bin/python benchmarks/norm_bias.py {out} {draws}"
    lines = [
        "# Normalisation with a k-bit normalised input: dX bias, variance, bytes",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"1 thread; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before "
        f"{load:.2f}; {time.time() - start:.0f} s.",
        "",
        "Inputs float64 (so that the figures are the rounding's, not float32's): LayerNorm and "
        "LLaMA RMSNorm 16 x 64 (n = 64 per statistic; `layer_norm 768`: 4 x 768, draws / 5), "
        "GroupNorm 4 x 8 x 4 x 4 in 2 groups, BatchNorm2d 8 x 4 x 4 x 4 "
        f"(training); random weight and upstream gradient. dX: {draws} draws (BatchNorm: "
        f"{max(draws // 10, 200)}); dW: 200 draws (BatchNorm: as dX). |bias| / |g|: the norm of "
        "E[g_k] - g relative to the exact gradient, its noise removed; noise: what that norm "
        "reads from noise alone; z: about N(0, 1) when unbiased; var / |g|^2: the variance one "
        "draw adds, relative. paired: two independent codes of x_hat, one per factor of "
        "x_hat M[g x_hat] (dX unbiased; dW uses their mean).",
        "",
        "| norm | bits | paired | dX bias | dX noise | dX z | dX var | dW bias | dW noise | dW z "
        "| dW var |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, bits, paired, dx, dw in rows:
        lines.append(
            f"| {name} | {bits} | {'yes' if paired else 'no'} | {dx['bias']:.2e} | "
            f"{dx['noise']:.2e} | {dx['z']:.1f} | {dx['var']:.2e} | {dw['bias']:.2e} | "
            f"{dw['noise']:.2e} | {dw['z']:.1f} | {dw['var']:.2e} |"
        )
    lines += [
        "",
        "Bytes saved for backward, rp layer_norm over F.layer_norm's (8 x 128 x 768 float32, "
        "rp.track_saved): "
        + ", ".join(f"{b} bits{' paired' if p else ''} {r:.3f}" for (b, p), r in ratios.items())
        + ".",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4000)
