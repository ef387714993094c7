"""Command-line entries for training: `randprop train` and `randprop demo`.

Until the training loop lands, `demo` prints the memory comparison of exact vs RAD.
"""

from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> int:
    from randprop.cli import main

    for model in ("mlp", "cnn"):
        main(["memory", "--model", model, "--method", "rad:keep=0.1", "--batch", "150"])
        print()
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the bundled default (MNIST)")
    p.set_defaults(fn=cmd_demo)
