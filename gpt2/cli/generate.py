"""``gpt2 generate``: continue a prompt with a model, streaming the text as it comes.

Also the options that ``gpt2 chat`` and ``gpt2 task`` share: which model and tokenizer, how to
sample, and the speed options.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from gpt2.api import GPT2
from gpt2.atomic import write_atomic
from gpt2.cli.tokenizer import TOKENIZER_HELP
from gpt2.errors import UserError
from gpt2.sampling import (
    SAMPLING_PRESETS,
    ContextWindowReached,
    GenerationConfig,
    generate_text,
    prepare_for_inference,
    stream_text,
)
from gpt2.tokenizer import Tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a model",
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
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="how many continuations to make of the prompt (default 1)")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="also write the generated text to FILE (replaced atomically)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print text as it is generated (the default for a single sample); --no-stream "
                   "prints it at the end")
    p.set_defaults(handler=run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --tokenizer, --device and the speed options."""
    p.add_argument("--model", required=True, metavar="M",
                   help="a Hugging Face-format model directory, a training run directory (its 'latest' "
                   "checkpoint), or a hub name such as gpt2")
    p.add_argument("--tokenizer", type=Path, metavar="PATH",
                   help=f"{TOKENIZER_HELP}; by default the one saved with the model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run: cpu, cuda, cuda:1... (default: cuda when available, else cpu)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--bf16", action="store_true",
                       help="bfloat16 weights and cache: half the memory; faster on GPUs, and on CPUs "
                       "together with --compile")
    speed.add_argument("--int8", action="store_true",
                       help="dynamic int8 quantisation of the linear layers (CPU): a quarter of the "
                       "weight memory; outputs differ slightly from fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model first (a minute or two of compiling; faster afterwards)")


def add_sampling_arguments(p: argparse.ArgumentParser, *, preset: str) -> None:
    """The sampling options; anything not given comes from --preset."""
    presets = "; ".join(
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in settings.items())
        for name, settings in SAMPLING_PRESETS.items()
    )
    p.add_argument("--preset", choices=list(SAMPLING_PRESETS), default=preset,
                   help=f"named sampling settings that the options below override (default {preset}; "
                   f"{presets})")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"how many tokens to generate at most (default {GenerationConfig.max_new_tokens})")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="divide the logits by T before sampling: lower is more predictable; 0 is greedy")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="sample only among the K likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, metavar="P",
                   help="sample only among the likeliest tokens that together have probability P "
                   "(0 < P <= 1)")
    p.add_argument("--min-p", type=float, metavar="M",
                   help="sample only among tokens at least M times as likely as the likeliest one "
                   "(0 <= M <= 1; 0 = off)")
    p.add_argument("--repetition-penalty", type=float, metavar="R",
                   help="make tokens already in the text less likely: logits divided by R (1 = off; 1.2 is "
                   "a common choice)")
    for name, how in (("frequency", "for each time it was already generated"),
                      ("presence", "once if it was already generated")):
        p.add_argument(f"--{name}-penalty", type=float, metavar="F",
                       help=f"subtract F from a token's logit {how} (OpenAI's; -2 to 2, 0 = off)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when the text contains TEXT (not printed); repeatable; escapes such as "
                   "\\n work")
    p.add_argument("--seed", type=int, help="random seed, for reproducible samples")
    p.add_argument("--truncate", action="store_true",
                   help="drop the start of a prompt too long for the context window (leaving room for "
                   "the new tokens) instead of refusing it")
    p.add_argument("--at-window", choices=["error", "stop", "slide"], default="error",
                   help="when prompt + new tokens pass the context window: refuse (error, the default), stop "
                   "there (stop), or keep the last half of the window and go on (slide)")


def sampling_settings(args: argparse.Namespace, **extra: object) -> dict[str, object]:
    """The ``GenerationConfig`` fields that the options ask for (validated here, once)."""
    stops = tuple(_unescape(s) for s in args.stop or ())
    config = GenerationConfig.from_preset(
        args.preset, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
        stop_strings=stops or None, seed=args.seed, truncate=args.truncate, at_window=args.at_window, **extra,
    )
    return {k: v for k, v in vars(config).items() if k != "stop_token_ids"}  # these default to <|endoftext|>


def _unescape(text: str) -> str:
    """Turn backslash escapes typed on a command line (\\n, \\t, \\u00e9) into the characters."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[GPT2, Tokenizer]:
    """The model (with the speed options applied) and its tokenizer (--tokenizer, else the model's own)."""
    model = GPT2.from_pretrained(args.model, device=args.device)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else model.tokenizer
    if tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer files; give one with --tokenizer PATH")
    if tokenizer.n_vocab > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.n_vocab} tokens but the model only "
                        f"{model.config.vocab_size}; give the tokenizer the model was trained with")
    prepare_for_inference(model, bf16=args.bf16, int8=args.int8, compile=args.compile)
    return model, tokenizer


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` ('-' for standard input), or a one-line error naming ``what``."""
    if str(path) == "-":
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} ({e})") from None


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt or ""
    return read_text_file(args.prompt_file, "the prompt")


def run(args: argparse.Namespace) -> int:
    settings = sampling_settings(args, num_samples=args.num_samples)
    stream = args.stream if args.stream is not None else args.num_samples == 1
    if stream and args.num_samples != 1:
        raise UserError("--stream prints one sample at a time; use --no-stream with --num-samples")
    prompt = _read_prompt(args)
    model, tokenizer = load_model_and_tokenizer(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ContextWindowReached)
        if stream:
            pieces = []
            for piece in stream_text(model, tokenizer, prompt, **settings):
                pieces.append(piece)
                print(piece, end="", flush=True)
            print()
            texts = ["".join(pieces)]
        else:
            texts = generate_text(model, tokenizer, prompt, **settings)
            print(_join(texts))
    report_warnings(caught)
    if args.output:
        write_atomic(args.output, lambda tmp: tmp.write_text(_join(texts) + "\n", encoding="utf-8"))
    return 0


def report_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print a stop at the context window as one ``note:`` line; other warnings as usual."""
    for w in caught:
        if issubclass(w.category, ContextWindowReached):
            print(f"note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _join(texts: list[str]) -> str:
    if len(texts) == 1:
        return texts[0]
    return "\n".join(f"{'=' * 20} sample {i} {'=' * 20}\n{t}" for i, t in enumerate(texts, 1))
