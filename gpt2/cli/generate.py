"""``gpt2 generate``: continue a prompt with a model, streaming the text as it comes."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from gpt2.cli.options import (
    add_draft_arguments,
    add_length_arguments,
    add_model_arguments,
    add_sampling_arguments,
    load_draft,
    load_model_and_tokenizer,
    read_text_file,
    report_drafts,
    report_warnings,
    sampling_config,
)
from gpt2.generation.config import ContextWindowReached
from gpt2.util.atomic import check_apart, write_atomic
from gpt2.util.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        description="Continue a prompt with a model and print the new text (the prompt itself is not "
        "repeated). Without a prompt, generation starts from <|endoftext|>, like GPT-2's "
        "unconditional samples.",
    )
    add_model_arguments(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the text to continue")
    source.add_argument("--prompt-file", type=Path, metavar="FILE",
                        help="read the prompt from this UTF-8 file ('-' for standard input)")
    add_sampling_arguments(p, preset="paper")
    add_length_arguments(p)
    add_draft_arguments(p)
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="how many continuations to make of the prompt (default 1)")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="also write the generated text to FILE (replaced atomically)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print text as it is generated (the default for a single sample); --no-stream "
                   "prints it at the end")
    p.set_defaults(handler=run)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt or ""
    return read_text_file(args.prompt_file, "the prompt")


def run(args: argparse.Namespace) -> int:
    if args.output:
        inputs = {"--prompt-file": args.prompt_file, "--model": args.model, "--adapter": args.adapter,
                  "--tokenizer": args.tokenizer}
        check_apart(args.output, inputs, "--output")
    from gpt2.generation.sampling import generate_text, stream_text  # torch: only when the verb runs

    config = sampling_config(args, num_samples=args.num_samples)
    stream = args.stream if args.stream is not None else args.num_samples == 1
    if stream and args.num_samples != 1:
        raise UserError("--stream prints one sample at a time; use --no-stream with --num-samples")
    prompt = _read_prompt(args)
    model, tokenizer = load_model_and_tokenizer(args)
    draft = load_draft(args, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ContextWindowReached)
        if stream:
            pieces = []
            for piece in stream_text(model, tokenizer, prompt, config, draft):
                pieces.append(piece)
                print(piece, end="", flush=True)
            print()
            texts = ["".join(pieces)]
        else:
            texts = generate_text(model, tokenizer, prompt, config, draft)
            print(_join(texts))
    report_warnings(caught)
    report_drafts(args, draft)
    if args.output:
        write_atomic(args.output, lambda tmp: tmp.write_text(_join(texts) + "\n", encoding="utf-8"))
    return 0


def _join(texts: list[str]) -> str:
    if len(texts) == 1:
        return texts[0]
    return "\n".join(f"{'=' * 20} sample {i} {'=' * 20}\n{t}" for i, t in enumerate(texts, 1))
