"""Command line: a thin layer over the library (``randprop --help``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
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
        "suites": {
            name: s.description + (f" [--tasks {','.join(s.tasks)}]" if s.tasks else "")
            for name, s in SUITES.items()
        },
    }
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    for section, items in listing.items():
        print(f"{section}:")
        for name, text in sorted(items.items()):
            print(f"  {name:<16} {text}")
    return 0


MODEL_FORMS = (
    "a built-in model name (randprop list) or package.module:function, the function returning "
    "(model, batch) with model(batch) (model(*batch) for a tuple, model(**batch) for a dict) "
    "giving the loss or an output with .loss, or (model, batch, loss_fn) with "
    "loss_fn(model, batch) giving the loss"
)


def load_model_spec(spec: str) -> tuple[torch.nn.Module, object, Callable | None]:
    """``--model package.module:function``: import it, call it, check what it returned."""
    import importlib

    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name.isidentifier():
        raise ValueError(f"--model {spec!r}: expected {MODEL_FORMS}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--model {spec!r}: {module_name} has no function {fn_name!r}")
    made = fn()
    if not (isinstance(made, tuple) and len(made) in (2, 3)):
        raise ValueError(
            f"--model {spec!r}: {fn_name}() returned {type(made).__name__}; expected {MODEL_FORMS}"
        )
    model, batch, loss_fn = (*made, None)[:3]
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model {spec!r}: the model must be an nn.Module; got {type(model)}")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"--model {spec!r}: loss_fn must be callable (model, batch) -> loss")
    return model, batch, loss_fn


def _spec_loss(model: torch.nn.Module, batch, loss_fn: Callable | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    if isinstance(batch, dict):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = getattr(out, "loss", out)
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise ValueError(
            "--model: the model's output is not a scalar loss (nor has one as .loss); return "
            "(model, batch, loss_fn) with loss_fn(model, batch) giving the loss"
        )
    return loss


def _saved(model: torch.nn.Module, loss_of: Callable) -> dict:
    """Bytes saved for backward by one forward (then backward) of ``model``: peak, by module,
    by op."""
    from randprop.measure.saved import saved_by_op, track_saved

    with track_saved(model) as saved:
        loss = loss_of(model)
    by_op = saved_by_op(loss, model)
    loss.backward()
    return {"bytes": saved.bytes, "by_module": saved.by_module, "by_op": by_op}


def cmd_memory(args: argparse.Namespace) -> int:
    from randprop.measure.profile import converted_copy

    method = parse_method(args.method)
    if ":" in args.model:
        model, batch, loss_fn = load_model_spec(args.model)

        def loss_of(m: torch.nn.Module) -> torch.Tensor:
            return _spec_loss(m, batch, loss_fn)

        size = None
    else:
        from randprop.models import build_model

        try:
            model = build_model(args.model)
        except ValueError as err:
            raise ValueError(f"--model: {err}; or give {MODEL_FORMS}") from None
        x, y = _batch(args.model, args.batch, args.seed)

        def loss_of(m: torch.nn.Module) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(m(x), y)

        size = args.batch
    exact = _saved(converted_copy(model, "exact"), loss_of)
    estimate = _saved(converted_copy(model, method, args.seed), loss_of)
    result = {
        "model": args.model,
        "method": str(method),
        "batch": size,
        "exact_bytes": exact["bytes"],
        "method_bytes": estimate["bytes"],
        "ratio": exact["bytes"] / max(estimate["bytes"], 1),
    }
    for by in ("module", "op"):
        if args.by in (by, "both"):
            result[f"by_{by}"] = {"exact": exact[f"by_{by}"], "method": estimate[f"by_{by}"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    batch_text = "" if size is None else f", batch {size}"
    print(f"model {args.model}{batch_text}: bytes saved for backward")
    for by in ("module", "op"):
        if f"by_{by}" not in result:
            continue
        table = result[f"by_{by}"]
        names = sorted(set(table["exact"]) | set(table["method"]))
        width = max(12, *(len(n) for n in names))
        print(f"{by:<{width}} {'exact':>14} {'method':>14}")
        for name in names:
            print(
                f"{name or '<top>':<{width}} {table['exact'].get(name, 0):>14,} "
                f"{table['method'].get(name, 0):>14,}"
            )
    print(f"{'most at once':<12} {exact['bytes']:>14,} {estimate['bytes']:>14,}")
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
    if args.data_root:  # the suites that can use CIFAR-10 read it from there
        os.environ["RANDPROP_CIFAR10"] = args.data_root
    out = Path(args.out or f"runs/bench/{args.suite}")
    if args.tasks is None:
        suite.run(out, args.quick)
    else:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in names if t not in suite.tasks]
        if not suite.tasks or unknown or not names:
            allowed = ", ".join(suite.tasks) or "none: this suite runs whole"
            raise SystemExit(f"bench {args.suite}: --tasks must name some of: {allowed}; "
                             f"got {args.tasks!r}")  # fmt: skip
        suite.run(out, args.quick, tasks=names)
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
        p.add_argument("--model", default="mlp", help="a built-in model or package.module:function")
        p.add_argument("--method", default="rad:keep=0.1", help='e.g. "rad:keep=0.1,mode=project"')
        p.add_argument("--batch", type=int_at_least(1), default=150)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", action="store_true")
        if name == "check":
            p.add_argument("--draws", type=int_at_least(2), default=50)
        else:
            p.add_argument(
                "--by", choices=("module", "op", "both"), default="both",
                help="break the saved bytes down by module, by op, or both",
            )  # fmt: skip
        p.set_defaults(fn=fn)

    p = sub.add_parser("bench", help="run a benchmark suite (see `randprop list`)")
    p.add_argument("suite")
    p.add_argument("--out", default=None, help="output directory (default runs/bench/SUITE)")
    p.add_argument("--quick", action="store_true", help="a scaled-down smoke run")
    p.add_argument(
        "--tasks", default=None,
        help="comma-separated parts of the suite to run (plan: mlp,cnn,gpt2; transformer: "
             "gpt2,llama,vit,resnet); runs already in OUT/runs are reused",
    )  # fmt: skip
    p.add_argument(
        "--data-root", default=None,
        help="folder with CIFAR-10's python batches: the suites that can use it do",
    )  # fmt: skip
    p.set_defaults(fn=cmd_bench)

    from randprop import cli_plan, cli_train

    cli_train.add_commands(sub)
    cli_plan.add_commands(sub)
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
