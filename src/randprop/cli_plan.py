"""Command-line entry `randprop plan`, and the planning step of `randprop train --budget`."""

from __future__ import annotations

import argparse

import torch


def parse_budget(text: str) -> int | float:
    """``--budget``: a fraction of exact's saved bytes ("0.1", "1/8") or bytes ("250000")."""
    text = text.strip()
    try:
        if "/" in text:
            num, _, den = text.partition("/")
            value: int | float = float(num) / float(den)
        elif text.isdigit():
            value = int(text)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        value = None
    ok = isinstance(value, int) and value >= 1 or isinstance(value, float) and 0 < value <= 1
    if not ok:
        raise argparse.ArgumentTypeError(
            "must be a fraction of exact's saved bytes in (0, 1] (0.1, 1/8) or a whole number "
            f"of bytes; got {text!r}"
        )
    return value


def plan_builtin(
    model_name: str,
    data: str,
    batch: int,
    budget: int | float,
    *,
    seed: int = 0,
    draws: int = 8,
    candidates=None,
    data_root: str | None = None,
    val_fraction: float = 0.1,
    splits=None,
    checkpointing: bool = True,
):
    """The plan of built-in ``model_name`` (initialised from ``seed`` as `randprop train` does)
    on the first ``batch`` training examples of ``data``: (plan, splits)."""
    from randprop.data import load_dataset
    from randprop.models.registry import MODELS
    from randprop.plan import plan
    from randprop.train.loop import build_seeded, loss_fn

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {', '.join(sorted(MODELS))}")
    splits = splits or load_dataset(data, root=data_root, seed=seed, val_fraction=val_fraction)
    if tuple(MODELS[model_name].input_shape) != tuple(splits.input_shape):
        raise ValueError(
            f"model {model_name!r} takes examples of shape {MODELS[model_name].input_shape}; "
            f"dataset {data!r} has {splits.input_shape}"
        )
    x, y = splits.train.tensors
    n = min(batch, len(x))
    model = build_seeded(model_name, seed)
    result = plan(model, (x[:n], y[:n]), loss_fn, budget, seed=seed, draws=draws,
                  candidates=candidates, checkpointing=checkpointing)  # fmt: skip
    return result, splits


def cmd_plan(args: argparse.Namespace) -> int:
    candidates = ["exact", *args.candidate] if args.candidate else None
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if ":" in args.model:
            from randprop.cli import _spec_loss, load_model_spec
            from randprop.plan import plan_loss

            model, batch, loss_fn = load_model_spec(args.model)
            result = plan_loss(model, lambda m: _spec_loss(m, batch, loss_fn), args.budget,
                               seed=args.seed, draws=args.draws, candidates=candidates,
                               checkpointing=not args.no_checkpointing)  # fmt: skip
        else:
            result, _ = plan_builtin(args.model, args.data, args.batch, args.budget,
                                     seed=args.seed, draws=args.draws, candidates=candidates,
                                     data_root=args.data_root,
                                     checkpointing=not args.no_checkpointing)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    print(result.to_json() if args.json else result)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from randprop.cli import int_at_least

    p = sub.add_parser(
        "plan", help="the estimator for every layer that fits a byte budget at least variance"
    )
    p.add_argument(
        "--model", default="mlp",
        help="a built-in model (initialised from --seed as `randprop train` does) or "
        "package.module:function returning (model, batch[, loss_fn]) as `randprop memory` takes",
    )  # fmt: skip
    p.add_argument("--data", default="mnist", help="dataset of the batch (built-in models)")
    p.add_argument(
        "--budget", type=parse_budget, required=True,
        help="fraction of exact's saved bytes (0.1, 1/8) or bytes (250000)",
    )  # fmt: skip
    p.add_argument("--batch", type=int_at_least(1), default=150, help="first N training examples")
    p.add_argument("--draws", type=int_at_least(2), default=8, help="gradient draws per setting")
    p.add_argument(
        "--candidate", action="append", default=[], metavar="METHOD",
        help="a setting to choose from (repeat the flag; exact is always one); default: "
        "randprop.plan.CANDIDATES (RAD keep x mode x bits, Quant bits, Trace probes x bits)",
    )  # fmt: skip
    p.add_argument(
        "--no-checkpointing", action="store_true",
        help="leave checkpointing of the blocks (recomputed in backward) out of the options",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="folder of user-supplied data (cifar10)")
    p.add_argument("--threads", type=int_at_least(0), default=0, help="0: torch's default")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)
