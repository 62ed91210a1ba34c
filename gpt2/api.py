"""``GPT2``: the network plus what users do with it (load, save, generate), in one class.

The layers below stay independent of each other: ``gpt2.model`` is the bare network and
``gpt2.checkpoints`` converts to and from Hugging Face's format; this module puts them together.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from gpt2 import checkpoints, sampling
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

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        *,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        pad_token_id: int | None = None,
        stream: bool = False,
        **settings: object,
    ) -> Tensor | Iterator[tuple[Tensor, Tensor]]:
        """Continue the prompts ``input_ids`` (B, T) (or (T,)): a LongTensor (B * num_samples, T + new).

        ``temperature`` 0 is greedy decoding. Prompts of different lengths go left-padded, with
        ``attention_mask`` (1 = token, 0 = padding). Rows that stop early are filled with
        ``pad_token_id`` (default: the tokenizer's ``<|endoftext|>``, else 0). Further ``settings``
        (``repetition_penalty``, ``frequency_penalty``, ``presence_penalty``, ``logit_bias``,
        ``stop_token_ids``, ``stop_strings``, ``num_samples``, ``seed``, ``truncate``, ``at_window``) are
        described in ``gpt2.sampling.GenerationConfig``. ``stream=True`` returns an iterator of
        ``(tokens, live)`` per step instead (see ``gpt2.sampling.stream_tokens``). The options that
        trade exactness or start-up time for speed (bf16, int8, compile) are in
        ``gpt2.sampling.prepare_for_inference``.
        """
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        tok = self.tokenizer
        if pad_token_id is None:
            pad_token_id = tok.eot_token if tok is not None else 0
        options = dict(
            generator=generator,
            decode_bytes=tok.decode_bytes if tok is not None else None,
            pad_token_id=pad_token_id,
        )
        settings.update(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        if stream:
            config = sampling.GenerationConfig(**settings)
            return sampling.stream_tokens(self, input_ids, attention_mask, config=config, **options)
        return sampling.generate(self, input_ids, attention_mask, **options, **settings)
