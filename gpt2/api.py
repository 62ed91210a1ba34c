"""``GPT2``: the network plus what users do with it (load, save), in one class.

The layers below stay independent of each other: ``gpt2.model`` is the bare network and
``gpt2.checkpoints`` converts to and from Hugging Face's format; this module puts them together.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2 import checkpoints
from gpt2.model import Transformer
from gpt2.tokenizer import Tokenizer


class GPT2(Transformer):
    """A GPT-2 language model (``torch.nn.Module``); call it on token ids (B, T) for logits.

    ``tokenizer`` is the tokenizer saved with the checkpoint, when there is one.
    """

    tokenizer: Tokenizer | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> GPT2:
        """Load a Hugging Face-format directory (config.json + model.safetensors or
        pytorch_model.bin, tokenizer files optional), or download a hub model such as ``gpt2``."""
        return checkpoints.load_model(name_or_path, cls, device=device, dtype=dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors (and the tokenizer, if attached) that both this
        package and ``transformers.GPT2LMHeadModel.from_pretrained`` load."""
        checkpoints.save_model(self, directory, tokenizer=self.tokenizer)
