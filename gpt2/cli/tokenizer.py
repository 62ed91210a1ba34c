"""``gpt2 tokenizer``: train a vocabulary, encode and decode. (Stub: being written.)"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser("tokenizer", help="train a BPE vocabulary; encode and decode text")
