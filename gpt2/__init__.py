"""gpt2: GPT-2 (Radford et al. 2019) in PyTorch: model, tokenizer, training, generation,
evaluation and serving.

``from gpt2 import GPT2, GPT2Config, Tokenizer``. The names are imported when first used, so that
the command line (``gpt2 --help``) starts without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gpt2.config import PRESETS, GPT2Config
from gpt2.util.errors import UserError

if TYPE_CHECKING:
    from gpt2.api import GPT2
    from gpt2.tokenizer.bpe import Tokenizer

_LAZY = {"GPT2": "gpt2.api", "Tokenizer": "gpt2.tokenizer.bpe"}

__all__ = ["GPT2", "PRESETS", "GPT2Config", "Tokenizer", "UserError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpt2' has no attribute {name!r}")
