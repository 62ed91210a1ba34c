"""``gpt2 prepare``: text corpora to llm.c token shards, with the tokenizer saved beside them."""

from __future__ import annotations

import argparse

from gpt2.data import DEFAULT_SHARD_TOKENS, Corpus, prepare
from gpt2.tokenizer import Tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        description="Tokenize .txt files, directories of them, .jsonl files (a 'text' field per line), "
        "the named corpus 'shakespeare', or a Hugging Face dataset by name into llm.c's .bin shards "
        "(<|endoftext|> before each document), split into training and validation shards, with the "
        "tokenizer saved beside them.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a .txt or .jsonl file, a directory of them, 'shakespeare', or a dataset name")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", metavar="TOK",
                        help="the tokenizer: a directory of tokenizer files or a .tiktoken file")
    source.add_argument("--vocab-size", type=int, metavar="N",
                        help="train a new byte-level BPE tokenizer of N tokens on the inputs instead")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the shards into")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_TOKENS, metavar="TOKENS",
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, as llm.c)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of the tokens set aside for validation, in pieces spread over the "
                   "corpus (default 0.05; 0 for none)")
    p.add_argument("--text-field", default="text", help="the field holding the text in .jsonl lines "
                   "and dataset rows (default 'text')")
    p.add_argument("--dataset-config", help="configuration name of a Hugging Face dataset")
    p.add_argument("--dataset-split", default="train", help="split of a Hugging Face dataset (default train)")
    p.add_argument("--threads", type=int, help="tokenizer threads (default: one per CPU core; the "
                   "shards are the same for any number)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it already holds files")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    corpus = Corpus(args.inputs, text_field=args.text_field, dataset_split=args.dataset_split,
                    dataset_config=args.dataset_config)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    counts = prepare(corpus, args.out, tokenizer=tokenizer, vocab_size=args.vocab_size,
                     shard_tokens=args.shard_size, val_fraction=args.val_fraction,
                     overwrite=args.overwrite, num_threads=args.threads)
    print(f"wrote {counts['train']:,} training and {counts['val']:,} validation tokens to {args.out}")
    return 0
