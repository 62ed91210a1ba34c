"""``gpt2 inspect``: the analyses of ``gpt2.interpretability.analysis`` on a model and a prompt, printed
as plain tables, with ``--plot FILE.png|FILE.html`` for a heat map: ``lens`` (the logit lens),
``attribution`` (direct logit attribution per head and MLP), ``patch`` (activation patching between a
clean and a corrupted prompt), ``ablate`` (heads ablated), ``heads`` (previous-token, duplicate-token
and induction scores) and ``attention`` (a layer's patterns)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2.cli.options import add_model_arguments
from gpt2.interpretability.plots import Panel, check_plot_path
from gpt2.util.atomic import check_apart
from gpt2.util.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

    from gpt2.api import GPT2
    from gpt2.tokenizer.bpe import Tokenizer

DEFAULT_REPEAT = 20  # `inspect heads` without --prompt: this many random tokens, repeated
TOKEN_WIDTH = 12  # a token shown in a table is cut to this many characters


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        description="Look inside a model (TransformerLens's standard analyses on its hook points): print "
        "tables, and with --plot save a heat map as a PNG or a self-contained HTML page. The model runs "
        "at fp32 or bf16 (quantised layers have no activations of the network's own weights).",
    )
    analyses = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    lens = _analysis(analyses, "lens", "the logit lens: the likeliest next token read from every layer",
                     "The logit lens: the residual stream entering each block (and the model's output), "
                     "through the final LayerNorm and the unembedding; the table holds the likeliest next "
                     "token at each layer and position. The plot colours each cell by the probability that "
                     "layer gives the model's final prediction at that position.")
    _prompt(lens)
    attribution = _analysis(
        analyses, "attribution", "direct logit attribution of a token's logit to each head and MLP",
        "Direct logit attribution: what each head and each MLP adds to a token's logit (or to its "
        "difference from another token's, --wrong) at one position, through the final LayerNorm's scale "
        "as the run computed it. The parts, with the embeddings and the biases, sum to the logit.")
    _prompt(attribution)
    attribution.add_argument("--token", metavar="T", help="the token whose logit is explained, as text that "
                             "is one token (such as ' Mary', its leading space included; default: the "
                             "model's likeliest next token at --position)")
    attribution.add_argument("--wrong", metavar="W", help="explain the logit of --token minus that of this "
                             "token instead (text that is one token)")
    attribution.add_argument("--position", type=int, default=-1, metavar="P",
                             help="the prompt's position (0 is the first token; default -1, the last)")
    patch = _analysis(
        analyses, "patch", "activation patching from a clean prompt into a corrupted one",
        "Activation patching: run the corrupted prompt with one activation taken from the clean prompt's "
        "run (the residual stream entering a block at one position, or one head's output at every "
        "position) and measure logit(--answer) - logit(--wrong) at --position, as the share of the "
        "clean-corrupted difference it recovers (0: the corrupted run, 1: the clean run). The prompts "
        "have the same number of tokens.")
    patch.add_argument("--clean", required=True, metavar="TEXT", help="the prompt the activations come from")
    patch.add_argument("--corrupted", required=True, metavar="TEXT", help="the prompt they are patched into")
    patch.add_argument("--answer", required=True, metavar="A",
                       help="the clean prompt's answer, text that is one token (such as ' Mary')")
    patch.add_argument("--wrong", required=True, metavar="B",
                       help="the corrupted prompt's answer, text that is one token")
    patch.add_argument("--position", type=int, default=-1, metavar="P",
                       help="where the answer is predicted (default -1, the last position)")
    patch.add_argument("--by", choices=["residual", "heads"], default="residual",
                       help="residual: the residual stream by layer and position (blocks.L.hook_resid_pre); "
                       "heads: each head's output (attn.hook_z) by layer and head (default residual)")
    heads = _analysis(
        analyses, "heads", "previous-token, duplicate-token and induction scores of every head",
        "Head scores: the mean attention each head gives the previous token, earlier occurrences of the "
        "same token (duplicate-token) and the tokens after them (induction), on --prompt or on a random "
        f"segment of --repeat tokens after <|endoftext|>, repeated (default: --repeat {DEFAULT_REPEAT}).")
    source = heads.add_mutually_exclusive_group()
    source.add_argument("--prompt", metavar="TEXT", help="score the heads on this text")
    source.add_argument("--repeat", type=int, metavar="N",
                        help="score them on N random distinct tokens, repeated (2N + 1 tokens in all)")
    heads.add_argument("--seed", type=int, default=0, help="random seed of --repeat's tokens (default 0)")
    heads.add_argument("--top", type=int, default=5, metavar="K", help="list the K best heads of each score "
                       "(default 5)")
    attention = _analysis(analyses, "attention", "a layer's attention patterns",
                          "The attention patterns of one layer (or one head of it): each query's attention "
                          "on each key, in percent.")
    _prompt(attention)
    attention.add_argument("--layer", type=int, required=True, metavar="L",
                           help="the layer (0 is the first; -1 the last)")
    attention.add_argument("--head", type=int, metavar="H", help="only this head (default: every head)")
    ablate = _analysis(analyses, "ablate", "the loss and prediction with heads ablated",
                       "Head ablation: the prompt's next-token loss and the prediction after it, with the "
                       "heads given set to zero (or to their mean output over the prompt, --mean) at "
                       "attn.hook_z.", plot=False)
    _prompt(ablate)
    ablate.add_argument("--head", action="append", required=True, metavar="L.H",
                        help="a head to ablate, as LAYER.HEAD (such as 0.3); repeatable")
    ablate.add_argument("--mean", action="store_true",
                        help="replace each head's output by its mean over the prompt's positions, not 0")


def _analysis(analyses: argparse._SubParsersAction, name: str, help: str, description: str, *,
              plot: bool = True) -> argparse.ArgumentParser:
    p = analyses.add_parser(name, help=help, description=description)
    add_model_arguments(p, generates=False)
    (precision,) = [a for a in p._actions if "--precision" in a.option_strings]
    precision.help = ("fp32 (the weights as published; the default) or bf16; int8 and int4 are refused: "
                      "their quantised layers have no activations of the network's own weights")
    if plot:
        p.add_argument("--plot", type=Path, metavar="FILE",
                       help="also save a heat map: FILE.png (an image) or FILE.html (a self-contained page)")
    p.set_defaults(handler=run)
    return p


def _prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to run the model on")


def run(args: argparse.Namespace) -> int:
    plot = vars(args).get("plot")
    if plot is not None:
        check_plot_path(plot)
        check_apart(plot, {"--model": args.model, "--adapter": args.adapter, "--tokenizer": args.tokenizer},
                    "--plot")
    model, tokenizer = load_model(args)
    panels, title = ANALYSES[args.analysis](args, model, tokenizer)
    if plot is not None:
        from gpt2.interpretability.plots import save_heatmaps

        print(f"wrote {save_heatmaps(plot, panels, title)}")
    return 0


def load_model(args: argparse.Namespace) -> tuple[GPT2, Tokenizer]:
    """The model as its own float layers (fp32 or bf16, on --device; an adapter merged), which the hook
    points read, and the tokenizer (--tokenizer, else the model's)."""
    import torch

    from gpt2.api import GPT2
    from gpt2.checkpoints import find_adapter
    from gpt2.inference.load import check_device, default_device, load_merged
    from gpt2.tokenizer.bpe import Tokenizer

    if args.precision in ("int8", "int4"):
        raise UserError(f"--precision {args.precision} quantises the network's layers, whose activations are "
                        "then not those of its own weights; inspect a model at fp32 or bf16")
    if args.model is None and args.adapter is None:
        raise UserError("give --model M: a model directory, a training run or a hub name such as gpt2")
    device = check_device(args.device or default_device())
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if args.adapter is not None or find_adapter(args.model) is not None:
        model = load_merged(args.model, args.adapter, device=device).to(dtype=dtype)
    else:
        model = GPT2.from_pretrained(args.model, device=device, dtype=dtype)
    model.eval()
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else model.tokenizer
    if tokenizer is None:
        raise UserError(f"{args.model or args.adapter} has no tokenizer files; give one with --tokenizer")
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------
# The analyses: each prints its tables and returns its heat maps and their title

Result = tuple[list[Panel], str]


def run_lens(args: argparse.Namespace, model: GPT2, tokenizer: Tokenizer) -> Result:
    from gpt2.interpretability.analysis import logit_lens

    ids = encode(tokenizer, args.prompt, "--prompt")
    log_probs = logit_lens(model, ids)  # (layers + 1, T, vocab)
    top = log_probs.argmax(-1)
    final = top[-1]
    rows = [f"{layer}_pre" for layer in range(model.config.n_layer)] + ["final_post"]
    columns = [shown(tokenizer, t) for t in ids.tolist()]
    cells = [[shown(tokenizer, t) for t in row] for row in top.tolist()]
    print(f"logit lens: the likeliest next token read from the residual stream entering each layer "
          f"(L_pre) and the model's output (final_post), at each of the prompt's {len(columns)} positions")
    print_table(["layer", *columns], [[name, *row] for name, row in zip(rows, cells, strict=True)])
    chance = log_probs.gather(-1, final.expand(len(rows), -1)[..., None])[..., 0].exp()
    panel = Panel("probability of the final prediction (cells: each layer's likeliest token)",
                  chance.tolist(), rows, columns, labels=cells, xlabel="position", ylabel="layer")
    return [panel], "logit lens"


def run_attribution(args: argparse.Namespace, model: GPT2, tokenizer: Tokenizer) -> Result:
    import torch

    from gpt2.interpretability.analysis import direct_logit_attribution

    ids = encode(tokenizer, args.prompt, "--prompt")
    if not -len(ids) <= args.position < len(ids):
        raise UserError(f"--position {args.position} is outside the prompt's {len(ids)} tokens (0 to "
                        f"{len(ids) - 1}, or -1 for the last)")
    if args.token is not None:
        token = one_token(tokenizer, args.token, "--token")
    else:
        with torch.no_grad():
            token = int(model(ids[None].to(model.device))[0, args.position].argmax())
    wrong = one_token(tokenizer, args.wrong, "--wrong") if args.wrong is not None else None
    parts = direct_logit_attribution(model, ids, token, args.position, wrong=wrong)
    what = f"logit({shown(tokenizer, token)})" + (f" - logit({shown(tokenizer, wrong)})" if wrong is not None
                                                   else "")
    position = args.position % len(ids)
    print(f"direct logit attribution of {what} at position {position} (after "
          f"{shown(tokenizer, int(ids[position]))}): {parts.logit:.4f}")
    n_head = model.config.n_head
    values = torch.cat([parts.heads, parts.mlps[:, None]], 1)
    columns = [f"H{h}" for h in range(n_head)] + ["MLP"]
    print_table(["layer", *columns], [[str(layer), *(f"{v:.4f}" for v in row)]
                                      for layer, row in enumerate(values.tolist())])
    total = float(values.sum()) + parts.embed + parts.pos_embed + parts.biases
    print(f"embed {parts.embed:.4f}, pos_embed {parts.pos_embed:.4f}, biases {parts.biases:.4f}: all the "
          f"parts sum to {total:.4f}")
    named = {f"L{layer}" + (f"H{column}" if column < n_head else " MLP"): value
             for layer, row in enumerate(values.tolist()) for column, value in enumerate(row)}
    largest = sorted(named.items(), key=lambda item: -abs(item[1]))[:5]
    print("largest: " + ", ".join(f"{name} {value:+.4f}" for name, value in largest))
    panel = Panel(f"direct logit attribution of {what}", values.tolist(),
                  [str(i) for i in range(len(values))], columns, signed=True, xlabel="head", ylabel="layer")
    return [panel], "direct logit attribution"


def run_patch(args: argparse.Namespace, model: GPT2, tokenizer: Tokenizer) -> Result:
    import torch

    from gpt2.interpretability.analysis import logit_difference, patch_heads, patch_residual

    clean, corrupted = encode(tokenizer, args.clean, "--clean"), encode(tokenizer, args.corrupted,
                                                                        "--corrupted")
    answer, wrong = one_token(tokenizer, args.answer, "--answer"), one_token(tokenizer, args.wrong,
                                                                             "--wrong")
    if answer == wrong:
        raise UserError("--answer and --wrong are the same token; give the clean and the corrupted answers")
    if len(clean) == len(corrupted) and not -len(clean) <= args.position < len(clean):
        raise UserError(f"--position {args.position} is outside the prompts' {len(clean)} tokens (0 to "
                        f"{len(clean) - 1}, or -1 for the last)")
    metric = logit_difference(answer, wrong, args.position)
    patched = (patch_residual if args.by == "residual" else patch_heads)(model, clean, corrupted, metric)
    with torch.no_grad():
        scores = [float(metric(model(ids[None].to(model.device)))) for ids in (clean, corrupted)]
    what = f"logit({shown(tokenizer, answer)}) - logit({shown(tokenizer, wrong)})"
    print(f"activation patching: {what} is {scores[0]:.4f} on the clean prompt, {scores[1]:.4f} on the "
          "corrupted one; each cell is the share of that difference a patch recovers (0: corrupted, "
          "1: clean)")
    if args.by == "residual":
        print("patched: the residual stream entering each layer (blocks.L.hook_resid_pre) at one position")
        columns = [shown(tokenizer, a) if a == b else f"{shown(tokenizer, a)}/{shown(tokenizer, b)}"
                   for a, b in zip(clean.tolist(), corrupted.tolist(), strict=True)]
    else:
        print("patched: each head's output at every position (blocks.L.attn.hook_z)")
        columns = [f"H{h}" for h in range(model.config.n_head)]
    rows = [str(layer) for layer in range(model.config.n_layer)]
    print_table(["layer", *columns], [[name, *(f"{v:.3f}" for v in row)]
                                      for name, row in zip(rows, patched.tolist(), strict=True)])
    xlabel = "position (clean/corrupted token)" if args.by == "residual" else "head"
    panel = Panel(f"share of {what} recovered", patched.tolist(), rows, columns, signed=True, xlabel=xlabel,
                  ylabel="layer")
    return [panel], f"activation patching ({args.by})"


def run_heads(args: argparse.Namespace, model: GPT2, tokenizer: Tokenizer) -> Result:
    from gpt2.interpretability.analysis import head_scores

    ids, source = head_input(args, model, tokenizer)
    scores = head_scores(model, ids)
    print(f"head scores on {source}: the mean attention of each head's queries on the previous token, on "
          "earlier occurrences of their token (duplicate-token) and on the tokens after those (induction)")
    columns = [f"H{h}" for h in range(model.config.n_head)]
    rows = [str(layer) for layer in range(model.config.n_layer)]
    named = {"previous-token": scores.previous_token, "duplicate-token": scores.duplicate_token,
             "induction": scores.induction}
    for name, values in named.items():
        print()
        print_table([name, *columns], [[row, *("-" if math.isnan(v) else f"{v:.3f}" for v in line)]
                                       for row, line in zip(rows, values.tolist(), strict=True)])
    print()
    if scores.induction.isnan().all():
        print("note: no token of the prompt occurs twice, so it has no duplicate-token or induction scores; "
              "--repeat N measures them on a repeated random sequence")
    for name, values in named.items():
        if not values.isnan().all():
            flat = values.nan_to_num(-1.0).flatten()
            best = flat.argsort(descending=True)[: max(args.top, 0)].tolist()
            n_head = model.config.n_head
            print(f"top {name} heads: "
                  + ", ".join(f"L{i // n_head}H{i % n_head} {flat[i]:.3f}" for i in best))
    panels = [Panel(f"{name} score", values.tolist(), rows, columns, xlabel="head", ylabel="layer")
              for name, values in named.items()]
    return panels, "head scores"


def head_input(args: argparse.Namespace, model: GPT2, tokenizer: Tokenizer) -> tuple[Tensor, str]:
    """The tokens the heads are scored on (1, T), and how to say what they are."""
    from gpt2.interpretability.analysis import repeated_tokens

    if args.prompt is not None:
        ids = encode(tokenizer, args.prompt, "--prompt")
        if len(ids) < 2:
            raise UserError("--prompt is one token; head scores need at least 2")
        return ids[None], f"the prompt's {len(ids)} tokens"
    length = DEFAULT_REPEAT if args.repeat is None else args.repeat
    window = model.config.n_positions
    if length < 1 or 2 * length + 1 > window:
        raise UserError(f"--repeat {length}: give 1 to {(window - 1) // 2} tokens (twice that and "
                        f"<|endoftext|> fill at most the context window of {window})")
    vocab = min(tokenizer.n_vocab, model.config.vocab_size)
    bos = tokenizer.eot_token if tokenizer.eot_token < vocab else None
    ids = repeated_tokens(length, vocab, bos=bos, seed=args.seed)
    start = "<|endoftext|> and " if bos is not None else ""
    return ids, f"{start}{length} random tokens, repeated ({ids.shape[1]} tokens, seed {args.seed})"


def run_attention(args: argparse.Namespace, model: GPT2, tokenizer: Tokenizer) -> Result:
    from gpt2.interpretability.analysis import attention_patterns, check_head, check_layer

    ids = encode(tokenizer, args.prompt, "--prompt")
    layer = check_layer(model, args.layer)
    heads = range(model.config.n_head) if args.head is None else [check_head(model, args.head)]
    patterns = attention_patterns(model, ids, layer)
    tokens = [shown(tokenizer, t) for t in ids.tolist()]
    print(f"attention patterns of layer {layer}: each query's (row's) attention on each key (column), "
          "in percent")
    panels = []
    for head in heads:
        print()
        values = patterns[head]
        print_table([f"head {head}", *tokens], [[query, *(f"{100 * v:.0f}" for v in row[: i + 1])]
                                                for i, (query, row) in enumerate(zip(tokens, values.tolist(),
                                                                                     strict=True))])
        panels.append(Panel(f"layer {layer}, head {head}", values.tolist(), tokens, tokens, xlabel="key",
                            ylabel="query"))
    return panels, "attention patterns"


def run_ablate(args: argparse.Namespace, model: GPT2, tokenizer: Tokenizer) -> Result:
    from gpt2.interpretability.analysis import ablate_heads, check_head, check_layer

    ids = encode(tokenizer, args.prompt, "--prompt")
    heads = []
    for text in args.head:
        layer, dot, head = text.partition(".")
        if not dot or not layer.lstrip("-").isdigit() or not head.isdigit():
            raise UserError(f"--head {text!r}: give a head as LAYER.HEAD, such as 0.3")
        heads.append((check_layer(model, int(layer)), check_head(model, int(head))))
    kind = "mean" if args.mean else "zero"
    before, after = ablate_heads(model, ids, []), ablate_heads(model, ids, heads, kind)
    names = ", ".join(f"L{layer}H{head}" for layer, head in heads)
    print(f"heads ablated ({kind}): {names}")
    if before.loss is not None:
        print(f"next-token loss over the prompt: {before.loss:.4f} -> {after.loss:.4f} "
              f"({after.loss - before.loss:+.4f})")
    for label, run in (("before", before), ("after", after)):
        probs = run.logits[0, -1].float().softmax(-1)
        token = int(probs.argmax())
        print(f"likeliest token after the prompt, {label}: {shown(tokenizer, token)} ({probs[token]:.1%})")
    return [], "head ablation"


ANALYSES: dict[str, Callable[[argparse.Namespace, GPT2, Tokenizer], Result]] = {
    "lens": run_lens, "attribution": run_attribution, "patch": run_patch, "heads": run_heads,
    "attention": run_attention, "ablate": run_ablate,
}


# ----------------------------------------------------------------------------------------------------
# Text and tables


def encode(tokenizer: Tokenizer, text: str, option: str) -> Tensor:
    """``text``'s token ids (T,), refused in one line when there are none."""
    import torch

    ids = tokenizer.encode(text)
    if not ids:
        raise UserError(f"{option} is empty; give some text")
    return torch.tensor(ids)


def one_token(tokenizer: Tokenizer, text: str, option: str) -> int:
    """The id of ``text``, which must be exactly one token."""
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        pieces = " ".join(shown(tokenizer, t) for t in ids) or "none"
        raise UserError(f"{option} {text!r} is {len(ids)} tokens ({pieces}), not one; give text that is one "
                        "token (a word usually with its leading space, such as ' Mary')")
    return ids[0]


def shown(tokenizer: Tokenizer, token: int) -> str:
    """A token as a table shows it: its text quoted (escapes visible), cut to ``TOKEN_WIDTH``."""
    if token == tokenizer.eot_token:
        return "<|endoftext|>"
    if not 0 <= token < tokenizer.n_vocab:
        return f"<{token}>"  # a model's padded vocabulary
    text = repr(tokenizer.decode_bytes([token]).decode("utf-8", errors="replace"))
    return text if len(text) <= TOKEN_WIDTH else text[: TOKEN_WIDTH - 1] + "…"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns left-aligned, at least two spaces apart."""
    widths = [max(len(str(row[i])) if i < len(row) else 0 for row in [header, *rows])
              for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())
