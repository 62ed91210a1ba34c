"""``gpt2 eval``: the GPT-2 paper's zero-shot benchmarks (perplexity, LAMBADA, HellaSwag, CBT) and its
Table 3 as a report."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from gpt2.cli.options import add_model_arguments, load_model_and_tokenizer
from gpt2.config import PUBLISHED_SIZES
from gpt2.evaluation import perplexity
from gpt2.evaluation.hub import HUB_DATASETS
from gpt2.util.atomic import check_apart
from gpt2.util.errors import UserError

if TYPE_CHECKING:
    from gpt2.evaluation.scoring import Scorer


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        description="Evaluate a model zero-shot on the GPT-2 paper's benchmarks.",
    )
    tasks_ = p.add_subparsers(dest="task", metavar="TASK", required=True)

    ppl = tasks_.add_parser(
        "perplexity",
        help="perplexity, bits per byte/char (and per word) of a text file, by sliding windows",
        description="Perplexity by the stride method: windows of --context tokens every --stride tokens, "
        "each token scored once with up to context - stride tokens of earlier context.",
    )
    _common(ppl)
    ppl.add_argument("--corpus", choices=list(perplexity.CORPORA),
                     help="the file's corpus: sets the paper's de-tokeniser, word counting and, for enwik8 "
                     "and text8, the standard test split (default: the --dataset's, else raw: none of these)")
    ppl.add_argument("--stride", type=int, help="tokens between window starts (default: the context)")
    ppl.add_argument("--context", type=int, help="tokens per window (default: the model's context window)")
    ppl.add_argument("--detokenize", choices=["none", *perplexity.DETOKENIZERS],
                     help="de-tokeniser to apply to the raw text (default: the corpus's)")
    ppl.add_argument("--split", choices=[*perplexity.SPLITS, "all"],
                     help="byte range of the 10^8-byte enwik8/text8 file, or all of it (default: test for "
                     "those corpora, all for others)")
    ppl.add_argument("--words", action="store_true",
                     help="also report perplexity per word of the original text (implied by word corpora)")
    ppl.set_defaults(handler=run_perplexity)

    _task_parser(tasks_, "lambada", "LAMBADA last-word accuracy and perplexity (OpenAI's jsonl)",
                 "LAMBADA: accuracy of greedy prediction of every token of the final word, and perplexity "
                 "of the final word.")
    hs = _task_parser(tasks_, "hellaswag", "HellaSwag accuracy and length-normalised accuracy (jsonl)",
                      "HellaSwag: the ending with the highest log-likelihood, plain and divided by its "
                      "length.")
    hs.add_argument("--style", choices=["harness", "llmc"], default="harness",
                    help="harness: lm-evaluation-harness's prompt and character-length normalisation; "
                    "llmc: llm.c's raw ctx and token-length normalisation (default: harness)")
    cbt = _task_parser(tasks_, "cbt", "Children's Book Test (CN or NE) accuracy, official text format",
                       "CBT: each candidate fills the XXXXX gap and is scored with the rest of the question; "
                       "the most likely one is the answer.")
    cbt.add_argument("--detokenize", choices=["none", *perplexity.DETOKENIZERS], default="cbt",
                     help="de-tokeniser for the story and question (default: cbt)")

    rep = tasks_.add_parser("report", help="run a suite file and write the paper's Table 3 (markdown + JSON)",
                            description="Run the evaluations a suite file (TOML or YAML) lists and write "
                            "report.md and report.json, with GPT-2's published numbers beside ours when the "
                            "model has a published size.")
    _common(rep, data=False)
    rep.add_argument("--suite", required=True, help="the suite file (see gpt2.evaluation.report)")
    rep.add_argument("--out", default=".", help="directory for report.md and report.json (default: .)")
    rep.add_argument("--compare-with", choices=list(PUBLISHED_SIZES),
                     help="show the published figures of this size (default: the size the model's shape "
                     "matches, if any)")
    rep.set_defaults(handler=run_report)


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    add_model_arguments(p, generates=False)
    if data:
        p.add_argument("--file", help="the evaluation data in the task's official format")
        p.add_argument("--dataset", choices=list(HUB_DATASETS),
                       help="load the data by name from the Hugging Face hub instead (needs `datasets`)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")


def _task_parser(
    tasks_: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse.ArgumentParser:
    p = tasks_.add_parser(name, help=help, description=description)
    _common(p)
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.set_defaults(handler=run_task)
    return p


def scorer_for(args: argparse.Namespace) -> Scorer:
    """Load the model and its tokenizer as the options say."""
    from gpt2.evaluation.scoring import Scorer  # torch: only when the verb runs

    model, tokenizer = load_model_and_tokenizer(args)
    return Scorer(model, tokenizer, batch_size=args.batch_size, progress=not args.no_progress)


def run_perplexity(args: argparse.Namespace) -> int:
    default = args.dataset if args.dataset in perplexity.CORPORA else "raw"
    corpus = perplexity.get_corpus(args.corpus or default)
    detokenizer = args.detokenize or corpus.detokenizer
    split = args.split or ("test" if corpus.standard_split else None)
    if (args.file is None) == (args.dataset is None):
        raise UserError("give either --file or --dataset")
    scorer = scorer_for(args)
    if args.dataset:
        text = perplexity.hub_text(args.dataset, detokenizer=detokenizer)
    else:
        text = perplexity.read_text(args.file, detokenizer=detokenizer, split=split)
    words = args.words or corpus.metric == "word_perplexity"
    result = perplexity.evaluate_perplexity(scorer, text, context=args.context, stride=args.stride,
                                            words=words)
    _print(args, {"task": "perplexity", "corpus": corpus.name} | result.to_dict(), scorer)
    return 0


def run_task(args: argparse.Namespace) -> int:
    from gpt2.evaluation import benchmarks

    rows = benchmarks.task_rows(args.task, file=args.file, dataset=args.dataset)
    scorer = scorer_for(args)
    if args.task == "lambada":
        result = benchmarks.evaluate_lambada(scorer, rows, limit=args.limit)
    elif args.task == "hellaswag":
        result = benchmarks.evaluate_hellaswag(scorer, rows, style=args.style, limit=args.limit)
    else:
        result = benchmarks.evaluate_cbt(scorer, rows, detokenizer=args.detokenize, limit=args.limit)
    _print(args, result.to_dict(), scorer)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from gpt2.evaluation import report

    entries = report.load_suite(args.suite)
    inputs = {"--suite": args.suite, "--model": args.model, "--adapter": args.adapter,
              "--tokenizer": args.tokenizer, "suite's data": [e["file"] for e in entries if "file" in e]}
    for output in report.report_files(args.out):  # the files, not --out: its default "." holds the suite
        check_apart(output, inputs)
    scorer = scorer_for(args)

    def progress(name: str, result: dict) -> None:
        print(f"{name}: done in {result['seconds']:.1f} s", file=sys.stderr)

    table = report.run_suite(
        scorer, entries, model_name=args.model, published_as=args.compare_with, on_result=progress
    )
    md, js = report.write_report(table, args.out)
    if args.json:
        print(json.dumps(table))
    else:
        print(report.markdown(table), end="")
        print(f"wrote {md} and {js}", file=sys.stderr)
    return 0


def _print(args: argparse.Namespace, result: dict, scorer: Scorer) -> None:
    speed = scorer.throughput
    print(f"{speed.tokens:,} tokens in {speed.seconds:.1f} s: {speed.tokens_per_second:,.0f} tokens/s",
          file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:<18} {value:.4f}" if isinstance(value, float) else f"{key:<18} {value}")
