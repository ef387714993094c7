"""Re-time only the weight-gradient table of `randprop bench aop-mnist` (a 4096 -> 4096 Linear,
512 rows, K/B = 1/8) on 1 and 2 threads, and write it as markdown with machine, load and date.

    .venv/bin/python benchmarks/aop_grad_time.py benchmarks/results/aop-mnist/grad-time.md
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

from randprop.experiments.aop_mnist import grad_time_table


def main(path: Path) -> None:
    load = os.getloadavg()
    lines = [
        "# Weight-gradient time, 4096 -> 4096 Linear, 512 rows, K/B = 1/8",
        "",
        f"Command: `.venv/bin/python benchmarks/aop_grad_time.py {path}`  ",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.",
        "",
        "| method | threads | seconds | exact / method |",
        "|---|---|---|---|",
    ]
    for threads in (1, 2):
        for row in grad_time_table(threads=threads):
            lines.append(
                f"| {row['method']} | {threads} | {row['seconds']:.4f} "
                f"| {row['speedup_vs_exact']:.2f}x |"
            )
    lines.append(f"\nLoad average after: {os.getloadavg()[0]:.2f}.")
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
