"""Shared prefixes: the keys and values of prompts read recently, kept for later prompts that start
with the same tokens (a chat's system prompt, few-shot examples, a document asked several questions).

Prompts are cut into blocks of ``BLOCK`` positions, as vLLM's automatic prefix caching does; a block
is known by the whole prompt up to its end, so a block is reused only after the same tokens at the
same positions, and prompts that share a start share its blocks. The blocks live in one pool
allocated up front (``max_tokens`` positions, the memory budget); when it is full the least recently
used block goes. A prompt that is looked up or kept marks its blocks used first to last, so its first
block is the most recent and a block is never evicted before the blocks that continue it.

Keys and values depend only on the tokens up to their position (the position ids of the prompt's
tokens start at 0 wherever its row is padded), so a prompt read after a cached start gets the same
keys, values and logits as one read whole, up to the rounding of the other chunk boundaries.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from gpt2.config import GPT2Config
from gpt2.kv_cache import KVCache
from gpt2.serving.batch_cache import BatchCache

BLOCK = 16  # positions per block

_Key = tuple[int, ...]  # a block: the prompt's tokens up to its end


class PrefixCache:
    """Blocks of keys and values of recent prompts in a pool of ``max_tokens // BLOCK`` blocks.

    ``match`` finds the cached start of a prompt and ``store`` keeps a prompt read into a
    ``KVCache``.
    """

    def __init__(self, config: GPT2Config, max_tokens: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        blocks = max_tokens // BLOCK
        KVCache.check_fits(config, 1, blocks * BLOCK, dtype)
        self.max_tokens = blocks * BLOCK
        # blocks along the fourth axis: a run of them gathered is already laid out as ``BatchCache.read``'s
        self.pool = torch.zeros(config.n_layer, 2, config.n_head, blocks, BLOCK, config.head_dim,
                                device=device, dtype=dtype)
        self._index: OrderedDict[_Key, int] = OrderedDict()  # block -> its place in the pool; LRU first
        self._free = list(range(blocks))

    @property
    def tokens(self) -> int:
        """Positions held now."""
        return len(self._index) * BLOCK

    def holds(self, key: _Key) -> bool:
        """Whether the block that ends after the tokens ``key`` is kept."""
        return key in self._index

    def cached(self, prompt: list[int]) -> int:
        """How many positions of ``prompt`` ``match`` would find (without marking them used)."""
        return len(self._found(prompt)) * BLOCK

    def match(self, prompt: list[int]) -> Tensor | None:
        """The keys and values (layers, 2, heads, positions, head_dim) of the longest run of cached
        blocks that starts ``prompt`` and leaves at least its last token to read (its logits are
        needed), or None."""
        found = self._found(prompt)
        if not found:
            return None
        self._touch(found)
        places = torch.tensor([self._index[k] for k in found], device=self.pool.device)
        return self.pool[:, :, :, places].flatten(3, 4)

    def store(self, prompt: list[int], cache: BatchCache, row: int, start: int) -> None:
        """Keep the whole blocks of ``prompt``, read into ``cache``'s row ``row`` from position
        ``start``, that are not kept yet, evicting the least recently used blocks of other prompts."""
        keys = [tuple(prompt[:end]) for end in range(BLOCK, len(prompt) + 1, BLOCK)]
        own = set(keys)  # never evicted for the prompt's own other blocks
        new: list[int] = []  # which blocks of the prompt
        places: list[int] = []  # where they go in the pool
        for b, key in enumerate(keys):
            if key in self._index:
                continue
            place = self._free_place(protected=own)
            if place is None:  # the rest of the prompt is its own least recently used
                break
            self._index[key] = place
            new.append(b)
            places.append(place)
        if new:  # read the prompt's positions from its first new block to its last
            kv = cache.read(row, start + new[0] * BLOCK, start + (new[-1] + 1) * BLOCK)
            blocks = kv.unflatten(3, (new[-1] + 1 - new[0], BLOCK))
            device = self.pool.device
            offsets = torch.tensor(new, device=device) - new[0]
            self.pool[:, :, :, torch.tensor(places, device=device)] = blocks[:, :, :, offsets]
        self._touch([k for k in keys if k in self._index])

    def _found(self, prompt: list[int]) -> list[_Key]:
        """The longest run of cached blocks that starts ``prompt`` and leaves its last token out."""
        found = []
        for end in range(BLOCK, len(prompt), BLOCK):
            key = tuple(prompt[:end])
            if key not in self._index:
                break
            found.append(key)
        return found

    def _free_place(self, protected: set[_Key]) -> int | None:
        """A free block of the pool: an unused one, or the least recently used one not ``protected``."""
        if self._free:
            return self._free.pop()
        victim = next((k for k in self._index if k not in protected), None)
        return None if victim is None else self._index.pop(victim)

    def _touch(self, keys: list[_Key]) -> None:
        """Mark ``keys`` (a prompt's blocks, first to last) used now, the first as the most recent."""
        for key in reversed(keys):
            self._index.move_to_end(key)
