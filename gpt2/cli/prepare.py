"""``gpt2 prepare``: text corpora to llm.c token shards, with the tokenizer saved beside them; chat
and instruction examples (``gpt2.data.chat``) to shards with a loss mask."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2.data.chat import TOO_LONG, is_chat_file, prepare_chat
from gpt2.data.prepare import DEFAULT_SHARD_TOKENS, Corpus, prepare
from gpt2.tokenizer.bpe import Tokenizer, find_tokenizer_files
from gpt2.tokenizer.chat_template import ChatTemplate
from gpt2.util.atomic import check_apart
from gpt2.util.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        description="Tokenize .txt files, .jsonl files (a 'text' field per line), .parquet files (a "
        "'text' column, one document per row, read a batch of rows at a time), directories of them, "
        "the named corpus 'shakespeare', or a Hugging Face dataset by name into llm.c's .bin shards "
        "(<|endoftext|> before each document), split into training and validation shards, with the "
        "tokenizer saved beside them. Chat and instruction data is recognised by its keys: .jsonl files "
        "of OpenAI's fine-tuning format ({\"messages\": [{\"role\", \"content\"}...]}), prompt-completion "
        "({\"prompt\", \"completion\"}) or Alpaca's ({\"instruction\", \"input\", \"output\"}); each "
        "example is rendered with the chat template and only the assistant's tokens are trained on.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a .txt, .jsonl or .parquet file, a directory of them, 'shakespeare', or a "
                   "dataset name")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", metavar="TOK",
                        help="the tokenizer: a directory of tokenizer files, a .tiktoken file, or a model's "
                        "(a training run, a model directory or a hub name such as gpt2)")
    source.add_argument("--vocab-size", type=int, metavar="N",
                        help="train a new byte-level BPE tokenizer of N tokens on the inputs instead")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the shards into")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_TOKENS, metavar="TOKENS",
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, as llm.c)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of the tokens set aside for validation, in pieces spread over the "
                   "corpus (default 0.05; 0 for none)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the field holding the text in .jsonl lines, the column in .parquet files (one "
                   "document per row; null rows are skipped) and in dataset rows (default 'text', as in "
                   "FineWeb)")
    p.add_argument("--dataset-config", help="configuration name of a Hugging Face dataset")
    p.add_argument("--dataset-split", default="train", help="split of a Hugging Face dataset (default train)")
    p.add_argument("--threads", type=int, help="tokenizer threads (default: one per CPU core; the "
                   "shards are the same for any number)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it already holds files")
    chat = p.add_argument_group("chat and instruction data")
    chat.add_argument("--seq-len", type=int, default=1024, metavar="T",
                      help="examples are packed whole into windows of T tokens, the length the model trains "
                      "on (default 1024, GPT-2's context)")
    chat.add_argument("--too-long", choices=TOO_LONG, default="truncate",
                      help="an example longer than --seq-len is cut to it (truncate, the default) or left "
                      "out (drop); both are counted")
    chat.add_argument("--chat-template", metavar="FILE",
                      help="a Jinja chat template (as transformers reads it) with the assistant's part in "
                      "{%% generation %%}...{%% endgeneration %%}; default: the tokenizer's, else GPT-2's")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_apart(args.out, {"input": args.inputs, "--tokenizer": args.tokenizer,
                           "--chat-template": args.chat_template})
    chat = [is_chat_file(path) for path in args.inputs]
    if any(chat):
        if not all(chat):
            raise UserError("give either chat .jsonl files or text corpora, not both: "
                            + ", ".join(i for i, c in zip(args.inputs, chat, strict=True) if not c))
        return run_chat(args)
    corpus = Corpus(args.inputs, text_field=args.text_field,
                    dataset_split=args.dataset_split, dataset_config=args.dataset_config)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    counts = prepare(corpus, args.out, tokenizer=tokenizer, vocab_size=args.vocab_size,
                     shard_tokens=args.shard_size, val_fraction=args.val_fraction,
                     overwrite=args.overwrite, num_threads=args.threads)
    print(f"wrote {counts['train']:,} training and {counts['val']:,} validation tokens to {args.out}")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    if not args.tokenizer:
        raise UserError("chat data needs the model's tokenizer: give --tokenizer (e.g. the model's "
                        "directory)")
    template = ChatTemplate.read(args.chat_template) if args.chat_template else None
    counts = prepare_chat(args.inputs, args.out, tokenizer=load_tokenizer(args.tokenizer), template=template,
                          seq_len=args.seq_len, too_long=args.too_long, shard_tokens=args.shard_size,
                          val_fraction=args.val_fraction, overwrite=args.overwrite)
    ex, trained = counts.examples, counts.trained_tokens
    print(f"wrote {ex['train']:,} training and {ex['val']:,} validation examples ({trained['train']:,} and "
          f"{trained['val']:,} trained tokens) in windows of {counts.seq_len} tokens to {args.out}; "
          f"{counts.truncated:,} truncated, {counts.dropped:,} dropped (longer than --seq-len or with no "
          "assistant token left)")
    return 0


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer ``spec`` names: a tokenizer file or directory, else the tokenizer of the model it
    names (a run directory's latest checkpoint, or a hub model)."""
    path = Path(spec)
    if path.is_file() or (path.is_dir() and find_tokenizer_files(path)):
        return Tokenizer.load(path)
    from gpt2.checkpoints import resolve  # the hub client: only when a model is named

    return Tokenizer.from_pretrained(resolve(spec))
