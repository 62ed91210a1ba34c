"""``gpt2 tokenizer``: train a byte-level BPE vocabulary on text files; encode and decode with one."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gpt2.cli.options import TOKENIZER_HELP, read_text_file
from gpt2.tokenizer.bpe import Tokenizer, find_tokenizer_files, train_tokenizer
from gpt2.util.atomic import check_apart
from gpt2.util.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenizer",
        description="Train a GPT-2 style byte-level BPE vocabulary, or encode and decode text with one.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    train = actions.add_parser(
        "train",
        help="train a vocabulary on UTF-8 text files",
        description="Train a byte-level BPE vocabulary with GPT-2's pre-tokenisation and save it in "
        "Hugging Face's format, which `gpt2` and transformers load.",
    )
    train.add_argument("files", nargs="+", type=Path, metavar="FILES", help="UTF-8 text files to train on")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="number of tokens: 256 bytes + merges + <|endoftext|> (GPT-2 has 50257)")
    train.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="directory to write vocab.json, merges.txt, tokenizer.json, ... into")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the tokenizer files (or a model's) already in DIR")
    train.set_defaults(handler=run_train)

    encode = actions.add_parser("encode", help="print the token ids of a text",
                                description="Print the token ids of TEXT, separated by spaces.")
    encode.add_argument("--tokenizer", type=Path, required=True, metavar="PATH", help=TOKENIZER_HELP)
    encode.add_argument("text", metavar="TEXT", help="the text to encode; '-' reads it from standard input")
    encode.add_argument("--allow-special", action="store_true",
                        help="encode special tokens written in the text, such as <|endoftext|>, as their "
                        "own ids instead of as plain text")
    encode.set_defaults(handler=run_encode)

    decode = actions.add_parser("decode", help="print the text of token ids",
                                description="Print the text that the token ids IDS stand for.")
    decode.add_argument("--tokenizer", type=Path, required=True, metavar="PATH", help=TOKENIZER_HELP)
    decode.add_argument("ids", nargs="+", type=int, metavar="IDS", help="token ids, separated by spaces")
    decode.set_defaults(handler=run_decode)


def run_train(args: argparse.Namespace) -> int:
    out: Path = args.out
    check_apart(out, {"input": args.files})
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if not args.overwrite and out.is_dir() and (find_tokenizer_files(out) or (out / "config.json").is_file()):
        raise UserError(f"{out} already holds a tokenizer or a model, whose files this would replace; "
                        "choose another --out or add --overwrite")
    start = time.perf_counter()
    tokenizer = train_tokenizer(args.files, args.vocab_size)
    seconds = time.perf_counter() - start
    tokenizer.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in args.files)
    short = f" (asked {args.vocab_size:,}: the corpus has too few pairs to merge)" \
        if tokenizer.n_vocab < args.vocab_size else ""
    print(f"trained a vocabulary of {tokenizer.n_vocab:,} tokens{short} on {len(args.files)} file(s), "
          f"{size / 1e6:,.1f} MB, in {seconds:.1f} s")
    print(f"saved to {args.out}")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    text = read_text_file(Path("-"), "the text") if args.text == "-" else args.text
    allowed = "all" if args.allow_special else frozenset()
    ids = Tokenizer.load(args.tokenizer).encode(text, allowed_special=allowed)
    print(" ".join(map(str, ids)))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    print(Tokenizer.load(args.tokenizer).decode(args.ids))
    return 0
