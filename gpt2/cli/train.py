"""``gpt2 train``: train or fine-tune a GPT-2 on prepared shards (see gpt2.training.trainer).

The flags are ``TrainConfig``'s fields (gpt2.training.config), typed by ``field_types``; the trainer
(and torch) is imported only when the verb runs, so ``gpt2 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses

from gpt2.training.config import TrainConfig, field_types, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a model on shards made by `gpt2 prepare`",
        description="Train a GPT-2 from scratch (--preset) or fine-tune one (--init-from) on token "
        "shards. Options come from --config FILE (TOML or YAML, the same names with underscores) "
        "and the command line, which wins. Under `torchrun --nproc_per_node=N` it trains on N "
        "processes (DistributedDataParallel; gloo on CPUs, NCCL on GPUs; --fsdp shards the model over "
        "them instead, for models that do not fit one GPU).",
        epilog="Multi-node: torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 "
        "--rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m gpt2 train --config run.toml",
    )
    p.add_argument("--config", metavar="FILE", help="read options from a .toml, .yaml or .yml file")
    types = field_types(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.default is not None and not isinstance(f.default, bool):
            help_text += f" (default {f.default!r})"
        if bool in types[f.name]:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
        else:
            kind = next(t for t in types[f.name] if t is not type(None))  # int, float or str
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text,
                           metavar=f.name.split("_")[-1].upper())
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k not in ("config", "handler", "verb")}
    cfg = load_config(args.config, **options)  # checked before torch is imported: refused at once

    from gpt2.training.trainer import train  # torch and the trainer: only when training

    train(cfg)
    return 0
