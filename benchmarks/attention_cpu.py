"""Forward+backward time and saved bytes of randprop's attention Function against PyTorch's
fused CPU kernel (scaled_dot_product_attention), no dropout, head dim 64.

PYTHONPATH=src python benchmarks/attention_cpu.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import randprop as rp


def fused(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def function(q, k, v):
    return rp.functional.attention(q, k, v, fused=False)


def dropout(q, k, v):
    return rp.functional.attention(q, k, v, dropout_p=0.1, seed=0)


def timed(fn, q, k, v, reps: int = 10) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(q, k, v).sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    torch.manual_seed(0)
    print(
        "| L = S | fused ms | Function ms | Function, dropout 0.1 ms | fused saved | Function saved | math path saved |"
    )
    print("|---|---|---|---|---|---|---|")
    for length in (128, 256, 512):
        q, k, v = (torch.randn(4, 8, length, 64, requires_grad=True) for _ in range(3))
        row = [timed(fn, q, k, v) * 1e3 for fn in (fused, function, dropout)]
        sizes = []
        for fn in (
            fused,
            function,
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1),
        ):
            with rp.track_saved() as saved:
                fn(q, k, v)
            sizes.append(saved.bytes / 2**20)
        print(
            f"| {length} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} | "
            + " | ".join(f"{s:.2f} MiB" for s in sizes)
            + " |"
        )


if __name__ == "__main__":
    main()
