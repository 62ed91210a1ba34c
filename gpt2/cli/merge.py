"""``gpt2 merge``: fold a LoRA adapter into its base model and write the result as a plain model."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2.cli.options import ADAPTER_HELP, MODEL_HELP
from gpt2.util.atomic import check_apart
from gpt2.util.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        description="Fold a LoRA adapter (from `gpt2 train --lora-rank`, or peft's) into the weights of "
        "its base model and write an ordinary Hugging Face-format model (config.json + "
        "model.safetensors + tokenizer) that loads without the adapter, here and in transformers.",
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help=ADAPTER_HELP)
    p.add_argument("--model", metavar="M", help=f"the base model: {MODEL_HELP} (default: the one the "
                   "adapter's adapter_config.json names)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="directory to write the merged model into (it appears complete or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace the model already in --out")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    check_apart(out, {"--adapter": args.adapter, "--model": args.model})

    from gpt2 import checkpoints
    from gpt2.inference.load import load_merged  # torch: only when the verb runs
    from gpt2.util.atomic import building_dir

    if out.is_file():
        raise UserError(f"--out {out} is a file; give a directory")
    if args.overwrite and out.is_dir() and any(out.iterdir()) and not (out / checkpoints.CONFIG).is_file():
        raise UserError(f"{out} is not empty and holds no model; --overwrite replaces only a model")
    model = None
    try:
        with building_dir(out, overwrite=args.overwrite) as tmp:
            model = load_merged(args.model, args.adapter)
            model.save_pretrained(tmp)
    except checkpoints.WRITE_ERRORS as e:
        if model is None:  # loading failed, not writing
            raise
        raise UserError(f"cannot write {out} ({checkpoints.write_failure(e)}); free space there or choose "
                        "another --out") from None
    print(f"wrote {out}: the adapter {args.adapter} merged into its base ({model.num_parameters():,} "
          "parameters)")
    return 0
