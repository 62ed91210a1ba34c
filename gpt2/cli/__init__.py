"""The ``gpt2`` command: one verb per module of this package, listed in ``VERBS``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gpt2.cli import chat, detect, evaluate, generate, info, plot, prepare, serve, task, tokenizer, train
from gpt2.errors import UserError

# Each module: register(subparsers) adds its verb with a handler.
VERBS = [info, tokenizer, evaluate, generate, chat, task, detect, prepare, train, plot, serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2",
        description="GPT-2: train, fine-tune, run, evaluate and serve GPT-2 models, and detect their text.",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        verb.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gpt2 VERB ...``; problems the user can fix end in one ``error:`` line, status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
