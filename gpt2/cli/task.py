"""``gpt2 task``: the paper's zero-shot tasks (summarize, translate, answer) on your own text."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2.cli.options import (
    add_draft_arguments,
    add_model_arguments,
    load_draft,
    load_model_and_tokenizer,
    read_text_file,
    report_drafts,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "task",
        description="Run one of the zero-shot tasks of the GPT-2 paper with its prompt and decoding: "
        "summarize (article + 'TL;DR:', top-k 2, 100 tokens, first 3 sentences), translate (example "
        "'english = french' pairs, greedy, first sentence), answer (document, Q/A history, 'A:', greedy).",
    )
    kinds = p.add_subparsers(dest="task", metavar="TASK", required=True)

    s = kinds.add_parser("summarize", help="summarize an article",
                         description="Summarize an article: its text, then 'TL;DR:'.")
    add_model_arguments(s)
    add_draft_arguments(s)
    _add_text(s, "the article")
    s.add_argument("--seed", type=int, help="random seed (the summary is sampled with top-k 2)")
    s.set_defaults(handler=run_summarize)

    t = kinds.add_parser("translate", help="translate an English sentence into French",
                         description="Translate a sentence after a few example pairs of the form "
                         "'english sentence = french sentence'.")
    add_model_arguments(t)
    add_draft_arguments(t)
    _add_text(t, "the sentence to translate")
    t.add_argument("--examples", type=Path, metavar="FILE",
                   help="example pairs, one 'source sentence = target sentence' per line (default: a few "
                   "English = French pairs; give pairs the other way round to translate into English)")
    t.set_defaults(handler=run_translate)

    a = kinds.add_parser("answer", help="answer a question about a document",
                         description="Answer a question about a document, CoQA style: the document, the "
                         "earlier questions and answers, the question, then 'A:'.")
    add_model_arguments(a)
    add_draft_arguments(a)
    _add_text(a, "the document")
    a.add_argument("--question", required=True, help="the question to answer")
    a.add_argument("--history", type=Path, metavar="FILE",
                   help="earlier turns of the dialogue, one 'question = answer' pair per line")
    a.set_defaults(handler=run_answer)


def _add_text(p: argparse.ArgumentParser, what: str) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help=what)
    source.add_argument("--file", type=Path, metavar="FILE", help=f"a UTF-8 file holding {what}")


def _text(args: argparse.Namespace, path: Path | None = None) -> str:
    path = path or args.file
    if path is None:
        return args.text
    return read_text_file(path, "it")


def run_summarize(args: argparse.Namespace) -> int:
    from gpt2.generation import prompts  # torch: only when the verb runs

    model, tokenizer = load_model_and_tokenizer(args)
    draft = load_draft(args, model)
    print(prompts.summarize(model, tokenizer, _text(args), seed=args.seed, draft=draft))
    report_drafts(args, draft)
    return 0


def run_translate(args: argparse.Namespace) -> int:
    from gpt2.generation import prompts  # torch: only when the verb runs

    examples = prompts.DEFAULT_EXAMPLES
    if args.examples:
        examples = prompts.read_pairs(_text(args, args.examples), str(args.examples))
    model, tokenizer = load_model_and_tokenizer(args)
    draft = load_draft(args, model)
    print(prompts.translate(model, tokenizer, _text(args), examples, draft))
    report_drafts(args, draft)
    return 0


def run_answer(args: argparse.Namespace) -> int:
    from gpt2.generation import prompts  # torch: only when the verb runs

    history = []
    if args.history:
        history = prompts.read_pairs(_text(args, args.history), str(args.history), "question = answer")
    model, tokenizer = load_model_and_tokenizer(args)
    draft = load_draft(args, model)
    print(prompts.answer(model, tokenizer, _text(args), args.question, history, draft))
    report_drafts(args, draft)
    return 0
