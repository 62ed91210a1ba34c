"""``GPT2``: the network plus what users do with it (load, save, generate, hook), in one class.

The layers below stay independent of each other: ``gpt2.model`` is the bare network and
``gpt2.checkpoints`` converts to and from Hugging Face's format; this module puts them together.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gpt2 import checkpoints
from gpt2.config import GPT2Config
from gpt2.generation import sampling
from gpt2.generation.sampling import GenerationConfig
from gpt2.generation.speculative import Drafter
from gpt2.model import Transformer
from gpt2.tokenizer.bpe import Tokenizer

if TYPE_CHECKING:  # imported when first used: generating never loads gpt2.interpretability
    from gpt2.interpretability.cache import ActivationCache
    from gpt2.interpretability.hooks import Hooks, NameFilter


class GPT2(Transformer):
    """A GPT-2 language model (``torch.nn.Module``) and its tokenizer, which travel together: call it
    on token ids (B, T) for logits; ``tokenizer`` (None when there is none) turns text into those ids
    and generated ids back into text, and is saved with the model.

    ``cache_dtype``: as ``Transformer``'s (chosen by ``gpt2.inference.load`` for quantised models).
    """

    def __init__(self, config: GPT2Config, *, tokenizer: Tokenizer | None = None,
                 cache_dtype: torch.dtype | None = None) -> None:
        super().__init__(config, cache_dtype=cache_dtype)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> GPT2:
        """Load a Hugging Face-format directory (config.json + model.safetensors or
        pytorch_model.bin, tokenizer files optional), or download a hub model such as ``gpt2``, with
        the tokenizer saved beside it, or ``tokenizer`` when given."""
        directory = checkpoints.resolve(name_or_path)
        tokenizer = tokenizer or checkpoints.read_tokenizer(directory)
        return checkpoints.load_model(directory, cls, device=device, dtype=dtype, tokenizer=tokenizer)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors (and the tokenizer, if attached) that both this
        package and ``transformers.GPT2LMHeadModel.from_pretrained`` load."""
        checkpoints.save_model(self, directory, tokenizer=self.tokenizer)

    def generate(
        self,
        input_ids: Tensor,
        config: GenerationConfig | None = None,
        *,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        pad_token_id: int | None = None,
        draft: Drafter | None = None,
        **settings: Any,
    ) -> Tensor:
        """Continue the prompts ``input_ids`` (B, T) (or (T,)): a LongTensor (B * num_samples, T + new).

        ``config`` says what to generate and how (``gpt2.generation.sampling.GenerationConfig``); ``settings``
        are its fields given by keyword instead (``max_new_tokens=50, temperature=0.8, top_k=40,
        seed=0``...), applied on top of ``config``. ``temperature`` 0 is greedy decoding. Prompts of
        different lengths go left-padded, with ``attention_mask`` (1 = token, 0 = padding). Rows that
        stop early are filled with ``pad_token_id`` (default: the tokenizer's ``<|endoftext|>``, else
        0). The model itself is left as it is; the options that trade exactness or start-up time for
        speed (bf16, int8, compile) are chosen when loading it (``gpt2.inference.load.load_for_inference``).
        ``draft``: decode speculatively with its drafts (``PromptLookup()``, ``DraftModel(smaller)`` of
        ``gpt2.generation.speculative``): the same greedy tokens and sampling distribution, faster
        where the drafts are right.
        """
        ids, options = self._generation_inputs(input_ids, pad_token_id)
        return sampling.generate(self, ids, _config(config, settings), attention_mask=attention_mask,
                                 generator=generator, draft=draft, **options)

    def stream(
        self,
        input_ids: Tensor,
        config: GenerationConfig | None = None,
        *,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        pad_token_id: int | None = None,
        draft: Drafter | None = None,
        **settings: Any,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``generate`` step by step: yields ``(tokens, live)`` per step, each (B * num_samples,);
        ``live`` is False for the rows that have stopped (see ``gpt2.generation.sampling.stream_tokens``)."""
        ids, options = self._generation_inputs(input_ids, pad_token_id)
        return sampling.stream_tokens(self, ids, _config(config, settings), attention_mask=attention_mask,
                                      generator=generator, draft=draft, **options)

    def run_with_cache(self, input_ids: Tensor, *, names_filter: NameFilter = None,
                       fwd_hooks: Hooks = ()) -> tuple[Tensor, ActivationCache]:
        """``(logits, cache)`` for token ids ``input_ids`` (B, T) or (T,), rows of one length without
        padding, as TransformerLens's ``run_with_cache``: ``cache[name]`` is the activation at hook
        point ``name`` (TransformerLens's names and shapes: ``blocks.0.attn.hook_pattern`` is
        (B, head, query, key)), or by shorthand, ``cache["pattern", 0]``. ``names_filter``: the
        points to keep (a name, a list, a function of a name; all by default). ``fwd_hooks``: as
        ``run_with_hooks``', run before caching. See ``gpt2.interpretability.hooks``."""
        from gpt2.interpretability import hooks

        return hooks.run_with_cache(self, input_ids, names_filter=names_filter, fwd_hooks=fwd_hooks)

    def run_with_hooks(self, input_ids: Tensor, *, fwd_hooks: Hooks = (), bwd_hooks: Hooks = ()) -> Tensor:
        """Logits (B, T, vocab) for ``input_ids`` with hooks, as TransformerLens's ``run_with_hooks``:
        ``fwd_hooks`` and ``bwd_hooks`` are pairs ``(name, fn)`` (``name`` a hook point's, or a
        function choosing points by name). ``fn(activation, hook)`` may return a replacement of the
        same shape (patching, ablation); ``fn(grad, hook)`` receives the gradient with respect to the
        activation when the logits' graph is differentiated (``loss.backward()``)."""
        from gpt2.interpretability import hooks

        return hooks.run_with_hooks(self, input_ids, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks)

    def processed(self, *, fold_ln: bool = True, center_writing_weights: bool = True,
                  center_unembed: bool = True, fold_value_biases: bool = True) -> GPT2:
        """A new model with this one's weights processed as TransformerLens's ``from_pretrained``
        processes them (its flags and defaults): LayerNorms folded into the layers that read them,
        writing weights and the unembedding centred, value biases folded. Its logits are this model's
        less each position's mean over the vocabulary (``center_unembed``); it is for reading, and is
        not saved. See ``gpt2.interpretability.processing``."""
        from gpt2.interpretability import processing

        with torch.device("meta"):
            empty = GPT2(self.config, tokenizer=self.tokenizer)
        return processing.processed(self, empty, fold_ln=fold_ln, center_unembed=center_unembed,
                                    center_writing_weights=center_writing_weights,
                                    fold_value_biases=fold_value_biases)

    def _generation_inputs(
        self, input_ids: Tensor, pad_token_id: int | None
    ) -> tuple[Tensor, dict[str, Any]]:
        tok = self.tokenizer
        if pad_token_id is None:
            pad_token_id = tok.eot_token if tok is not None else 0
        decode_bytes = tok.decode_bytes if tok is not None else None
        ids = input_ids[None] if input_ids.ndim == 1 else input_ids
        return ids, {"decode_bytes": decode_bytes, "pad_token_id": pad_token_id}


def _config(config: GenerationConfig | None, settings: dict[str, Any]) -> GenerationConfig:
    config = config or GenerationConfig()
    return config.replace(**settings) if settings else config
