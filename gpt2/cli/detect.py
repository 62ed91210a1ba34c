"""``gpt2 detect``: does a text look written by the model? Fast-DetectGPT's score, GLTR's ranks, and a
calibration on people's text that measures the error rates."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2.cli.options import (
    add_model_arguments,
    add_sampling_arguments,
    load_model_and_tokenizer,
    read_text_file,
    sampling_config,
)
from gpt2.evaluation.detection import (
    DEFAULT_THRESHOLD,
    MIN_TOKENS,
    Calibration,
    Detection,
    Detector,
    split_passages,
)
from gpt2.util.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "detect",
        description="Score texts under the model that may have written them: Fast-DetectGPT's sampling "
        "discrepancy (how much likelier the text is than the model's own samples, in standard "
        "deviations), its score per token (discrepancy / sqrt(tokens)), which gives the verdict, and "
        "GLTR's shares of tokens within the model's top 10/100/1000 choices. Top-k, top-p and "
        "low-temperature samples score high, people's text near 0; pure temperature-1 samples cannot be "
        "told apart. A verdict is statistical evidence, not proof: --calibrate measures its error rates "
        "on your kind of text.",
    )
    add_model_arguments(p)
    p.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text to judge; repeatable")
    p.add_argument("--file", action="append", default=[], type=Path, metavar="FILE",
                   help="a UTF-8 file to judge as one text ('-' for standard input); repeatable")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"score above which a text is called generated (default {DEFAULT_THRESHOLD}, or the "
                   "one --calibrate finds)")
    p.add_argument("--stride", type=int, help="for texts longer than the context window: tokens between "
                   "window starts (default half the window)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")
    cal = p.add_argument_group(
        "calibration", "Measure the detector on people's text: passages of it against the model's own "
        "continuations of their first tokens; then set the threshold so that at most "
        "--max-false-positive of the people's passages are called generated.")
    cal.add_argument("--calibrate", nargs="+", type=Path, metavar="FILE",
                     help="UTF-8 files of people's writing, of the kind you will judge")
    cal.add_argument("--passage-tokens", type=int, default=200, metavar="N",
                     help="tokens per passage (default 200; judge texts of about this length)")
    cal.add_argument("--passages", type=int, default=100, metavar="N",
                     help="passages to take, spread evenly over the files (default 100: enough to "
                     "measure a 1%% false-positive rate)")
    cal.add_argument("--prompt-tokens", type=int, default=20, metavar="N",
                     help="tokens of each passage the model continues from (default 20)")
    cal.add_argument("--max-false-positive", type=float, default=0.01, metavar="RATE",
                     help="the largest share of people's passages that may be called generated "
                     "(default 0.01)")
    add_sampling_arguments(cal, preset="paper", seed=0)  # how the model's passages are sampled
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    texts = [(repr(t[:20] + "…" if len(t) > 20 else t), t) for t in args.text]
    texts += [(str(f), read_text_file(f, "the text")) for f in args.file]
    if not texts and not args.calibrate:
        raise UserError("nothing to judge: give --text TEXT or --file FILE (or --calibrate FILE to measure)")
    model, tokenizer = load_model_and_tokenizer(args)
    detector = Detector(model, tokenizer, threshold=args.threshold, stride=args.stride)
    if args.calibrate:
        _print_calibration(args, _calibrate(args, detector))
    results = [(source, detector.detect(text)) for source, text in texts]
    if args.json:
        for source, d in results:
            print(json.dumps({"source": source, **d.to_dict()}))
    elif results:
        _print_table(results, detector.threshold)
    return 0


def _calibrate(args: argparse.Namespace, detector: Detector) -> Calibration:
    ids = [t for f in args.calibrate for t in detector.tokenizer.encode(read_text_file(f, "the text"))]
    passages = split_passages(ids, args.passage_tokens, args.passages)
    if len(passages) * args.max_false_positive < 1:
        print(f"note: {len(passages)} passages cannot measure a false-positive rate of "
              f"{args.max_false_positive:.1%} (one passage is {1 / len(passages):.1%}); give more text "
              "for a threshold you can trust", file=sys.stderr)
    return detector.calibrate(passages, prompt_tokens=args.prompt_tokens,
                              max_false_positive=args.max_false_positive, sampling=sampling_config(args))


def _print_calibration(args: argparse.Namespace, c: Calibration) -> None:
    if args.json:
        fields = {k: v for k, v in vars(c).items() if k not in ("human", "machine")}
        print(json.dumps({"calibration": fields, "human_scores": [d.score for d in c.human],
                          "machine_scores": [d.score for d in c.machine]}))
        return
    sampling = ", ".join(f"{k} {v}" for k, v in (("temperature", args.temperature), ("top_k", args.top_k),
                                                 ("top_p", args.top_p)) if v is not None)
    print(f"calibrated on {len(c.human)} passages of {args.passage_tokens} tokens of people's text against "
          f"the model's continuations of their first {args.prompt_tokens} tokens (preset {args.preset}"
          f"{', ' + sampling if sampling else ''})")
    print(f"threshold {c.threshold:.4f}: people's passages called generated {c.false_positive_rate:.1%} "
          f"(at most {c.max_false_positive:.1%} asked), the model's passages detected "
          f"{c.true_positive_rate:.1%}")
    print("AUROC (1 = perfect, 0.5 = chance): " + ", ".join(f"{k} {v:.3f}" for k, v in c.auroc.items()))


def _print_table(results: list[tuple[str, Detection]], threshold: float) -> None:
    width = max(12, *(len(source) for source, _ in results))
    print(f"{'source':<{width}} {'tokens':>7} {'score':>7}  {'verdict':<10} {'discrepancy':>11} "
          f"{'perplexity':>10} {'top-10':>7} {'top-100':>7} {'top-1000':>8}")
    for source, d in results:
        print(f"{source:<{width}} {d.tokens:>7} {d.score:>7.3f}  {d.verdict:<10} {d.discrepancy:>11.2f} "
              f"{d.perplexity:>10.1f} {d.top_10:>7.2f} {d.top_100:>7.2f} {d.top_1000:>8.2f}")
    print(f"verdict: generated when the score is above {threshold:.4f}, none under {MIN_TOKENS} tokens; "
          "statistical evidence, not proof")
