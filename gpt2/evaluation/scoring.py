"""Scoring text with a language model: log-likelihoods of continuations (the cloze and multiple-choice
tasks) and sliding-window perplexity (the language-modelling corpora).

Both run the model on batches under ``torch.inference_mode`` and take log-softmaxes in float32,
whatever the model's dtype, so bfloat16 models lose precision only inside the network.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt2.model import Transformer
from gpt2.tokenizer.bpe import Tokenizer
from gpt2.util.errors import UserError

# Model vocabularies may be padded beyond the tokenizer's (nanoGPT rounds 50257 up to 50304), but never
# by this much or more: a bigger gap means the model was trained with another tokenizer.
MAX_VOCAB_PADDING = 128


def check_vocabulary(model: Transformer, tokenizer: Tokenizer) -> None:
    """Raise ``UserError`` unless the model's embedding table fits the tokenizer's ids."""
    n_model, n_tok = model.config.vocab_size, tokenizer.n_vocab
    if not n_tok <= n_model < n_tok + MAX_VOCAB_PADDING:
        raise UserError(
            f"the model's vocabulary ({n_model} ids) does not match the tokenizer's ({n_tok} ids, "
            f"{tokenizer.source}); evaluate with the tokenizer the model was trained with"
        )


@dataclass
class Request:
    """Score ``continuation`` (token ids) after ``context`` (token ids, at least one)."""

    context: list[int]
    continuation: list[int]


@dataclass(frozen=True)
class Loglikelihood:
    """The log-probability (nats) of a continuation, its length in tokens, and whether greedy decoding
    predicts every one of its tokens."""

    logprob: float
    tokens: int
    greedy: bool


@dataclass
class Throughput:
    """Tokens the model read and seconds it took, over all calls of a ``Scorer``."""

    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class PerplexityResult:
    """Totals of a perplexity run: ``nll`` (nats) over ``tokens`` scored tokens, which stand for
    ``bytes`` bytes and ``chars`` characters of text (and ``words`` words when they were counted)."""

    tokens: int
    nll: float
    bytes: int
    chars: int
    words: int | None = None
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def bits_per_char(self) -> float:
        return self.nll / math.log(2) / self.chars

    @property
    def word_perplexity(self) -> float | None:
        return math.exp(self.nll / self.words) if self.words else None

    def to_dict(self) -> dict[str, object]:
        """The metrics and counts as one JSON-ready object."""
        out: dict[str, object] = {
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "bits_per_char": self.bits_per_char,
            "bits_per_token": self.nll / math.log(2) / self.tokens,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "chars": self.chars,
        }
        if self.words is not None:
            out |= {"word_perplexity": self.word_perplexity, "words": self.words}
        speed = self.tokens / self.seconds if self.seconds else 0.0
        return out | {"seconds": self.seconds, "tokens_per_second": speed} | self.extra


class Scorer:
    """Runs ``model`` (on its own device and dtype) over batches of at most ``batch_size`` sequences.

    ``progress`` shows tqdm bars on stderr; ``throughput`` adds up the tokens read and the time taken.
    """

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, *, batch_size: int = 8, progress: bool = False
    ) -> None:
        check_vocabulary(model, tokenizer)
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.device = next(model.parameters()).device
        self.throughput = Throughput()

    @property
    def context(self) -> int:
        """The model's context window in tokens."""
        return self.model.config.n_positions

    # -- continuations -----------------------------------------------------------------------------

    def loglikelihoods(self, requests: Sequence[Request], desc: str = "scoring") -> list[Loglikelihood]:
        """Score each request's continuation given its context, in the order given.

        Contexts too long for the window lose their oldest tokens. Requests run longest first, so each
        batch pads little (right padding: causal attention never looks at it).
        """
        inputs = [self._window(r) for r in requests]
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        results: list[Loglikelihood | None] = [None] * len(inputs)
        with tqdm(total=len(order), desc=desc, unit="seq", disable=not self.progress, leave=False) as bar:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                logits = self.logits([inputs[i][0] for i in batch])
                for row, i in enumerate(batch):
                    tokens, n_cont = inputs[i]
                    targets = torch.tensor(requests[i].continuation)
                    results[i] = _score_row(logits[row, len(tokens) - n_cont : len(tokens)], targets)
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    def _window(self, request: Request) -> tuple[list[int], int]:
        """The model input for a request (context + continuation without its last token, cut to the
        window from the left) and the number of continuation tokens."""
        n = len(request.continuation)
        if n == 0:
            raise UserError("a continuation to score is empty; every answer needs at least one token")
        if n > self.context:
            raise UserError(
                f"a continuation of {n} tokens does not fit the model's context window ({self.context})"
            )
        context = request.context or [self.tokenizer.eot_token]
        tokens = (context + request.continuation)[-(self.context + 1) :][:-1]
        return tokens, n

    # -- perplexity --------------------------------------------------------------------------------

    def perplexity(
        self,
        chunks: Iterable[Sequence[int]],
        *,
        context: int | None = None,
        stride: int | None = None,
        desc: str = "perplexity",
    ) -> PerplexityResult:
        """Perplexity of a token stream (given in chunks) by the stride method.

        Windows of ``context`` tokens (default: the model's) start every ``stride`` tokens (default:
        ``context``, disjoint windows); each scores the tokens that no earlier window scored, so with
        ``stride < context`` every token but the stream's first is scored exactly once, with up to
        ``context - stride`` tokens of earlier context. As in the transformers perplexity guide, a
        window's first token is never scored (nothing in the window predicts it): with disjoint windows
        that skips one token per window, and ``stride = context - 1`` scores them all.
        """
        result = PerplexityResult(tokens=0, nll=0.0, bytes=0, chars=0)
        start = time.perf_counter()
        windows = self.window_logits(chunks, context=context, stride=stride)
        with tqdm(desc=desc, unit="tok", disable=not self.progress, leave=False) as bar:
            for logits, targets in windows:
                logprobs = _logprobs(logits, torch.tensor(targets))
                result.nll -= logprobs.double().sum().item()
                result.tokens += len(targets)
                text = np.frombuffer(self.tokenizer.decode_bytes(targets), dtype=np.uint8)
                result.bytes += len(text)
                result.chars += int(((text & 0xC0) != 0x80).sum())  # UTF-8 lead bytes
                bar.update(len(targets))
        if result.tokens == 0:
            raise UserError("the text is too short: perplexity needs at least two tokens")
        result.seconds = time.perf_counter() - start
        return result

    def window_logits(
        self, chunks: Iterable[Sequence[int]], *, context: int | None = None, stride: int | None = None
    ) -> Iterator[tuple[torch.Tensor, list[int]]]:
        """The windows of the stride method over a token stream (see ``perplexity``), run in batches:
        for each, the logits (n, vocab) that predict the ``n`` tokens it scores, and those tokens."""
        context = self.context if context is None else context
        stride = context if stride is None else stride
        if not 2 <= context <= self.context:  # a window scores every token after its first
            raise UserError(f"context must be between 2 and the model's window {self.context}, got {context}")
        if not 1 <= stride <= context:
            raise UserError(f"stride must be between 1 and the context ({context}), got {stride}")
        return self._windows(sliding_windows(chunks, context, stride))  # checked now, run as read

    def _windows(self, windows: Iterator[tuple[list[int], int]]) -> Iterator[tuple[torch.Tensor, list[int]]]:
        while batch := list(itertools.islice(windows, self.batch_size)):
            logits = self.logits([tokens for tokens, _ in batch])
            for row, (tokens, n) in enumerate(batch):
                yield logits[row, len(tokens) - n - 1 : len(tokens) - 1], tokens[-n:]

    # -- the model ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits (B, T, vocab) of right-padded rows, in the model's dtype, on its device."""
        started = time.perf_counter()
        width = max(len(r) for r in rows)
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, : len(r)] = torch.tensor(r)
        logits = self.model(idx.to(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # for honest timings
        self.throughput.tokens += sum(len(r) for r in rows)
        self.throughput.seconds += time.perf_counter() - started
        return logits


def _logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position, computed in float32."""
    targets = targets.to(logits.device)
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def _score_row(logits: torch.Tensor, targets: torch.Tensor) -> Loglikelihood:
    logprob = _logprobs(logits, targets).double().sum().item()
    greedy = bool((logits.argmax(dim=-1) == targets.to(logits.device)).all())
    return Loglikelihood(logprob=logprob, tokens=len(targets), greedy=greedy)


def sliding_windows(
    chunks: Iterable[Sequence[int]], context: int, stride: int
) -> Iterator[tuple[list[int], int]]:
    """Windows of the stride method over a stream of token chunks: ``(tokens, n)`` where the last ``n``
    tokens of ``tokens`` are the ones to score.

    Window k covers tokens [k·stride, k·stride + context) of the stream, cut at its end; it scores the
    tokens after the previous window's end, except its own first token. The stream is read lazily and
    only one window is kept.
    """
    stream = iter(chunks)
    buffer: list[int] = []  # tokens from ``begin`` on
    begin = scored_until = 0
    exhausted = False
    while True:
        while not exhausted and len(buffer) <= context:  # one token past the window tells if more follow
            chunk = next(stream, None)
            if chunk is None:
                exhausted = True
            else:
                buffer.extend(chunk)
        window = buffer[:context]
        end = begin + len(window)
        n = end - max(scored_until, begin + 1)  # the stream's first token has no context to be scored by
        if n > 0:
            yield window, n
        if exhausted and len(buffer) <= context:
            return
        scored_until = end
        begin += stride
        del buffer[:stride]
