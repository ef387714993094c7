"""Benchmark suites by name: each suite module registers a function run(out_dir, quick) -> dict.

A suite writes out_dir/report.md, out_dir/results.json and its PNG plots, and returns the
results it wrote. ``quick`` asks for a scaled-down run (used by tests and smoke checks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from torch.utils.data import TensorDataset

from randprop.data import Splits

SuiteFn = Callable[[Path, bool], dict]


@dataclasses.dataclass(frozen=True)
class Suite:
    """A benchmark suite; ``tasks``: the parts it can run alone (``run(out, quick, tasks=...)``),
    empty where it has none."""

    name: str
    run: SuiteFn
    description: str
    tasks: tuple[str, ...] = ()


SUITES: dict[str, Suite] = {}


def suite(name: str, description: str, tasks: tuple[str, ...] = ()) -> Callable[[SuiteFn], SuiteFn]:
    """Decorator registering a benchmark suite under ``name`` (``tasks``: see :class:`Suite`)."""

    def register(fn: SuiteFn) -> SuiteFn:
        SUITES[name] = Suite(name, fn, description, tasks)
        return fn

    return register


def quick_splits(splits: Splits, examples: int) -> Splits:
    """The first ``examples`` of each of train / val / test: the data of a quick (smoke) run."""
    return dataclasses.replace(splits, **{
        part: TensorDataset(*(t[:examples] for t in getattr(splits, part).tensors))
        for part in ("train", "val", "test")
    })  # fmt: skip


def check_tasks(suite_name: str, tasks: Sequence[str], allowed: Sequence[str]) -> str:
    """Raise ValueError naming the allowed tasks when ``tasks`` has others; else the
    command-line suffix that names them (" --tasks a,b", or "" for all of them)."""
    unknown = sorted(set(tasks) - set(allowed))
    if unknown:
        raise ValueError(f"bench {suite_name}: tasks must be among {', '.join(allowed)}; "
                         f"got {unknown}")  # fmt: skip
    return "" if set(tasks) == set(allowed) else f" --tasks {','.join(tasks)}"


def get_suite(name: str) -> Suite:
    from randprop import experiments  # noqa: F401 (imports every suite module)

    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(sorted(SUITES))}")
    return SUITES[name]
