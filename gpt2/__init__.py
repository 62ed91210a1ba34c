"""gpt2: GPT-2 (Radford et al. 2019) in PyTorch: model, tokenizer, training, generation,
evaluation and serving."""

from gpt2.api import GPT2
from gpt2.config import PRESETS, GPT2Config
from gpt2.errors import UserError
from gpt2.tokenizer import Tokenizer

__all__ = ["GPT2", "PRESETS", "GPT2Config", "Tokenizer", "UserError"]
__version__ = "0.1.0"
