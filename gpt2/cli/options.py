"""Options that several verbs share, declared once: which model and how to load it (``--model``,
``--adapter``, ``--tokenizer``, ``--precision``, ``--device``, ``--compile``), how to sample
(``--preset``, ``--temperature``...), speculative decoding (``--draft``, ``--draft-tokens``), and
reading text files. Free of torch at import: ``gpt2 VERB --help`` stays fast; the model is loaded
(``gpt2.inference.load``) only when a verb runs.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2.config import PRECISIONS
from gpt2.generation.config import (
    DEFAULT_DRAFT_TOKENS,
    MAX_DRAFT_TOKENS,
    SAMPLING_PRESETS,
    ContextWindowReached,
    GenerationConfig,
    check_draft_tokens,
)
from gpt2.util.errors import UserError

if TYPE_CHECKING:
    from gpt2.api import GPT2
    from gpt2.generation.speculative import Drafter
    from gpt2.tokenizer.bpe import Tokenizer

TOKENIZER_HELP = "a .tiktoken file, or a directory of tokenizer files (tokenizer.json, vocab.json + ...)"
MODEL_HELP = ("a Hugging Face-format model directory, a training run directory (its 'latest' checkpoint), "
              "or a hub name such as gpt2")
ADAPTER_HELP = ("a LoRA adapter to run on the model: a directory of adapter_config.json + "
                "adapter_model.safetensors (peft's format, as `gpt2 train --lora-rank` and peft write them) "
                "or a LoRA training run; it is folded into the weights once, at load time. Without --model, "
                "the base model its adapter_config.json names is used")


# ----------------------------------------------------------------------------------------------------
# The model


def add_model_arguments(p: argparse.ArgumentParser, *, generates: bool = True) -> None:
    """--model, --adapter, --tokenizer, --precision, --device and (for verbs that generate) --compile."""
    p.add_argument("--model", metavar="M", help=MODEL_HELP + " (a LoRA run or adapter: its base with it)")
    p.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)
    p.add_argument("--tokenizer", type=Path, metavar="PATH",
                   help=f"{TOKENIZER_HELP}; by default the one saved with the model")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="weights and computation: " + "; ".join(f"{k}: {v}" for k, v in PRECISIONS.items())
                   + " (default fp32)")
    p.add_argument("--device",
                   help="where to run: cpu, cuda, cuda:1... (default: cuda when available, else cpu)")
    if generates:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step first (a minute or two of compiling, fp32's "
                       "products autotuned): faster afterwards on a GPU; on a CPU with AVX-512 eager "
                       "decoding on the hand-written kernels is faster (see the docs' benchmarks page) "
                       "and holds less memory")


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[GPT2, Tokenizer]:
    """The model, loaded for inference as the options say, and its tokenizer (--tokenizer, else the
    model's own, or the adapter's). Without --model, ``args.model`` becomes the adapter's name."""
    from gpt2.inference.load import load_for_inference
    from gpt2.tokenizer.bpe import Tokenizer

    if args.model is None and args.adapter is None:
        raise UserError("give --model M: a model directory, a training run or a hub name such as gpt2 "
                        "(or --adapter DIR, a LoRA adapter whose adapter_config.json names its base)")
    model = load_for_inference(args.model, adapter=args.adapter, precision=args.precision,
                               device=args.device, compile=vars(args).get("compile", False))
    args.model = args.model or args.adapter  # the name that verbs show (serve, eval)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else model.tokenizer
    if tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer files; give one with --tokenizer PATH")
    if tokenizer.n_vocab > model.config.vocab_size:
        raise UserError(f"the model's vocabulary ({model.config.vocab_size} ids) is smaller than the "
                        f"tokenizer's ({tokenizer.n_vocab} ids, {tokenizer.source}); give the tokenizer "
                        "the model was trained with")
    return model, tokenizer


def add_draft_arguments(p: argparse.ArgumentParser, *, server: bool = False) -> None:
    """--draft and --draft-tokens (speculative decoding), and -v for the verbs that generate once
    (``server``: the wording of ``gpt2 serve``, whose requests may ask for fewer drafted tokens)."""
    p.add_argument("--draft", metavar="lookup|DIR",
                   help="decode speculatively: a few tokens are drafted and the model verifies them in one "
                   "forward pass, keeping those it would have chosen itself, so greedy text is the same and "
                   "sampled text the same distribution, sooner where drafts are right. 'lookup' drafts the "
                   "tokens that followed the latest earlier occurrence of the text's last few tokens (pays "
                   "where the output repeats the input: summaries, edits, code, quotes); DIR is a smaller "
                   "model with the same tokenizer (see gpt2 train --distill-from), loaded like --model "
                   "(same --precision and --device)" + (". A request's draft_tokens asks for fewer drafted "
                   "tokens, 0 for none" if server else ""))
    p.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS, metavar="K",
                   help="with --draft, at most K drafted tokens verified per forward pass"
                   + " and sequence" * server + f" (default {DEFAULT_DRAFT_TOKENS}: with the token before "
                   "them, the rows the CPU kernels multiply in one read of the weights; 1 to "
                   f"{MAX_DRAFT_TOKENS})")
    if not server:
        p.add_argument("-v", "--verbose", action="store_true",
                       help="with --draft, print to standard error how many drafted tokens were accepted")


def check_draft_options(args: argparse.Namespace) -> None:
    """Refuse, in one line, --draft-tokens without --draft or out of its range (before anything loads)."""
    if args.draft is None and args.draft_tokens != DEFAULT_DRAFT_TOKENS:
        raise UserError("--draft-tokens needs --draft lookup or --draft DIR")
    check_draft_tokens(args.draft_tokens)


def load_draft(args: argparse.Namespace, model: GPT2) -> Drafter | None:
    """The drafter --draft names for ``model`` (a draft model loaded as --precision and --device say),
    or None; refused in one line where it cannot draft for it, a warning where it will be slower."""
    from gpt2.generation.speculative import DraftModel, PromptLookup
    from gpt2.inference.load import load_for_inference

    check_draft_options(args)
    if args.draft is None:
        return None
    if args.draft == "lookup":
        return PromptLookup(tokens=args.draft_tokens)
    small = load_for_inference(args.draft, precision=args.precision, device=args.device)
    draft = DraftModel(small, tokens=args.draft_tokens)
    draft.check(model)
    if small.num_parameters() >= model.num_parameters():
        print(f"warning: the draft model ({small.num_parameters():,} parameters) is not smaller than the "
              f"model ({model.num_parameters():,}): speculative decoding will be slower than plain decoding",
              file=sys.stderr)
    return draft


def report_drafts(args: argparse.Namespace, draft: Drafter | None) -> None:
    """With -v, how speculative decoding went, on standard error."""
    if draft is None or not args.verbose:
        return
    stats = draft.stats
    rate = f" ({stats.acceptance:.0%})" if stats.acceptance is not None else ""
    print(f"speculative decoding ({draft.name}): {stats.accepted:,} of {stats.drafted:,} drafted tokens "
          f"accepted{rate} in {stats.rounds:,} verifications", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# Sampling


def add_sampling_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, preset: str,
                           seed: int | None = None) -> None:
    """How each token is drawn; anything not given comes from --preset (``seed``: the default seed)."""
    presets = "; ".join(
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in settings.items())
        for name, settings in SAMPLING_PRESETS.items()
    )
    p.add_argument("--preset", choices=list(SAMPLING_PRESETS), default=preset,
                   help=f"named sampling settings that the options below override (default {preset}; "
                   f"{presets})")
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
    default = f" (default {seed})" if seed is not None else ""
    p.add_argument("--seed", type=int, default=seed, help=f"random seed, for reproducible samples{default}")


def add_length_arguments(p: argparse.ArgumentParser) -> None:
    """When generation stops: --max-new-tokens, --stop, --truncate, --at-window."""
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"how many tokens to generate at most (default {GenerationConfig.max_new_tokens})")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when the text contains TEXT (not printed); repeatable; escapes such as "
                   "\\n work")
    p.add_argument("--truncate", action="store_true",
                   help="drop the start of a prompt too long for the context window (leaving room for "
                   "the new tokens) instead of refusing it")
    p.add_argument("--at-window", choices=["error", "stop", "slide"], default="error",
                   help="when prompt + new tokens pass the context window: refuse (error, the default), stop "
                   "there (stop), or keep the last half of the window and go on (slide)")


def sampling_config(args: argparse.Namespace, **extra: object) -> GenerationConfig:
    """The ``GenerationConfig`` that the sampling (and length) options ask for, validated here, once."""
    given = vars(args)
    stops = tuple(_unescape(s) for s in given.get("stop") or ())
    return GenerationConfig.from_preset(
        args.preset, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, seed=args.seed, max_new_tokens=given.get("max_new_tokens"),
        stop_strings=stops or None, truncate=given.get("truncate"), at_window=given.get("at_window"),
        **extra,
    )


def _unescape(text: str) -> str:
    """Turn backslash escapes typed on a command line (\\n, \\t, \\u00e9) into the characters."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def report_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print a stop at the context window as one ``note:`` line; other warnings as usual."""
    for w in caught:
        if issubclass(w.category, ContextWindowReached):
            print(f"note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


# ----------------------------------------------------------------------------------------------------
# Text files


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` ('-' for standard input), or a one-line error naming ``what``."""
    try:
        if str(path) == "-":
            return decode_utf8(sys.stdin.buffer.read(), "standard input")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} ({e})") from None


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text; invalid bytes are refused in one line naming ``source`` (the same rule
    for files, standard input and arguments: nothing is silently replaced)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not valid UTF-8 ({e.reason} at byte {e.start}); give text in "
                        "UTF-8") from None
