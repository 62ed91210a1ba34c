"""``gpt2 export``: write a model in another engine's format (GGUF, for llama.cpp)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2.cli.options import MODEL_HELP, TOKENIZER_HELP
from gpt2.inference.export import FORMATS, GGUF_TYPES
from gpt2.util.atomic import check_apart
from gpt2.util.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        description="Write a model as one file that another engine runs: GGUF for llama.cpp (and "
        "llama-cpp-python, ollama, LM Studio), with its vocabulary, named and laid out as llama.cpp's own "
        "convert_hf_to_gguf.py writes a Hugging Face GPT-2. Example: gpt2 export --format gguf --model gpt2 "
        "--out gpt2.gguf --type q8_0, then llama-cli -m gpt2.gguf.",
    )
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help="the file format: " + "; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    p.add_argument("--model", required=True, metavar="M", help=MODEL_HELP)
    p.add_argument("--tokenizer", type=Path, metavar="PATH",
                   help=f"{TOKENIZER_HELP}; by default the one saved with the model (the file holds the "
                   "vocabulary, so one is needed)")
    p.add_argument("--out", required=True, type=Path, metavar="FILE",
                   help="the file to write, such as model.gguf (it appears complete or not at all)")
    types = "; ".join(f"{k}: {v.description}" for k, v in GGUF_TYPES.items())
    p.add_argument("--type", default="f32", metavar="TYPE",
                   help=(f"how the weight matrices are stored: {types}. LayerNorms, biases and the position "
                         "embedding stay f32, as llama.cpp's converter keeps them (default f32)"
                         ).replace("%", "%%"))
    p.add_argument("--overwrite", action="store_true", help="replace --out if that file exists")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gpt2.inference.export import check_output, check_type, import_gguf, write_gguf

    if args.format not in FORMATS:
        raise UserError(f"unknown --format {args.format!r}; choose one of: {', '.join(FORMATS)}")
    check_type(args.type)
    check_apart(args.out, {"--model": args.model, "--tokenizer": args.tokenizer})
    check_output(args.out, overwrite=args.overwrite)  # before the model is loaded
    import_gguf()

    from gpt2.api import GPT2  # torch: only when the verb runs
    from gpt2.tokenizer.bpe import Tokenizer

    model = GPT2.from_pretrained(args.model)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else model.tokenizer
    name = Path(str(args.model)).name or str(args.model)
    write_gguf(model, args.out, tokenizer=tokenizer, type=args.type, name=name, overwrite=args.overwrite)
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {args.model} as GGUF {args.type} ({size / 2**20:,.1f} MiB, "
          f"{model.num_parameters():,} parameters) for llama.cpp")
    return 0
