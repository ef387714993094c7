"""Training-step time of RAD through time against nn.RNN on the RAD paper's pixel-MNIST shape:
the IRNN (hidden 100, ReLU) over 784 one-pixel steps at batch 150 (experiments/rad_rnn.py),
one thread as in that suite. Exact (PyTorch's nn.RNN) and RAD keep 0.1 steps (forward, loss,
backward, SGD step) alternate, so that load on the machine hits both alike; the median of each
is reported.

PYTHONPATH=src python benchmarks/rnn_time.py [--reps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import randprop as rp
from randprop.models import build_model

BATCH, STEPS, KEEP = 150, 784, 0.1


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 28, 28, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    exact = build_model("irnn", pixels=True)
    rad = build_model("irnn", pixels=True)
    rad.load_state_dict(exact.state_dict())
    rp.convert(rad, rp.RAD(keep=KEEP), seed=0)
    steps = {"exact": step_fn(exact, x, y), "rad": step_fn(rad, x, y)}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            times[name].append(step())
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"IRNN hidden 100, {STEPS} steps, batch {BATCH}, 1 thread, {args.reps} alternating reps")
    print("| method | median s/step | min s/step | / exact |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {med[name]:.3f} | {min(t):.3f} | {med[name] / med['exact']:.2f}x |")


if __name__ == "__main__":
    main()
