"""``gpt2 info``: what a checkpoint or preset holds."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from gpt2.config import PRESETS, GPT2Config
from gpt2.util.errors import UserError

if TYPE_CHECKING:
    from gpt2.api import GPT2


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        description="Print a model's config, parameter count, dtype, size in memory and tokenizer, and "
                    "whether this machine decodes with the hand-written CPU kernels (and if not, why).",
    )
    p.add_argument("model", nargs="?", help="a Hugging Face-format directory, a training run, or a hub name")
    p.add_argument("--preset", choices=list(PRESETS), help="describe a preset instead of a saved model")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch  # only when the verb runs

    from gpt2.api import GPT2

    if (args.model is None) == (args.preset is None):
        raise UserError("give either MODEL or --preset NAME")
    if args.preset:
        with torch.device("meta"):  # no memory needed, even for gpt2-xl
            model = GPT2(GPT2Config.from_preset(args.preset))
        name = f"preset {args.preset} (random weights)"
    else:
        model = GPT2.from_pretrained(args.model)
        name = str(args.model)
    print(describe(model, name))
    return 0


def describe(model: GPT2, name: str) -> str:
    """A few aligned lines: config, parameters, dtype, size, tokenizer; then whether the CPU kernels are in
    use here and if not why (a CPU load is slower without them, and nothing else would say so)."""
    from gpt2.inference import ops

    c = model.config
    dtype = next(model.parameters()).dtype
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    tok = model.tokenizer
    rows = [
        ("model", name),
        ("layers", f"{c.n_layer}  heads {c.n_head}  d_model {c.n_embd}"),
        ("context", f"{c.n_positions}  vocabulary {c.vocab_size}  dropout {c.dropout}"),
        ("parameters", f"{model.num_parameters():,} ({model.num_parameters(exclude_embeddings=True):,} "
                       "without embeddings)"),
        ("dtype", str(dtype).removeprefix("torch.")),
        ("size", f"{size / 2**20:,.1f} MiB"),
        ("tokenizer", f"{tok.n_vocab} tokens, <|endoftext|> = {tok.eot_token}" if tok else "none"),
        ("kernels", ops.summary()),
    ]
    return "\n".join(f"{k:<11} {v}" for k, v in rows)
