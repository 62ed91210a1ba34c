"""``gpt2 plot``: the loss curve of a training run."""

from __future__ import annotations

import argparse

from gpt2.training.metrics import plot_metrics


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plot",
        description="Draw the training and validation loss of RUN/metrics.jsonl into RUN/loss.png.",
    )
    p.add_argument("run", metavar="RUN", help="a training run directory (gpt2 train --out RUN)")
    p.add_argument("--out", metavar="PNG", help="where to write the image (default RUN/loss.png)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    print(plot_metrics(args.run, args.out))
    return 0
