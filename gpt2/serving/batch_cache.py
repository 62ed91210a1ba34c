"""The KV cache of the serving engine's batch: a ``KVCache`` plus the operations that continuous
batching, prefix caching and speculative decoding need on its rows (filling rows from another cache,
reading and restoring stored prefixes, moving and shifting rows, forgetting a row's rejected drafts,
which leaves holes in it, and compacting rows)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gpt2.kv_cache import KVCache


class BatchCache(KVCache):
    """A ``KVCache`` whose rows the engine manages: it keeps its live sequences in the first rows,
    fills freed rows with new ones and aligns them all at the end of the written positions. Padding
    (``key_mask`` False) may also lie between and after a row's real positions: the drafts that
    speculative decoding rejected (``forget_last``) until ``compact`` or ``align`` closes the holes."""

    def insert(self, other: KVCache, source: Tensor, first_row: int) -> None:
        """Copy rows ``source`` of ``other`` (prompts read together) into the rows from ``first_row``
        on, so that they end at this cache's ``length`` (at least ``other.length``); the positions
        before them become padding."""
        rows = slice(first_row, first_row + len(source))
        start, end = self.length - other.length, self.length
        for mine, theirs in zip((*self.keys, *self.values), (*other.keys, *other.values), strict=True):
            mine[rows, :, start:end] = theirs[source, :, : other.length]
        self.key_mask[rows, :start] = False
        self.key_mask[rows, start:end] = other.key_mask[source, : other.length]
        self.next_position[rows] = other.next_position[source]

    def read(self, row: int, start: int, end: int) -> Tensor:
        """A copy of row ``row``'s keys and values at positions ``start`` to ``end``, every layer's:
        (layers, 2, heads, end - start, head_dim), as ``restore`` takes them."""
        k0 = self.keys[0]
        out = k0.new_empty(len(self.keys), 2, k0.shape[1], end - start, k0.shape[3])
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            out[layer, 0] = k[row, :, start:end]
            out[layer, 1] = v[row, :, start:end]
        return out

    def restore(self, length: int, real: Tensor | None, rows: Sequence[tuple[int, int, Tensor]]) -> None:
        """Make an empty cache as if its first ``length`` positions had been read: ``real`` (rows,
        length) marks their real tokens (None: all are), and each (row, start, kv) writes ``kv``
        (as ``read`` gives it) at row ``row`` from position ``start``; every real position must be
        written so."""
        for row, start, kv in rows:
            end = start + kv.shape[3]
            for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
                k[row, :, start:end] = kv[layer, 0]
                v[row, :, start:end] = kv[layer, 1]
        if real is None:
            self.next_position += length
        else:
            self.key_mask[: len(real), :length] = real
            self.next_position[: len(real)] = real.long().sum(dim=1)
            self.padded = self.padded or not bool(real.all())
        self.advance(length)

    def move_rows(self, dst: list[int], src: list[int]) -> None:
        """Copy rows ``src`` into rows ``dst`` (the engine fills freed rows with live ones)."""
        to, of = torch.tensor(dst, device=self.slot.device), torch.tensor(src, device=self.slot.device)
        for t in (*self.keys, *self.values, self.key_mask, self.next_position):
            t[to] = t[of]

    def shift(self, by: int, rows: int) -> None:
        """Move the first ``rows`` rows ``by`` positions along the time axis (left when negative),
        keeping them aligned at the end; positions that open up at the start become padding."""
        old, new = self.length, self.length + by
        keep = min(old, new)
        for t in (*self.keys, *self.values):
            t[:rows, :, new - keep : new] = t[:rows, :, old - keep : old].clone()
        self.key_mask[:rows, new - keep : new] = self.key_mask[:rows, old - keep : old].clone()
        self.key_mask[:rows, : new - keep] = False
        self.length = new
        self.slot.fill_(new)

    def forget_last(self, counts: Sequence[int]) -> None:
        """Make the last ``counts[i]`` written positions of each row i (the first ``len(counts)`` rows)
        padding, as if never written (the drafts that speculative decoding's verification rejected, and
        the padding after a shorter draft): each row's next position goes back by the real tokens
        forgotten. The length stays; ``trim`` gives back the positions no row holds any more."""
        rows, device = len(counts), self.slot.device
        firsts = self.length - torch.tensor(counts, device=device)
        forgotten = torch.arange(self.length, device=device)[None] >= firsts[:, None]
        real = self.key_mask[:rows, : self.length]
        self.next_position[:rows] -= (real & forgotten).long().sum(dim=1)
        real &= ~forgotten
        self.padded = True

    def trim(self, rows: int) -> None:
        """Roll the length back past the last positions in which none of the first ``rows`` rows holds
        a real token (``rollback``: none of them is real, so no row's next position moves)."""
        held = self.key_mask[:rows, : self.length].any(dim=0).nonzero()
        self.rollback(int(held[-1]) + 1 if len(held) else 0, rows)

    def compact(self, rows: int) -> None:
        """Drop every position that none of the first ``rows`` rows needs: each row's real positions
        move together, in order, to the end of a length that is the most real positions a row holds
        (a row's holes, the positions ``forget_last`` forgot, go with the leading padding). Without
        holes this is a ``shift`` left by the padding all rows share."""
        real = self.key_mask[:rows, : self.length]
        counts = real.long().sum(dim=1)
        length = int(counts.max()) if rows else 0
        positions = torch.arange(self.length, device=real.device)
        if bool((real == (positions[None] >= (self.length - counts)[:, None])).all()):
            self.shift(length - self.length, rows)  # each row's real positions are its last already
            return
        self._align(torch.arange(rows, device=real.device), length)
        self.key_mask[:rows, length : self.length] = True
        self.length = length
        self.slot.fill_(length)

    def align(self, rows: Sequence[int]) -> None:
        """Move the real positions of each of ``rows`` together, in order, to the end of the written
        positions (before reading them as one run: ``read``); the length stays."""
        if rows:
            self._align(torch.tensor(list(rows), device=self.slot.device), self.length)

    def _align(self, rows: Tensor, length: int) -> None:
        """Rows ``rows``' real positions, in order, moved to end at position ``length`` (which leaves
        room for the most any of them holds); the positions before them become padding."""
        real = self.key_mask[rows, : self.length]
        counts = real.long().sum(dim=1)
        # each row's real positions first, in order (a stable sort of "is padding")
        order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices
        starts = length - counts  # where each row's real positions begin once moved
        target = torch.arange(length, device=real.device)[None]
        source = order.gather(1, (target - starts[:, None]).clamp(min=0))
        for t in (*self.keys, *self.values):
            index = source[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
            t[rows, :, :length] = t[rows].gather(2, index)
        self.key_mask[rows, :length] = target >= starts[:, None]
