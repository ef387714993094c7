"""Command line: a thin layer over the library (``randprop --help``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from randprop.methods import METHODS, parse_method


def int_at_least(low: int):
    """An argparse type: an int >= ``low`` (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {text!r}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _batch(model_name: str, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from randprop.models import input_shape

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape(model_name), generator=gen)
    return x, torch.randint(0, 10, (batch,), generator=gen)


def cmd_list(args: argparse.Namespace) -> int:
    from randprop.experiments import SUITES
    from randprop.models import MODELS

    try:
        from randprop.data import DATASETS
    except ImportError:  # the data layer is optional for listing
        DATASETS = {}
    from randprop.rules import LEARNING_RULES

    listing = {
        "methods": {
            name: (cls.__doc__ or "").strip().splitlines()[0]
            for name, cls in METHODS.items()
            if cls.name == name  # aliases are listed under their main name
        },
        "rules": {
            name: (getattr(f, "__doc__", None) or "").strip().splitlines()[0]
            for name, f in LEARNING_RULES.items()
        },
        "models": {name: spec.description for name, spec in MODELS.items()},
        "datasets": {name: getattr(d, "description", "") for name, d in DATASETS.items()},
        "suites": {name: s.description for name, s in SUITES.items()},
    }
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for section, items in listing.items():
        print(f"{section}:")
        for name, text in sorted(items.items()):
            print(f"  {name:<16} {text}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from randprop.measure.profile import converted_copy, saved_for_backward
    from randprop.models import build_model

    method = parse_method(args.method)
    model = build_model(args.model)
    x, y = _batch(args.model, args.batch, args.seed)
    exact = saved_for_backward(converted_copy(model, "exact"), x, y)
    estimate = saved_for_backward(converted_copy(model, method, args.seed), x, y)
    result = {
        "model": args.model,
        "method": str(method),
        "batch": args.batch,
        "exact_bytes": exact.bytes,
        "method_bytes": estimate.bytes,
        "ratio": exact.bytes / max(estimate.bytes, 1),
        "by_module": {"exact": exact.by_module, "method": estimate.by_module},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model {args.model}, batch {args.batch}: bytes saved for backward")
    print(f"{'module':<12} {'exact':>14} {'method':>14}")
    for name in sorted(set(exact.by_module) | set(estimate.by_module)):
        print(
            f"{name or '<top>':<12} {exact.by_module.get(name, 0):>14,} "
            f"{estimate.by_module.get(name, 0):>14,}"
        )
    print(f"{'most at once':<12} {exact.bytes:>14,} {estimate.bytes:>14,}")
    print(f"{method}: {result['ratio']:.2f}x less than exact")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from randprop.measure import gradient_diagnostics
    from randprop.models import build_model

    model = build_model(args.model)
    batch = _batch(args.model, args.batch, args.seed)
    diag = gradient_diagnostics(model, args.method, batch, draws=args.draws, seed=args.seed)
    print(diag.to_json() if args.json else diag)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from randprop.experiments import get_suite

    suite = get_suite(args.suite)
    out = Path(args.out or f"runs/bench/{args.suite}")
    suite.run(out, args.quick)
    print((out / "report.md").read_text())
    print(f"written to {out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="randprop", description="Memory-saving randomized backpropagation, measured."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="methods, models, datasets and benchmark suites")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_list)

    for name, fn, text in (
        ("memory", cmd_memory, "bytes saved for backward: exact vs a method"),
        ("check", cmd_check, "gradient bias, variance and cosine against exact backprop"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", default="mlp")
        p.add_argument("--method", default="rad:keep=0.1", help='e.g. "rad:keep=0.1,mode=project"')
        p.add_argument("--batch", type=int_at_least(1), default=150)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", action="store_true")
        if name == "check":
            p.add_argument("--draws", type=int_at_least(2), default=50)
        p.set_defaults(fn=fn)

    p = sub.add_parser("bench", help="run a benchmark suite (see `randprop list`)")
    p.add_argument("suite")
    p.add_argument("--out", default=None, help="output directory (default runs/bench/SUITE)")
    p.add_argument("--quick", action="store_true", help="a scaled-down smoke run")
    p.set_defaults(fn=cmd_bench)

    from randprop import cli_train

    cli_train.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as err:  # bad names and configs: a clear message, no traceback
        print(f"randprop: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
