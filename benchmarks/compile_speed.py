"""Training-step time of a wide MLP under torch.compile (inductor) against eager: exact backprop
and RAD, in alternation, after warm-up; also the compiles each model needed (one each: no
recompiles across steps).

PYTHONPATH=src python benchmarks/compile_speed.py [--repeats 5] [--steps 10] [--method rad:keep=0.1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import randprop as rp


def wide_mlp(widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def step_fn(model: nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def timed(step, x, y, steps: int) -> float:
    """Seconds per step over ``steps`` steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", default="784,2048,2048,2048,10")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--method", default="rad:keep=0.1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    widths = tuple(int(w) for w in args.widths.split(","))

    torch.manual_seed(0)
    x, y = torch.randn(args.batch, widths[0]), torch.randint(0, widths[-1], (args.batch,))
    base = wide_mlp(widths)
    models = {}
    for name, method in (("exact", None), (args.method, args.method)):
        for compiled in (False, True):
            model = wide_mlp(widths)
            model.load_state_dict(base.state_dict())
            if method is not None:
                rp.convert(model, method, seed=0)
            models[(name, compiled)] = model

    steps, counters, warmup = {}, {}, {}
    for key, model in models.items():
        counters[key] = CompileCounterWithBackend("inductor")
        runner = torch.compile(model, backend=counters[key]) if key[1] else model
        steps[key] = step_fn(runner)
        t0 = time.perf_counter()
        for _ in range(3):  # warm-up (compiles forward and backward)
            steps[key](x, y)
        warmup[key] = time.perf_counter() - t0

    times: dict[tuple[str, bool], list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):  # in alternation, so that load drifts hit all alike
        for key in models:
            times[key].append(timed(steps[key], x, y, args.steps))

    med = {k: statistics.median(v) for k, v in times.items()}
    load = os.getloadavg()
    print("# torch.compile: wide MLP step time, eager against compiled\n")
    print(
        "Command: `PYTHONPATH=src python benchmarks/compile_speed.py"
        f" --widths {args.widths} --batch {args.batch} --method {args.method}"
        f" --repeats {args.repeats} --steps {args.steps}`"
    )
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} at the end (shared machine: times are rough)"
    )
    print(f"Date: {datetime.date.today().isoformat()}\n")
    print(
        f"MLP {args.widths}, batch {args.batch}, SGD step (forward, backward, update); "
        f"median over {args.repeats} repeats of {args.steps} steps, the four runs in alternation; "
        "compiled with the inductor backend after 3 warm-up steps.\n"
    )
    print(
        "| method | eager s/step | compiled s/step | eager / compiled | compiles (all steps) "
        "| compiled warm-up s |"
    )
    print("|---|---|---|---|---|---|")
    for name in ("exact", args.method):
        e, c = med[(name, False)], med[(name, True)]
        key = (name, True)
        print(
            f"| {name} | {e:.4f} | {c:.4f} | {e / c:.2f}x | {counters[key].frame_count} | "
            f"{warmup[key]:.1f} |"
        )
    ratio = med[(args.method, False)] / med[(args.method, True)]
    exact_c = med[("exact", True)] / med[(args.method, True)]
    print(
        f"\nCompiled {args.method} is {ratio:.2f}x eager {args.method}'s speed and "
        f"{exact_c:.2f}x compiled exact's. All runs: "
        + "; ".join(
            f"{k[0]} {'compiled' if k[1] else 'eager'}: " + ", ".join(f"{t:.4f}" for t in v)
            for k, v in times.items()
        )
    )


if __name__ == "__main__":
    main()
