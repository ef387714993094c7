"""Command-line entries for training: `randprop train` and `randprop demo`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from randprop.cli_plan import parse_budget, plan_builtin


def cmd_train(args: argparse.Namespace) -> int:
    from randprop.train import TrainConfig, train

    method, planned, splits = args.method, None, None
    if args.no_checkpointing and args.budget is None:
        raise ValueError("--no-checkpointing goes with --budget (it keeps checkpointing out of "
                         "the plan)")  # fmt: skip
    if args.budget is not None:
        if args.method != "exact" or args.match_memory_of or args.checkpointing:
            raise ValueError("--budget plans every layer's method and whether to checkpoint: "
                             "drop --method, --match-memory-of and --checkpointing")  # fmt: skip
        planned, splits = plan_builtin(args.model, args.data, args.batch, args.budget,
                                       seed=args.seed, data_root=args.data_root,
                                       val_fraction=args.val_fraction,
                                       checkpointing=not args.no_checkpointing)  # fmt: skip
        method = planned.methods
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "plan.json").write_text(planned.to_json() + "\n")
    cfg = TrainConfig(
        model=args.model,
        data=args.data,
        method=method,
        checkpointing=planned.checkpointing if planned else args.checkpointing,
        batch=args.batch,
        steps=args.steps,
        seed=args.seed,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        schedule=args.schedule,
        eval_every=args.eval_every,
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        out=args.out,
        resume=args.resume,
        match_memory_of=args.match_memory_of,
        device=args.device,
        data_root=args.data_root,
        val_fraction=args.val_fraction,
        threads=args.threads,
    )
    try:
        summary = train(cfg, splits=splits)
    except KeyboardInterrupt:
        return 130
    except OSError as err:  # a missing dataset or checkpoint (says how to get it), an unwritable
        raise ValueError(str(err)) from err  # run directory: one line, no traceback
    if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 alone reports
        print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from randprop.train.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, seed=args.seed, threads=args.threads)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from randprop.cli import int_at_least

    positive, count = int_at_least(1), int_at_least(0)
    p = sub.add_parser("train", help="train a model on a dataset with a method or baseline")
    p.add_argument("--model", default="mlp", help="a model name (see `randprop list`)")
    p.add_argument("--data", default="mnist", help="a dataset name (see `randprop list`)")
    p.add_argument(
        "--method",
        default="exact",
        help='a method ("rad:keep=0.1"), a learning rule (fa, dfa, memdfa) or '
        '"checkpoint[:segments=K]"',
    )
    p.add_argument("--batch", type=positive, default=150)
    p.add_argument("--steps", type=positive, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", default="adam", choices=("sgd", "adam", "adamw"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine", "linear"))
    p.add_argument("--eval-every", type=count, default=0, help="steps; 0: only at the end")
    p.add_argument("--log-every", type=count, default=50)
    p.add_argument("--checkpoint-every", type=count, default=0, help="steps; 0: only at the end")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--match-memory-of",
        default=None,
        metavar="METHOD",
        help="train exact backprop with the largest batch whose measured saved bytes do not "
        "exceed METHOD's at --batch",
    )
    p.add_argument(
        "--budget", type=parse_budget, default=None,
        help="plan every layer's method to fit this fraction of exact's saved bytes (0.1, 1/8) "
        "or bytes (rp.plan on the first training batch; writes OUT/plan.json), then train",
    )  # fmt: skip
    p.add_argument(
        "--checkpointing", action="store_true",
        help="with a per-layer --method: also checkpoint the model's blocks (converted first)",
    )  # fmt: skip
    p.add_argument(
        "--no-checkpointing", action="store_true",
        help="with --budget: leave checkpointing of the blocks out of the plan's options",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None, help="folder of user-supplied data (cifar10)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--threads", type=count, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("demo", help="the main job on the bundled default (MNIST), a few minutes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=positive, default=2000, help="iterations per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=count, default=1, help="torch threads (1: robust on busy CPUs)"
    )
    p.set_defaults(fn=cmd_demo)
