"""``gpt2 chat``: talk with a model in the terminal (the prompt format is in ``gpt2.prompts``)."""

from __future__ import annotations

import argparse
import sys
import warnings

from gpt2.cli.options import (
    add_length_arguments,
    add_model_arguments,
    add_sampling_arguments,
    decode_utf8,
    load_model_and_tokenizer,
    report_warnings,
    sampling_config,
)
from gpt2.errors import UserError
from gpt2.prompts import CHAT_HEADER, Chat


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat",
        description="An interactive chat: type a message, read the reply; an empty line or end of input "
        "(Ctrl-D) ends it. The model continues a plain transcript ('User: ...' / 'Assistant: ...' lines "
        "after a one-line header); the oldest turns are dropped when the window is full.",
    )
    add_model_arguments(p)
    add_sampling_arguments(p, preset="paper")
    add_length_arguments(p)
    p.add_argument("--header", default=CHAT_HEADER.strip(),
                   help="the line that opens the transcript and sets the scene")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = sampling_config(args)
    model, tokenizer = load_model_and_tokenizer(args)
    chat = Chat(header=args.header.strip() + "\n\n")
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        raw = sys.stdin.buffer.readline()
        if not raw.strip():
            return 0
        try:
            reply = chat.stream_reply(model, tokenizer, decode_utf8(raw, "the message"), config)
        except UserError as e:  # this message only: the conversation goes on
            print(f"error: {e}", file=sys.stderr)
            continue
        print("gpt2> ", end="", flush=True)
        with warnings.catch_warnings(record=True) as caught:
            for piece in reply:
                print(piece, end="", flush=True)
        print()
        report_warnings(caught)
