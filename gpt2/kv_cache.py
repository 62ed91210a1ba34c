"""The KV cache: keys and values of the positions a decoder has read, so that each new token attends
over them without recomputing them.

``KVCache`` holds what every decoder needs: the network writes a chunk's keys and values, records
which positions are real tokens and advances; a decoder that slides its window empties it, and
speculative decoding rolls back the positions of the drafts it rejected. The
serving engine's operations on rows (moving, shifting, filling them from other caches) live with
the engine, in ``gpt2.serving.batch_cache``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpt2.config import GPT2Config
from gpt2.util.errors import UserError
from gpt2.util.memory import check_fits


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions.

    A batch of B sequences uses the cache's first B rows. ``length`` counts the positions written so
    far, ``slot`` holds it as a tensor (so that a decode step has the same shapes at every position,
    for ``torch.compile`` and CUDA graphs). ``key_mask`` (rows, max_len) marks which positions hold
    real tokens (False for padding) and ``next_position`` (rows,) is the position id the next real
    token of each row gets, so rows of different lengths can be decoded together. ``padded``: some
    padding was written, so attention needs the mask (a cache made with ``padded=True`` always uses
    it). ``attention_dtype``: the dtype attention runs in when the cache is held in a lower one (on
    the CPU: float32 over a bfloat16 cache, ``Transformer.attention_dtype``).
    """

    def __init__(
        self,
        config: GPT2Config,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        padded: bool = False,
        attention_dtype: torch.dtype | None = None,
    ) -> None:
        self.max_len = max_len or config.n_positions
        if self.max_len > config.n_positions:
            raise UserError(
                f"KV cache of {self.max_len} positions exceeds the context window "
                f"({config.n_positions}); ask for at most {config.n_positions}"
            )
        self.check_fits(config, batch_size, self.max_len, dtype, attention_dtype)
        shape = (batch_size, config.n_head, self.max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.attention_dtype = attention_dtype or dtype
        # A cache in a lower precision than attention is read into one layer's room of its dtype.
        self._scratch = None if self.attention_dtype == dtype else \
            torch.empty(2, *shape, device=device, dtype=self.attention_dtype).unbind()
        self.key_mask = torch.ones(batch_size, self.max_len, device=device, dtype=torch.bool)
        self.next_position = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.slot = torch.zeros(1, device=device, dtype=torch.long)
        self.length = 0
        self.always_padded = padded
        self.padded = padded

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @staticmethod
    def check_fits(config: GPT2Config, batch_size: int, max_len: int, dtype: torch.dtype,
                   attention_dtype: torch.dtype | None = None) -> None:
        """Refuse, with the estimate, a cache that would not fit in this machine's memory (its layers,
        and one layer's room in ``attention_dtype`` when that differs)."""
        layers = config.n_layer + (attention_dtype.itemsize / dtype.itemsize
                                   if attention_dtype not in (None, dtype) else 0)
        per_position = 2 * layers * config.n_embd * dtype.itemsize
        check_fits(int(batch_size * max_len * per_position),
                   f"a KV cache for {batch_size:,} sequences of {max_len:,} positions",
                   "ask for fewer sequences at once (samples, prompts or batch size)")

    def record(self, batch: int, length: int, real: Tensor | None) -> Tensor | None:
        """Note a chunk of ``length`` positions for the first ``batch`` rows before it is written:
        ``real`` (batch, length) marks its real tokens (None: all real). Returns which of the
        positions up to the chunk's end hold real tokens, or None while none is padding."""
        rows = slice(0, batch)
        if real is None and not self.padded:
            self.next_position[rows] += length
            return None
        if real is None:
            real = torch.ones(batch, length, dtype=torch.bool, device=self.key_mask.device)
        self.next_position[rows] += real.long().sum(dim=1)
        self.key_mask[rows, self.length : self.length + length] = real
        self.padded = self.padded or not bool(real.all())
        return self.key_mask[rows, : self.length + length]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write a chunk's keys and values (B, heads, T, head_dim) of ``layer`` at positions
        ``length`` to ``length + T``; returns the keys and values of every position up to there."""
        B, T, end = k.shape[0], k.shape[2], self.length + k.shape[2]
        keys, values = first_rows(self.keys[layer], B), first_rows(self.values[layer], B)
        keys.narrow(2, self.length, T).copy_(k)
        values.narrow(2, self.length, T).copy_(v)
        return self._for_attention(keys.narrow(2, 0, end), values.narrow(2, 0, end))

    def update_at_slot(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one position's keys and values (B, heads, 1, head_dim) of ``layer`` at ``slot``;
        returns the keys and values of all ``max_len`` positions (fixed shapes)."""
        B = k.shape[0]
        keys, values = first_rows(self.keys[layer], B), first_rows(self.values[layer], B)
        # (under autocast k and v may be in a lower precision than the cache)
        keys.index_copy_(2, self.slot, k.to(keys.dtype))
        values.index_copy_(2, self.slot, v.to(values.dtype))
        return self._for_attention(keys, values)

    def _for_attention(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """``keys`` and ``values`` (views of the cache) in ``attention_dtype``: themselves, or copied
        into one layer's room (a float32 copy per layer, rather than attention in bfloat16, which
        runs several times slower on CPUs without bfloat16 instructions)."""
        if self._scratch is None:
            return keys, values
        room = [first_rows(t, keys.shape[0]).narrow(2, 0, keys.shape[2]) for t in self._scratch]
        return room[0].copy_(keys), room[1].copy_(values)

    def step_mask(self, batch: int) -> Tensor:
        """The attention mask (batch, 1, 1, max_len) of a decode step at ``slot``: the real positions
        written so far and the step's own."""
        written = torch.arange(self.max_len, device=self.slot.device) <= self.slot
        return (first_rows(self.key_mask, batch) & written)[:, None, None, :]

    def step_positions(self, batch: int) -> Tensor:
        """The position ids (batch, 1) of a decode step's tokens; each row's next position moves on."""
        positions = first_rows(self.next_position, batch)
        positions += 1
        return positions[:, None] - 1

    def reset(self) -> None:
        """Empty the cache, as new."""
        self.key_mask.fill_(True)
        self.next_position.zero_()
        self.padded = self.always_padded
        self.length = 0
        self.slot.zero_()

    def rollback(self, length: int, batch: int) -> None:
        """Forget positions ``length`` onwards of the first ``batch`` rows, as if never written (the
        drafted tokens that speculative decoding's verification rejected): each row's next position
        goes back by the real tokens forgotten."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length} positions: {self.length} are written")
        rows, forgotten = slice(0, batch), slice(length, self.length)
        if self.padded:
            self.next_position[rows] -= self.key_mask[rows, forgotten].long().sum(dim=1)
        else:
            self.next_position[rows] -= self.length - length
        self.key_mask[rows, forgotten] = True
        self.length = length
        self.slot.fill_(length)

    def advance(self, n: int) -> None:
        """Count ``n`` more positions as written (both forward paths call this after a chunk)."""
        self.length += n
        self.slot.fill_(self.length)


def first_rows(t: Tensor, n: int) -> Tensor:
    """The first ``n`` rows of ``t``: ``t`` itself when it has no more (so that a compiled decode step
    writes into the cache's own tensors, not into views of them, which cost a copy per step)."""
    return t if n == t.shape[0] else t[:n]
