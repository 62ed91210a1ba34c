"""``gpt2 chat``: talk with a model in the terminal (the prompt formats are in
``gpt2.generation.prompts``)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from gpt2.cli.options import (
    add_draft_arguments,
    add_length_arguments,
    add_model_arguments,
    add_sampling_arguments,
    decode_utf8,
    load_draft,
    load_model_and_tokenizer,
    report_drafts,
    report_warnings,
    sampling_config,
)
from gpt2.tokenizer.bpe import Tokenizer
from gpt2.tokenizer.chat_template import CHAT_HEADER, ChatTemplate
from gpt2.util.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat",
        description="An interactive chat: type a message, read the reply; an empty line or end of input "
        "(Ctrl-D) ends it. A model whose tokenizer has a chat template (tokenizer_config.json's "
        "'chat_template', as a chat fine-tune saves it), or one given with --chat-template, gets the "
        "conversation in that template, and a reply ends at the end-of-turn token. A base model "
        "continues a plain transcript ('User: ...' / 'Assistant: ...' lines after a one-line header) "
        "and a reply is one line. The oldest turns are dropped when the window is full.",
    )
    add_model_arguments(p)
    add_sampling_arguments(p, preset="paper")
    add_length_arguments(p)
    add_draft_arguments(p)
    p.add_argument("--system", metavar="TEXT",
                   help="with a chat template, the system message (default: none); without one, the line "
                   f"that opens the transcript and sets the scene (default: {CHAT_HEADER.strip()!r})")
    add_chat_template_argument(p)
    p.set_defaults(handler=run)


def add_chat_template_argument(p: argparse.ArgumentParser) -> None:
    """--chat-template FILE (``gpt2 chat`` and ``gpt2 serve``)."""
    p.add_argument("--chat-template", type=Path, metavar="FILE",
                   help="a Jinja chat template (as transformers reads one, e.g. chat_template.jinja) to use "
                   "instead of the tokenizer's own (default: the tokenizer's, if it has one, else the "
                   "plain transcript)")


def chat_template(args: argparse.Namespace, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The template chats use: --chat-template's, else the tokenizer's own, else None (the transcript);
    refused in one line if it cannot render a conversation of one user message."""
    template = ChatTemplate.read(args.chat_template) if args.chat_template else ChatTemplate.of(tokenizer)
    if template is not None:
        system = getattr(args, "system", None)
        probe = [{"role": "system", "content": system}] if system is not None else []
        template.render([*probe, {"role": "user", "content": "Hello!"}], tokenizer,
                        add_generation_prompt=True)
    return template


def run(args: argparse.Namespace) -> int:
    from gpt2.generation.prompts import Chat, chat_format  # torch: only when the verb runs

    config = sampling_config(args)
    model, tokenizer = load_model_and_tokenizer(args)
    chat = Chat(chat_format(chat_template(args, tokenizer), args.system), draft=load_draft(args, model))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        raw = sys.stdin.buffer.readline()
        if not raw.strip():
            report_drafts(args, chat.draft)
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
