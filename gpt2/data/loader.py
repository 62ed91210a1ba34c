"""The loader that feeds the trainer: batches of llm.c token shards (``gpt2.data.shards``, written by
``gpt2.data.prepare``) read through numpy memmaps, each DDP rank given its own part of one stream."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gpt2.data.shards import LOSS, START, mask_path, read_mask, read_shard
from gpt2.loss import IGNORE
from gpt2.util.errors import UserError


class Batch(NamedTuple):
    """Inputs and next-token targets (B, T); for chat shards, the targets not trained on are
    ``IGNORE`` and ``segments`` (B, T) numbers the examples packed into each row (else None)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor | None = None


class ShardLoader:
    """Batches of ``batch_size`` sequences of ``seq_len`` tokens (inputs and next-token targets).

    Sample ``i`` of a shard is tokens ``[i*T, i*T + T + 1)``. With ``shuffle``, every epoch visits
    the shards in a new order and each shard's samples in a new order, both drawn from ``seed`` and
    the epoch, so the stream is the same on every rank and after a restart. The stream is cut into
    micro-batches of ``batch_size`` samples and rank ``r`` of ``world_size`` takes micro-batches
    ``r, r + world_size, ...``: N ranks together read exactly what one process reads in N steps.
    ``state_dict``/``load_state_dict`` save and restore the position. Shards with loss masks beside
    them (chat data, ``gpt2.data.shards.read_mask``) give masked targets and segments; with
    ``masked`` (the directory holds chat data) every shard must have one, with a token to train on:
    without, the run would train on every token, or on none, without a word.
    """

    def __init__(
        self,
        files: Sequence[Path],
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        masked: bool = False,
    ) -> None:
        self.files = list(files)
        self.shards = [read_shard(f) for f in self.files]
        masks = [read_mask(f, len(s)) for f, s in zip(self.files, self.shards, strict=True)]
        if masked or any(m is not None for m in masks):
            _check_masks(self.files, masks)
        self.masks: list[np.ndarray] | None = None if masks and masks[0] is None else masks
        self.samples = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.num_tokens = sum(len(s) for s in self.shards)
        if sum(self.samples) == 0:
            raise UserError(
                f"{len(self.files)} shard(s) starting {self.files[0] if self.files else '(none)'} hold "
                f"{self.num_tokens} tokens, fewer than one sequence of {seq_len + 1}; use a shorter "
                "--seq-len or more data"
            )
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch = self.shard_pos = self.sample_pos = 0
        self._orders: dict[tuple[int, ...], np.ndarray] = {}

    @property
    def num_samples(self) -> int:
        return sum(self.samples)

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse shards holding token ids the model has no embedding for (one pass over each)."""
        for file, shard in zip(self.files, self.shards, strict=True):
            top = int(np.max(shard)) if len(shard) else -1
            if top >= vocab_size:
                raise UserError(
                    f"{file} holds token id {top} but the model's vocabulary has {vocab_size} ids; "
                    "prepare the data with the model's tokenizer"
                )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "sample_pos": self.sample_pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.shard_pos, self.sample_pos = state["epoch"], state["shard_pos"], state["sample_pos"]

    def reset(self) -> None:
        self.load_state_dict({"epoch": 0, "shard_pos": 0, "sample_pos": 0})

    def next_batch(self) -> Batch:
        """This rank's next batch, int64 (batch_size, seq_len) tensors."""
        B, T = self.batch_size, self.seq_len
        self._take(self.rank * B)
        picks = self._take(B)
        self._take((self.world_size - 1 - self.rank) * B)
        rows = torch.from_numpy(np.stack([self.shards[s][i * T : i * T + T + 1] for s, i in picks])
                                .astype(np.int64))
        if self.masks is None:
            return Batch(rows[:, :-1], rows[:, 1:])
        flags = torch.from_numpy(np.stack([self.masks[s][i * T : i * T + T + 1] for s, i in picks])
                                 .astype(np.int64))
        # A target is learnt where its token is marked LOSS and starts no example (the first token of
        # an example is never predicted from the one before it, which belongs to another).
        learnt = (flags[:, 1:] & LOSS).bool() & ~(flags[:, 1:] & START).bool()
        targets = torch.where(learnt, rows[:, 1:], IGNORE)
        segments = (flags[:, :-1] & START).bool().cumsum(dim=1)
        return Batch(rows[:, :-1], targets, segments)

    def _order(self, *key: int) -> np.ndarray:
        """A permutation of ``range(n)`` for key (epoch,) over shards or (epoch, shard) over samples."""
        if key not in self._orders:
            n = len(self.shards) if len(key) == 1 else self.samples[key[1]]
            if self.shuffle:
                self._orders = {k: v for k, v in self._orders.items() if k[0] == key[0]}  # drop old epochs
                self._orders[key] = np.random.default_rng([self.seed, *key]).permutation(n)
            else:
                self._orders[key] = np.arange(n)
        return self._orders[key]

    def _take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` (shard, sample) pairs of the stream, advancing the position."""
        picks: list[tuple[int, int]] = []
        while len(picks) < n:
            shards = self._order(self.epoch)
            if self.shard_pos == len(shards):
                self.epoch, self.shard_pos, self.sample_pos = self.epoch + 1, 0, 0
                continue
            shard = int(shards[self.shard_pos])
            order = self._order(self.epoch, shard)
            k = min(n - len(picks), len(order) - self.sample_pos)
            picks.extend((shard, int(i)) for i in order[self.sample_pos : self.sample_pos + k])
            self.sample_pos += k
            if self.sample_pos == len(order):
                self.shard_pos, self.sample_pos = self.shard_pos + 1, 0
        return picks


def _check_masks(files: Sequence[Path], masks: Sequence[np.ndarray | None]) -> None:
    """Refuse chat shards whose loss mask is missing or marks no target (read a block at a time)."""
    for file, mask in zip(files, masks, strict=True):
        if mask is None:
            raise UserError(f"{mask_path(file)} is missing: {file} is chat data, and its loss mask says "
                            "which tokens to train on; copy the .mask.npy files with the shards, or prepare "
                            "the data again with `gpt2 prepare`")
        blocks = (mask[i : i + (1 << 24)] for i in range(0, len(mask), 1 << 24))
        if not any(np.any((block & (LOSS | START)) == LOSS) for block in blocks):
            raise UserError(f"{mask_path(file)} marks no token to train on (the loss would be 0); prepare "
                            "the data again from examples whose assistant messages have weight 1")
