"""``gpt2 merge``: fold a LoRA adapter into its base model and write the result as a plain model."""

from __future__ import annotations

import argparse
import secrets
import shutil
from pathlib import Path

from gpt2.cli.options import ADAPTER_HELP, MODEL_HELP
from gpt2.errors import UserError


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
    from gpt2 import checkpoints
    from gpt2.atomic import replace_dir
    from gpt2.inference import load_merged  # torch: only when the verb runs

    out: Path = args.out
    if out.is_file():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise UserError(f"{out} already exists and is not empty; choose another --out or add --overwrite")
        if not (out / checkpoints.CONFIG).is_file():
            raise UserError(f"{out} is not empty and holds no model; --overwrite replaces only a model")
    model = load_merged(args.model, args.adapter)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        model.save_pretrained(tmp)
        replace_dir(tmp, out)
    except checkpoints.WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise UserError(f"cannot write {out} ({reason}); free space there or choose another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out}: the adapter {args.adapter} merged into its base ({model.num_parameters():,} "
          "parameters)")
    return 0
