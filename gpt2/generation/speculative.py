"""Speculative decoding: draft a few tokens cheaply, verify them in one forward pass of the model, keep
the longest accepted run and one more token of the model's own.

A decoding step reads every weight once whatever the number of positions it runs (up to the few rows
the CPU kernels multiply per read), so verifying k drafted tokens costs about one step, and each
accepted draft is a step saved. Drafts come from a ``Drafter``:

- ``PromptLookup``: the tokens that followed the latest earlier occurrence of the text's last n
  tokens (prompt lookup decoding: transformers' ``prompt_lookup_num_tokens``, llama.cpp's lookup
  decoding, vLLM's n-gram method). Free to make; pays where the output repeats the input (summaries,
  edits, code, answers quoting a passage).
- ``DraftModel``: a smaller GPT-2 with the same tokenizer, run ahead for k tokens with a KV cache of
  its own (assisted generation; ``gpt2 train --distill-from`` makes one for any model).

Verification is exact (Leviathan et al. 2023, Chen et al. 2023): greedy keeps a draft while it is the
model's argmax, so the text is the plain decoder's, token for token; sampling keeps draft d with
probability min(1, p(d) / q(d)) and on rejection draws from the residual max(p - q, 0), so every token
follows the model's own distribution p (after penalties, temperature, top-k, top-p and min-p; q is the
drafter's: a point mass for prompt lookup). ``accept`` does this for one position; the callers walk the
positions in order, adjusting each one's logits for the tokens before it (penalties, a grammar).

``Pace`` decides how many tokens to draft: at most ``Drafter.tokens`` and what the sequence may still
make; after a run of rounds whose drafts were mostly rejected it drafts nothing for a while (plain
decoding), then tries again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gpt2.generation.config import DEFAULT_DRAFT_TOKENS, GenerationConfig, check_draft_tokens
from gpt2.generation.logits import distribution, draw_from
from gpt2.kv_cache import KVCache
from gpt2.model import Transformer
from gpt2.util.errors import UserError


@dataclass
class Draft:
    """Drafted ``tokens`` and, for a draft model that sampled them, the distribution each was drawn
    from (``probs``: (len(tokens), vocab)); None for drafts chosen with certainty (prompt lookup, a
    greedy draft model)."""

    tokens: list[int]
    probs: Tensor | None = None


@dataclass
class DraftStats:
    """What speculative decoding achieved: verifications of a draft, tokens drafted, drafts accepted."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float | None:
        """The fraction of drafted tokens accepted (None before any was drafted)."""
        return self.accepted / self.drafted if self.drafted else None

    def add(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted


class Drafter:
    """Where drafts come from, and at most how many tokens one holds (``tokens``, llama.cpp's and
    vLLM's number of draft tokens). ``session`` gives the drafting state of one sequence."""

    name = "drafter"

    def __init__(self, tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
        self.tokens = check_draft_tokens(tokens)
        self.stats = DraftStats()

    def check(self, model: Transformer) -> None:
        """Refuse, in one line, a drafter that cannot draft for ``model``."""

    def session(self, max_len: int) -> DraftSession:
        raise NotImplementedError


class DraftSession:
    """The drafting state of one sequence of at most ``max_len`` tokens."""

    def propose(self, history: Sequence[int], k: int, config: GenerationConfig,
                generator: torch.Generator | None) -> Draft:
        """At most ``k`` tokens to follow ``history`` (every token of the sequence so far)."""
        raise NotImplementedError


class PromptLookup(Drafter, DraftSession):
    """Drafts the tokens that followed the latest earlier occurrence of the sequence's last n tokens,
    n from ``max_ngram`` down to ``min_ngram`` (transformers' defaults: 3 and 1 here too)."""

    name = "lookup"

    def __init__(self, tokens: int = DEFAULT_DRAFT_TOKENS, max_ngram: int = 3, min_ngram: int = 1) -> None:
        super().__init__(tokens)
        if not 1 <= min_ngram <= max_ngram:
            raise UserError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def session(self, max_len: int) -> PromptLookup:
        return self  # nothing to keep between rounds

    def propose(self, history: Sequence[int], k: int, config: GenerationConfig,
                generator: torch.Generator | None) -> Draft:
        return Draft(lookup(history, k, self.max_ngram, self.min_ngram))


def lookup(history: Sequence[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The at most ``k`` tokens after the latest earlier occurrence of ``history``'s last n tokens,
    for the largest n in [min_ngram, max_ngram] that occurs earlier with a token after it."""
    if k < 1 or len(history) < 2:
        return []
    tokens = torch.tensor(history, dtype=torch.long)
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        windows = tokens[:-1].unfold(0, n, 1)  # those that end before the last token
        found = (windows == tokens[-n:]).all(dim=1).nonzero()
        if len(found):
            start = int(found[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class DraftModel(Drafter):
    """A smaller model with the same vocabulary drafting ``tokens`` at a time, greedy or by sampling
    with the same settings as the model it drafts for (then its distributions go with the draft)."""

    name = "model"

    def __init__(self, model: Transformer, tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
        super().__init__(tokens)
        self.model = model.eval()

    def check(self, model: Transformer) -> None:
        mine, theirs = self.model.config, model.config
        if mine.vocab_size != theirs.vocab_size:
            raise UserError(f"the draft model's vocabulary ({mine.vocab_size:,} tokens) is not the model's "
                            f"({theirs.vocab_size:,}); draft with a model of the same tokenizer")
        ours, its = getattr(self.model, "tokenizer", None), getattr(model, "tokenizer", None)
        if ours is not None and its is not None and not ours.same_tokens(its):
            raise UserError("the draft model's tokenizer differs from the model's (same size, other "
                            "tokens); draft with a model of the same tokenizer")

    def session(self, max_len: int) -> DraftModelSession:
        return DraftModelSession(self.model, min(max_len, self.model.config.n_positions))


class DraftModelSession(DraftSession):
    """A draft model's KV cache for one sequence, and the tokens it holds (after a round, the drafts
    the model rejected are rolled back before the next)."""

    def __init__(self, model: Transformer, max_len: int) -> None:
        self.model = model
        self.cache = KVCache(model.config, 1, max_len, device=model.device, dtype=model.cache_dtype,
                             attention_dtype=model.attention_dtype)
        self.fed: list[int] = []  # the tokens whose keys and values the cache holds

    @torch.inference_mode()
    def propose(self, history: Sequence[int], k: int, config: GenerationConfig,
                generator: torch.Generator | None) -> Draft:
        k = min(k, self.cache.max_len - len(history))
        if k < 1:
            return Draft([])
        same = 0
        for mine, theirs in zip(self.fed, history, strict=False):
            if mine != theirs:
                break
            same += 1
        same = min(same, len(history) - 1)  # at least one token to read, for the next one's logits
        self.cache.rollback(same, 1)
        self.fed = list(history)
        ids = torch.tensor([history[same:]], device=self.model.device)
        logits = self.model(ids, cache=self.cache, last_only=True)[:, -1]
        tokens: list[int] = []
        probs = []
        for i in range(k):
            logits = logits.float()
            if config.temperature == 0:
                token = int(logits.argmax())
            else:
                p = distribution(logits, config)
                token = int(draw_from(p, generator))
                probs.append(p[0])
            tokens.append(token)
            if i < k - 1:
                self.fed.append(token)
                logits = self.model.decode_step(torch.tensor([[token]], device=self.model.device), self.cache)
        return Draft(tokens, torch.stack(probs) if probs else None)


def accept(logits: Tensor, config: GenerationConfig, draft: int | None, q: Tensor | None,
           generator: torch.Generator | None) -> tuple[int, bool]:
    """Verify one position: given the model's float32 ``logits`` (vocab,) there (penalties and a grammar
    already applied) and the drafted token there (None past the draft's end), the token the sequence
    takes and whether it is the draft. ``q`` (vocab,): the distribution the draft was drawn from (None:
    drafted with certainty). Greedy takes the argmax, which keeps the draft only if it is the argmax;
    sampling keeps the draft with probability min(1, p / q) and otherwise draws from max(p - q, 0)."""
    if config.temperature == 0:
        token = int(logits.argmax())
        return token, token == draft
    p = distribution(logits[None], config)[0]
    if draft is None:
        return int(draw_from(p[None], generator)), False
    ratio = p[draft] if q is None else p[draft] / q[draft]
    if float(torch.rand(1, generator=generator, device=p.device)) < float(ratio):
        return draft, True
    if q is None:  # the residual of a point mass: p without the draft
        residual = p.clone()
        residual[draft] = 0
    else:
        residual = (p - q).clamp_(min=0)
    if float(residual.sum()) <= 0:  # p == q: the draft was always kept; rounding brought us here
        return draft, True
    return int(draw_from(residual[None], generator)), False


class Pace:
    """How many tokens to draft next for one sequence: the drafter's number, no more than the sequence
    may still make; none for ``REST`` rounds after ``PATIENCE`` rounds in a row that kept less than
    ``FLOOR`` of their drafts (the drafts cost more than they save there: plain decoding by itself)."""

    FLOOR, PATIENCE, REST = 0.2, 4, 16

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.poor = 0  # rounds in a row that kept too little
        self.resting = 0  # rounds left without drafting

    def next(self, room: int) -> int:
        """Tokens to draft now, where ``room`` more tokens fit after the next one."""
        if self.resting:
            self.resting -= 1
            return 0
        return max(0, min(self.tokens, room))

    def record(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self.poor = self.poor + 1 if accepted < self.FLOOR * drafted else 0
        if self.poor >= self.PATIENCE:
            self.poor, self.resting = 0, self.REST
