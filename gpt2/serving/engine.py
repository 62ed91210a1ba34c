"""Continuous batching: one worker thread owns the model and decodes every live request together.

The worker keeps one preallocated KV cache with a row (a slot) per sequence being generated. At each
step boundary it takes waiting sequences into free slots (their prompts in one left-padded forward
pass), draws one token for every live row, drops the rows that finished or whose client went away,
and runs one forward pass for all the rest. So requests that arrive while others are running join
them at the next step instead of waiting for them to end, as in vLLM or TGI.

The rows share the cache's time axis: every row ends at position ``length``, a shorter row starts
later and is left-padded (``KVCache.key_mask`` False, its own ``next_position``), which is the left
padding that ``gpt2.model`` already supports. Live rows are kept in the first ``k`` slots so a step
computes only them; the shared axis is shifted when a longer prompt arrives or the window fills.

Prompts are read in chunks (chunked prefill, as in vLLM): each step reads at most ``prefill_chunk``
positions of the joining prompts into a cache of their own beside one decode step of the live rows,
so a long prompt delays the others' next tokens by one chunk's time, not by the whole prompt's.
Sequences with the same prompt (the ``n`` choices of a request) read it once and copy its keys and
values.

With a drafter (``gpt2.generation.speculative``: prompt lookup or a draft model) the engine decodes
speculatively, rows with and without drafts together: each step, a row whose request allows it gets a
draft (as many tokens as its ``Pace`` says, what it may still make and the window hold), and the decode
pass feeds every row its last token and its draft, padded to the step's longest draft with padding after
them (rows share the time axis). Each row's positions are then verified in order, each adjusted and
taken as a plain step's token is, up to the first draft rejected or the token that finishes it; the
positions it did not keep become padding (holes in its row), and the axis rolls back past the positions
no row kept (``BatchCache.forget_last`` and ``trim``). When the axis fills, or a quarter of it is
waste, ``BatchCache.compact`` moves each row's positions together. Greedy text is the plain decoder's,
token for token; sampling follows the same distribution.

A sequence's own failure (its grammar failing while it generates, its settings failing on its logits)
ends that sequence alone with its error, a ``UserError`` when its request is at fault; the others go
on. A failure of the batch's own work (a forward pass: a bug, out of memory) fails the requests running
then, and the engine goes on with the next ones.

Timings go to ``Engine.observers`` (callables taking a kind and seconds) as they happen, measured in
the worker: "time_to_first_token" (a job's first token, from its submission), "inter_token_latency"
(each later token of a sequence, from its previous one) and "e2e_request_latency" (a job's last token,
from its submission).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gpt2.generation.config import GenerationConfig
from gpt2.generation.logits import adjust_logits, sample
from gpt2.generation.sampling import TextStream, TextTokenizer, left_pad, text_config
from gpt2.generation.speculative import Draft, Drafter, DraftSession, Pace, accept
from gpt2.model import Transformer
from gpt2.serving.batch_cache import BatchCache
from gpt2.serving.prefix_cache import BLOCK, PrefixCache
from gpt2.serving.structured import Constraint, FormatError, Grammar, allowed_tokens
from gpt2.util.errors import UserError
from gpt2.util.memory import release_freed_memory

PREFIX_CACHE_TOKENS = 4096  # the default budget of the prefix cache, in positions


class QueueFull(Exception):
    """The waiting queue is full; the client should retry later."""


@dataclass(frozen=True)
class Step:
    """One generated token of a sequence. ``text`` is the text it made final (may be '', while a
    character or a possible stop string is incomplete). ``finish_reason`` is "stop" (end of text or a
    stop string; this token is then not part of the text), "length" (max tokens), "abort" (cut by
    ``Engine.cut``: ``token`` is None, no token was drawn, ``text`` is what was held back) or None."""

    token: int | None
    text: str
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None


@dataclass
class SequenceRequest:
    """What one sequence is: the prompt's ids, the sampling settings (``max_new_tokens``, stops...),
    how many top log-probabilities to report per token (None: none), whether to report the
    prompt's log-probabilities too, the grammar its text must follow (``gpt2.serving.structured``;
    None: free text) and at most how many tokens to draft per step when the engine decodes
    speculatively (None: the drafter's number; 0: none, plain decoding)."""

    prompt: list[int]
    config: GenerationConfig
    logprobs: int | None = None
    prompt_logprobs: bool = False
    grammar: Grammar | None = None
    draft_tokens: int | None = None


@dataclass(eq=False)  # compared and hashed by identity
class _Sequence:
    request: SequenceRequest
    job: Job
    index: int
    stream: TextStream
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    constraint: Constraint | None = None  # its place in the request's grammar
    generated: list[int] = field(default_factory=list)  # the tokens drawn so far
    length: int = 0  # real positions this row holds in the cache (its tokens but the last drawn)
    finished: bool = False
    last_token_at: float | None = None  # time.perf_counter() when its last token was drawn
    pace: Pace | None = None  # how many tokens to draft next (None: never drafted for)
    session: DraftSession | None = None  # its drafting state, made at its first draft
    draft: Draft = field(default_factory=lambda: Draft([]))  # fed after its last token, to verify
    written: int = 0  # positions of the shared axis the last decode step wrote in its row
    taken: int = 0  # tokens it took in this step's verification
    kept: int = 0  # of those, the drafts kept


class Job:
    """The sequences of one HTTP request (prompts × n); their steps arrive on one asyncio queue."""

    POLL_S = 0.5

    def __init__(self, requests: Sequence[SequenceRequest], loop: asyncio.AbstractEventLoop) -> None:
        self.requests = list(requests)
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, Step | BaseException]] = asyncio.Queue()
        self.prompt_logprobs: dict[int, list[tuple[float | None, dict[int, float] | None]]] = {}
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.unfinished = len(self.requests)  # sequences without their last token yet
        self.speculative = False  # whether some sequence of it is decoded speculatively
        self.drafted = 0  # tokens drafted for its sequences (counted before the steps they make)
        self.accepted = 0  # of those, the ones kept

    def cancel(self) -> None:
        """Stop generating (the client went away): the worker frees the slots at its next step."""
        self.cancelled = True

    def post(self, index: int, item: Step | BaseException) -> None:
        """Deliver from the worker thread to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()

    async def steps(
        self, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[int, Step]]:
        """Every sequence's steps, as they come, until all of them finished. ``is_disconnected`` is
        asked every ``POLL_S`` seconds without a step; the job is cancelled when it says True, or
        when the caller stops reading early."""
        open_ = len(self.requests)
        try:
            while open_:
                try:
                    index, item = await asyncio.wait_for(self.queue.get(), self.POLL_S)
                except asyncio.TimeoutError:
                    if is_disconnected is not None and await is_disconnected():
                        return
                    continue
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    open_ -= 1
                yield index, item
        finally:
            if open_:
                self.cancel()


@dataclass
class EngineStats:
    """Counters that show how the work was batched."""

    forward_passes: int = 0
    prompt_tokens: int = 0  # prompt positions read (a prompt shared by several sequences counts once)
    prefix_cache_queries: int = 0  # prompt positions looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, the positions found there (not read again)
    tokens_generated: int = 0
    max_batch: int = 0  # most sequences decoded in one forward pass
    requests: int = 0
    rejected: int = 0
    cancelled: int = 0
    errors: int = 0
    drafts: int = 0  # speculative decoding: drafts verified (a row's, per step)
    draft_tokens: int = 0  # tokens drafted
    accepted_tokens: int = 0  # of those, the ones verification kept

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class _Slots:
    """The shared cache, the sequences in its first rows and their next-token logits."""

    cache: BatchCache
    rows: list[_Sequence] = field(default_factory=list)
    # (len(rows), positions, vocab): at each row's last token and each token of its draft, to draw
    # its next tokens from (a row with a shorter draft, or none, ignores the positions after it)
    logits: Tensor | None = None


@dataclass(eq=False)
class _Prefill:
    """The distinct ``prompts`` of the joining ``rows`` (row i's is ``source[i]``), left-padded
    together (``mask`` None when none is padded), read into a cache of their own: ``done`` positions
    so far (from a cached prefix, then chunk by chunk); ``logits`` of the chunks read (their last
    position only, unless some sequence reports its prompt's log-probabilities)."""

    rows: list[_Sequence]
    prompts: list[list[int]]
    source: Tensor
    ids: Tensor
    mask: Tensor | None
    cache: BatchCache
    full: bool
    done: int = 0
    logits: list[Tensor] = field(default_factory=list)


class Engine:
    """Runs a model for many concurrent requests; ``submit`` from async code, ``start``/``stop`` around.

    ``max_batch_size``: slots in the KV cache (1 serves one sequence at a time); ``max_queue``:
    sequences that may wait for a slot before ``submit`` raises ``QueueFull``; ``prefill_chunk``:
    prompt positions read per step while other sequences are decoding; ``draft``: decode
    speculatively with its drafts (``gpt2.generation.speculative``; a request's ``draft_tokens`` may ask
    for fewer, or none). The KV cache is allocated here, once, after checking that it fits in memory.
    """

    def __init__(
        self, model: Transformer, tokenizer: TextTokenizer, *, max_batch_size: int = 16, max_queue: int = 256,
        prefill_chunk: int = 256, prefix_cache_tokens: int = PREFIX_CACHE_TOKENS,
        draft: Drafter | None = None,
    ) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue),
                            ("prefill_chunk", prefill_chunk)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if prefix_cache_tokens < 0:
            raise UserError(f"prefix_cache_tokens must be 0 (off) or more, got {prefix_cache_tokens}")
        if draft is not None:
            draft.check(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.draft = draft
        self.window = model.config.n_positions
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.stats = EngineStats()
        self.observers: list[Callable[[str, float], None]] = []  # told each timing (module docstring)
        # Rows start at different positions: attention always uses the cache's key mask.
        cache = BatchCache(model.config, max_batch_size, device=model.device, dtype=model.cache_dtype,
                           padded=True, attention_dtype=model.attention_dtype)
        self._slots = _Slots(cache)
        self.prefix_cache = None if prefix_cache_tokens < BLOCK else PrefixCache(
            model.config, prefix_cache_tokens, device=model.device, dtype=model.cache_dtype)
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: _Prefill | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._cutting = False  # Engine.cut: every sequence ends at once
        self._thread: threading.Thread | None = None

    # -- the public side (event loop thread) ----------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="gpt2-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def cut(self) -> None:
        """End every sequence, and every one submitted later, at the worker's next step with a last
        step whose finish_reason is "abort" (a shutdown's deadline): each client gets what it has."""
        with self._wake:
            self._cutting = True
            self._wake.notify()

    def submit(
        self, requests: Sequence[SequenceRequest], loop: asyncio.AbstractEventLoop | None = None
    ) -> Job:
        """Queue the sequences of one request, their steps to go to ``loop`` (default: the running
        one; give it to submit from a worker thread); raises ``QueueFull`` at once when they do not fit
        now, ``UserError`` when they never could."""
        if len(requests) > self.max_queue:
            raise UserError(f"{len(requests)} sequences in one request are more than the queue takes "
                            f"(--max-queue {self.max_queue}); send fewer prompts or a smaller n")
        for r in requests:
            r.config.check_vocabulary(self.model.config.vocab_size)
            if not r.prompt or len(r.prompt) + r.config.max_new_tokens > self.window:
                raise UserError(f"a prompt of {len(r.prompt)} tokens and {r.config.max_new_tokens} new "
                                f"tokens do not fit the context window ({self.window}); ask for fewer")
            self._check_draft_tokens(r.draft_tokens)
        job = Job(requests, loop or asyncio.get_running_loop())
        device = self.model.device
        sequences = []
        for index, r in enumerate(requests):
            seed = r.config.seed
            generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
            stop_ids = frozenset(text_config(self.tokenizer, r.config).stop_token_ids)
            constraint = None if r.grammar is None else r.grammar.constraint()
            sequences.append(_Sequence(r, job, index, TextStream(self.tokenizer, r.config.stop_strings),
                                       generator, stop_ids, constraint, pace=self._pace(r)))
        job.speculative = any(s.pace is not None for s in sequences)
        with self._wake:
            if len(self._waiting) + len(sequences) > self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._waiting)} sequences are waiting already (--max-queue "
                                f"{self.max_queue}); retry later")
            self.stats.requests += 1
            self._waiting.extend(sequences)
            self._wake.notify()
        return job

    def _check_draft_tokens(self, tokens: int | None) -> None:
        """Refuse a request's ``draft_tokens`` that this engine cannot take."""
        if tokens is None:
            return
        if self.draft is None:
            raise UserError("draft_tokens: this server does not decode speculatively; start it with "
                            "--draft lookup or --draft DIR to draft tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= self.draft.tokens:
            raise UserError(f"draft_tokens must be an integer from 0 (off) to {self.draft.tokens} (this "
                            f"server's --draft-tokens), got {tokens!r}")

    def _pace(self, r: SequenceRequest) -> Pace | None:
        """The pace of drafting for ``r``'s sequence: None where it is decoded plainly."""
        if self.draft is None:
            return None
        tokens = self.draft.tokens if r.draft_tokens is None else r.draft_tokens
        return Pace(tokens) if tokens else None

    def load(self) -> dict[str, int]:
        """How busy the engine is now (sequences running and waiting, the shared cache's positions
        that hold a running sequence's tokens, the prefix cache's that hold a prompt's), with the
        counters."""
        prefilling = len(self._prefilling.rows) if self._prefilling is not None else 0
        rows = list(self._slots.rows)  # the worker may change the list meanwhile
        prefixes = 0 if self.prefix_cache is None else self.prefix_cache.tokens
        return {"running": len(rows) + prefilling, "waiting": len(self._waiting),
                "cache_positions": sum(s.length for s in rows), "prefix_cache_positions": prefixes,
                **self.stats.as_dict()}

    # -- the worker ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(
                    lambda: self._stopping or self._waiting or self._slots.rows or self._prefilling
                )
                if self._stopping:
                    break
                if self._cutting:
                    self._cut_all()
                    continue
                for s in [s for s in self._waiting if s.job.cancelled]:
                    self._waiting.remove(s)
                    self.stats.cancelled += 1
                joining = []
                if self._prefilling is None:  # one group of prompts is read at a time
                    free = self.max_batch_size - len(self._slots.rows)
                    joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                    joining = self._group(joining)
            try:
                with torch.inference_mode():
                    self._step(joining)
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving others
                self.stats.errors += 1
                for s in {*self._drop_running(), *joining}:
                    s.job.post(s.index, e)
            if not (self._slots.rows or self._prefilling or self._waiting):
                # idle: give back what the prompts' own caches took at their peak (glibc keeps it)
                release_freed_memory()

    def _cut_all(self) -> None:
        """End every sequence, waiting, being read or decoded, with an "abort" step (``cut``; called
        with the lock)."""
        for s in [*self._waiting, *self._drop_running()]:
            s.job.post(s.index, Step(None, s.stream.finish(), finish_reason="abort"))
        self._waiting.clear()

    def _drop_running(self) -> list[_Sequence]:
        """Drop every sequence being read or decoded and empty the shared cache; returns them."""
        dropped = [*(self._prefilling.rows if self._prefilling is not None else []), *self._slots.rows]
        self._slots.rows, self._slots.logits, self._prefilling = [], None, None
        self._slots.cache.reset()
        return dropped

    def _group(self, joining: list[_Sequence]) -> list[_Sequence]:
        """Of ``joining``, the sequences to read together now; the others go back to the front of the
        queue (called with the lock). With a prefix cache two kinds wait for the next group: a prompt
        that begins with the same uncached block as an earlier other one (read after it, it finds that
        prompt's keys and values cached instead of reading them again beside it), and, once the group
        has a cached start, one that would make the parts not cached of the group's prompts differ
        by more than a block (a group is read from where its least cached row needs it, so the others
        would read again what they have). The first, the oldest, is always read."""
        if self.prefix_cache is None or len(joining) < 2:
            return joining
        cache = self.prefix_cache
        kept, deferred, firsts = [], [], {}
        unread: list[int] = []  # the kept prompts' parts not cached
        cached = False  # whether some kept prompt has a cached start
        for s in joining:
            prompt = s.request.prompt
            found = cache.cached(prompt)
            first = tuple(prompt[:BLOCK])
            earlier = firsts.setdefault(first, prompt)
            shares = (len(prompt) > BLOCK and earlier != prompt and not s.request.prompt_logprobs
                      and not cache.holds(first))
            left = [*unread, len(prompt) - found]
            apart = (cached or found > 0) and max(left) - min(left) > BLOCK
            if kept and (shares or apart):
                deferred.append(s)
                continue
            kept.append(s)
            unread, cached = left, cached or found > 0
        self._waiting.extendleft(reversed(deferred))
        return kept

    def _step(self, joining: list[_Sequence]) -> None:
        slots = self._slots
        gone = {i for i, s in enumerate(slots.rows) if s.job.cancelled}
        self.stats.cancelled += len(gone)
        self._remove(gone)
        if joining:
            self._prefilling = self._start_prefill(joining)
        if self._prefilling is not None:
            self._prefill_chunk()
        if not slots.rows:
            return
        tokens = self._draw(slots.logits)
        self._settle()
        finished = {i for i, s in enumerate(slots.rows) if s.finished}
        self._keep_finished(finished)
        self._remove(finished)
        if slots.rows:
            if self.draft is not None:  # the positions that only rejected drafts held are free again
                slots.cache.trim(len(slots.rows))
            self._decode([tokens[s] for s in slots.rows])

    def _keep_finished(self, rows: set[int]) -> None:
        """Keep the prompt and generated text of the finished ``rows`` in the prefix cache, so that a
        chat's next turn, which starts with them, finds them there."""
        if self.prefix_cache is None:
            return
        cache = self._slots.cache
        if self.draft is not None:  # rejected drafts left holes: each row's positions as one run
            cache.align(sorted(rows))
        for row in rows:
            s = self._slots.rows[row]
            read = (s.request.prompt + s.generated)[: s.length]  # the last token drawn was never read
            self.prefix_cache.store(read, cache, row, cache.length - s.length)

    def _start_prefill(self, joining: list[_Sequence]) -> _Prefill:
        cache = self._slots.cache
        device = cache.key_mask.device
        distinct: dict[tuple[int, ...], int] = {}
        source = [distinct.setdefault(tuple(s.request.prompt), len(distinct)) for s in joining]
        prompts = [list(p) for p in distinct]
        ids, mask = left_pad(prompts, self.tokenizer.eot_token, device)
        own = BatchCache(self.model.config, len(distinct), ids.shape[1], device=device, dtype=cache.dtype,
                         attention_dtype=cache.attention_dtype)
        full = any(s.request.prompt_logprobs for s in joining)
        padded = None if bool(mask.all()) else mask
        self.stats.prompt_tokens += sum(map(len, prompts))
        # a prompt's own log-probabilities need the logits of every position: then it is read whole
        done = 0 if full or self.prefix_cache is None else self._reuse_prefixes(prompts, own, padded)
        return _Prefill(joining, prompts, torch.tensor(source, device=device), ids, padded, own, full, done)

    def _reuse_prefixes(self, prompts: list[list[int]], own: BatchCache, mask: Tensor | None) -> int:
        """Start ``own`` (the left-padded ``prompts``' cache) with the keys and values of their
        cached prefixes, as far as every row has them; returns the position reading goes on from."""
        assert self.prefix_cache is not None
        found = [self.prefix_cache.match(p) for p in prompts]
        starts = [own.max_len - len(p) for p in prompts]  # where each row's prompt begins
        pairs = list(zip(starts, found, strict=True))
        done = min(start + (0 if kv is None else kv.shape[3]) for start, kv in pairs)
        rows = [(row, start, kv[:, :, :, : done - start])
                for row, (start, kv) in enumerate(pairs) if kv is not None and done > start]
        self.stats.prefix_cache_queries += sum(map(len, prompts))
        if not rows:
            return 0
        own.restore(done, None if mask is None else mask[:, :done], rows)
        reused = sum(kv.shape[3] for _, _, kv in rows)
        self.stats.prefix_cache_hits += reused
        self.stats.prompt_tokens -= reused
        return done

    def _prefill_chunk(self) -> None:
        """Read the next chunk of the joining prompts; after the last one, their rows join the slots."""
        p = self._prefilling
        assert p is not None
        if all(s.job.cancelled for s in p.rows):
            self.stats.cancelled += len(p.rows)
            self._prefilling = None
            return
        end = min(p.done + self.prefill_chunk, p.ids.shape[1])
        mask = None if p.mask is None else p.mask[:, p.done : end]
        logits = self.model(p.ids[:, p.done : end], cache=p.cache, attention_mask=mask, last_only=not p.full)
        p.logits.append(logits)
        self.stats.forward_passes += 1
        p.done = end
        if end == p.ids.shape[1]:
            self._prefilling = None
            if self.prefix_cache is not None:
                width = p.ids.shape[1]
                for row, prompt in enumerate(p.prompts):
                    self.prefix_cache.store(prompt, p.cache, row, width - len(prompt))
            logits = self._join(p)
            slots = self._slots
            slots.logits = logits if slots.logits is None else _stacked(slots.logits, logits)
            slots.rows += p.rows

    def _join(self, p: _Prefill) -> Tensor:
        """Copy the read prompts' keys and values into the slots after the live rows, one row per
        sequence; returns their next-token logits (rows, 1, vocab)."""
        slots, cache, joining, source = self._slots, self._slots.cache, p.rows, p.source
        longest = p.ids.shape[1]
        if p.full:
            self._report_prompt_logprobs(joining, p.ids[source], torch.cat(p.logits, dim=1)[source])
        if cache.length < longest:
            cache.shift(longest - cache.length, rows=len(slots.rows))  # make room at the start
        cache.insert(p.cache, source, first_row=len(slots.rows))
        for s in joining:
            s.length = len(s.request.prompt)
        return p.logits[-1][source, -1:]

    def _report_prompt_logprobs(self, joining: list[_Sequence], ids: Tensor, logits: Tensor) -> None:
        logprobs = logits[:, :-1].float().log_softmax(dim=-1)
        for row, s in enumerate(joining):
            if not s.request.prompt_logprobs:
                continue
            n, width = len(s.request.prompt), ids.shape[1]
            entries: list[tuple[float | None, dict[int, float] | None]] = [(None, None)]  # the first has none
            for pos in range(width - n, width - 1):
                entries.append(_logprob_entry(logprobs[row, pos], int(ids[row, pos + 1]), s.request.logprobs))
            s.job.prompt_logprobs[s.index] = entries

    def _draw(self, logits: Tensor) -> dict[_Sequence, int]:
        """Draw each row's next tokens, send them to its client and mark the finished rows; returns
        each row's last token. A row draws one token from its logits at its last token; a row with a
        draft goes on, position by position, while the drafts are kept (``_draw_at``). What fails for
        one row (its grammar, its text) ends that sequence alone (``_fail``); the others go on."""
        last: dict[_Sequence, int] = {}
        rows, level = list(range(len(self._slots.rows))), 0
        while rows:
            rows = self._draw_at(logits, rows, level, last)
            level += 1
        return last

    def _draw_at(self, logits: Tensor, rows: list[int], level: int, last: dict[_Sequence, int]) -> list[int]:
        """The tokens of ``rows`` at position ``level`` of their logits (0: after their last token; j:
        after the j-th token of their draft, which they all kept), each adjusted as the plain decoder's
        are (penalties over the tokens taken so far, the grammar where they left it) and taken
        (``_take``) before the next position is verified, so that stops, stop strings, max tokens,
        log-probabilities and the grammar hold token by token. A row without a draft draws as plain
        decoding does (``draw``); a drafted position is verified by ``speculative.accept``. Returns the
        rows that kept their draft here and go on (not finished)."""
        sequences = [self._slots.rows[row] for row in rows]
        here = logits[:, level] if len(rows) == len(logits) else logits[rows, level]
        logprobs = None
        if any(s.request.logprobs is not None for s in sequences):
            logprobs = here.float().log_softmax(dim=-1)
        adjusted = self._adjusted(here, sequences)
        plain = [i for i, s in enumerate(sequences) if not s.draft.tokens]
        drawn: dict[int, int] = {}
        if plain:
            chosen = adjusted if len(plain) == len(sequences) else adjusted[plain]
            drawn = dict(zip(plain, draw(chosen, [sequences[i].request.config for i in plain],
                                         [sequences[i].generator for i in plain]), strict=True))
        now = time.perf_counter()
        going_on = []
        for i, (row, s) in enumerate(zip(rows, sequences, strict=True)):
            if s.finished:  # failed while its logits were adjusted
                continue
            if i in drawn:
                token, kept = drawn[i], False
            else:
                draft = s.draft
                at = draft.tokens[level] if level < len(draft.tokens) else None
                q = None if draft.probs is None or at is None else draft.probs[level]
                token, kept = accept(adjusted[i].float(), s.request.config, at, q, s.generator)
            last[s] = token
            s.taken += 1
            if kept:  # counted before the client gets the token, so that its usage has it
                s.kept += 1
                s.job.accepted += 1
                self.stats.accepted_tokens += 1
            try:
                self._take(s, token, None if logprobs is None else logprobs[i], now)
            except Exception as e:
                self._fail(s, e)
            if kept and not s.finished:
                going_on.append(row)
        return going_on

    def _settle(self) -> None:
        """After the verification: forget in the shared cache the positions of each row that hold no
        token it took (its rejected drafts, the padding after a shorter draft, drafts after the token
        that finished it), and tell each row's pace how its draft went."""
        rows = self._slots.rows
        forget = [s.written - s.taken if s.written else 0 for s in rows]
        for s in rows:
            drafted = len(s.draft.tokens)
            if s.written:
                s.length -= 1 + drafted - s.taken  # real positions written that hold no taken token
            if drafted:
                assert s.pace is not None and self.draft is not None
                s.pace.record(drafted, s.kept)
                self.draft.stats.add(drafted, s.kept)
                self.stats.drafts += 1
            s.written, s.taken, s.kept, s.draft = 0, 0, 0, Draft([])
        if any(forget):
            self._slots.cache.forget_last(forget)

    def _take(self, s: _Sequence, token: int, logprobs: Tensor | None, now: float) -> None:
        """Give ``s`` its drawn ``token`` (``logprobs``: its row's, if any row reports them): the
        grammar takes it, the text grows, the client gets the step."""
        s.generated.append(token)
        self.stats.tokens_generated += 1
        logprob, top = (None, None)
        if logprobs is not None and s.request.logprobs is not None:
            logprob, top = _logprob_entry(logprobs, token, s.request.logprobs)
        if token in s.stop_ids:
            text, finish = s.stream.finish(), "stop"
        else:
            if s.constraint is not None:
                s.constraint.advance(token)
            text = s.stream.push(token)
            finish = "stop" if s.stream.done else None
            if finish is None and s.constraint is not None and s.constraint.done:  # only the end could follow
                text, finish = text + s.stream.finish(), "stop"
            if finish is None and len(s.generated) >= s.request.config.max_new_tokens:
                text, finish = text + s.stream.finish(), "length"
        s.finished = finish is not None
        self._time(s, now)
        s.job.post(s.index, Step(token, text, logprob, top, finish))

    def _fail(self, s: _Sequence, error: Exception) -> None:
        """End ``s`` alone with ``error``, its own failure (a grammar that failed while generating is
        the request's 400): its client gets the error, its slot is freed with the finished rows, and
        the batch goes on."""
        s.finished = True
        self.stats.errors += 1
        s.job.post(s.index, error)

    def _time(self, s: _Sequence, now: float) -> None:
        """Tell the observers the timings of the token ``s`` just drew at ``now`` (before the client
        gets it, so a client that has its reply finds it counted)."""
        job, timings = s.job, []
        if job.first_token_at is None:
            job.first_token_at = now
            timings.append(("time_to_first_token", now - job.submitted))
        if s.last_token_at is not None:
            timings.append(("inter_token_latency", now - s.last_token_at))
        s.last_token_at = now
        if s.finished:
            job.unfinished -= 1
            if job.unfinished == 0:
                timings.append(("e2e_request_latency", now - job.submitted))
        for kind, seconds in timings:
            for observe in self.observers:
                observe(kind, seconds)

    def _adjusted(self, logits: Tensor, sequences: list[_Sequence]) -> Tensor:
        """``logits`` (one row per sequence of ``sequences``) after the penalties and bias of the rows
        that ask for any, and with the tokens their grammar does not allow next at -inf (a copy if so:
        log probabilities are reported from the model's own distribution). A row whose adjustment
        fails, or whose grammar fails or allows nothing, ends alone (``_fail``), its logits left as
        they are."""
        rows = [row for row, s in enumerate(sequences) if s.request.config.adjusts_logits]
        constrained = [row for row, s in enumerate(sequences) if s.constraint is not None]
        if not rows and not constrained:
            return logits
        logits = logits.to(torch.float32, copy=True)
        for row in rows:
            s = sequences[row]
            try:
                history = torch.tensor([s.request.prompt + s.generated], device=logits.device)
                logits[row] = adjust_logits(logits[row : row + 1], s.request.config, history,
                                            len(s.request.prompt))[0]
            except Exception as e:
                self._fail(s, e)
        if constrained:
            constraints = [c for row in constrained if (c := sequences[row].constraint) is not None]
            allowed = allowed_tokens(constraints, logits.shape[1], logits.device)
            empty = (~allowed.any(dim=1)).tolist()
            for i, (row, c) in enumerate(zip(constrained, constraints, strict=True)):
                error = c.error
                if error is None and empty[i]:
                    error = FormatError(c.param, "the format allows no token here")
                if error is not None or sequences[row].finished:
                    allowed[i] = True  # its logits as they are: a row of -inf cannot be drawn from
                if error is not None and not sequences[row].finished:
                    self._fail(sequences[row], error)
            logits[constrained] = logits[constrained].masked_fill(~allowed, float("-inf"))
        return logits

    def _decode(self, tokens: list[int]) -> None:
        """One forward pass for every live row: its last token and its draft in (rows with a shorter
        draft, or none, padded after it), its logits at each of them out. The shared axis first drops
        what no row needs (leading padding, the holes of rejected drafts) when the step would not fit
        the window or a quarter of it is waste; drafts are then cut to what fits."""
        slots, cache = self._slots, self._slots.cache
        drafts = self._propose()
        longest = max(len(d.tokens) for d in drafts)
        waste = cache.length - max(s.length for s in slots.rows)  # leading padding and holes
        if cache.length + 1 + longest > cache.max_len or waste >= cache.max_len // 4:  # make room
            cache.compact(len(slots.rows))
        room = cache.max_len - cache.length - 1
        if longest > room:
            drafts = [Draft(d.tokens[:room], None if d.probs is None else d.probs[:room]) for d in drafts]
            longest = room
        ids, real = _with_drafts(tokens, drafts, longest, self.tokenizer.eot_token, cache.key_mask.device)
        # the cache's first k rows; logits at every position only where some row has a draft
        slots.logits = self.model(ids, cache=cache, attention_mask=real, last_only=not longest)
        for s, d in zip(slots.rows, drafts, strict=True):
            s.draft, s.written = d, 1 + longest
            s.length += 1 + len(d.tokens)
            s.job.drafted += len(d.tokens)  # before any step they make goes out
            self.stats.draft_tokens += len(d.tokens)
        self.stats.forward_passes += 1
        self.stats.max_batch = max(self.stats.max_batch, len(slots.rows))

    def _propose(self) -> list[Draft]:
        """Each live row's draft: none for a row not drafted for, or resting (``Pace``); at most what
        it may still make after its next token, and what the window holds after it."""
        drafts = []
        for s in self._slots.rows:
            config = s.request.config
            room = min(config.max_new_tokens - len(s.generated) - 1, self.window - s.length - 1)
            k = 0 if s.pace is None else s.pace.next(room)
            if not k:
                drafts.append(Draft([]))
                continue
            assert self.draft is not None
            if s.session is None:
                s.session = self.draft.session(len(s.request.prompt) + config.max_new_tokens)
            proposal = s.session.propose(s.request.prompt + s.generated, k, config, s.generator)
            probs = None if proposal.probs is None else proposal.probs[:k]
            drafts.append(Draft(proposal.tokens[:k], probs))
        return drafts

    def _remove(self, rows: set[int]) -> None:
        """Free the slots ``rows``: the last live rows move into the holes, so live rows stay first."""
        slots = self._slots
        if not rows:
            return
        k = len(slots.rows) - len(rows)
        holes = [i for i in sorted(rows) if i < k]
        movers = [i for i in range(k, len(slots.rows)) if i not in rows]
        if holes:
            slots.cache.move_rows(holes, movers)
            if slots.logits is not None:
                slots.logits[holes] = slots.logits[movers]
            for h, m in zip(holes, movers, strict=True):
                slots.rows[h] = slots.rows[m]
        slots.rows = slots.rows[:k]
        if slots.logits is not None:
            slots.logits = slots.logits[:k]
        if k == 0:
            slots.cache.reset()
            slots.logits = None


def _with_drafts(tokens: list[int], drafts: list[Draft], longest: int, pad: int, device: torch.device
                 ) -> tuple[Tensor, Tensor | None]:
    """The ids (rows, 1 + longest) of a decode step: each row's last token, then its draft, then
    ``pad``; and which of them are real (None when all are)."""
    ids = torch.full((len(tokens), 1 + longest), pad, dtype=torch.long)
    real = torch.zeros(len(tokens), 1 + longest, dtype=torch.bool)
    for row, (token, draft) in enumerate(zip(tokens, drafts, strict=True)):
        n = 1 + len(draft.tokens)
        ids[row, :n] = torch.tensor([token, *draft.tokens])
        real[row, :n] = True
    return ids.to(device), None if bool(real.all()) else real.to(device)


def _stacked(logits: Tensor, joining: Tensor) -> Tensor:
    """The live rows' ``logits`` (rows, positions, vocab) and the joining rows' (their one position),
    as one tensor: the joining rows' padded with zeros that nothing reads (they have no draft)."""
    if joining.shape[1] < logits.shape[1]:
        joining = torch.nn.functional.pad(joining, (0, 0, 0, logits.shape[1] - joining.shape[1]))
    elif joining.shape[1] > logits.shape[1]:
        logits = torch.nn.functional.pad(logits, (0, 0, 0, joining.shape[1] - logits.shape[1]))
    return torch.cat([logits, joining])


def _logprob_entry(logprobs: Tensor, token: int, top: int | None) -> tuple[float, dict[int, float] | None]:
    """The log-probability of ``token`` and the ``top`` likeliest tokens' (none when ``top`` is 0)."""
    best = None
    if top:
        values, ids = logprobs.topk(top)
        best = dict(zip(ids.tolist(), values.tolist(), strict=True))
    return float(logprobs[token]), best


def draw(
    logits: Tensor, configs: Sequence[GenerationConfig], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """The next token of each row of ``logits`` (rows, vocab), rows with the same settings together.

    Greedy rows take the argmax; the others are drawn by ``gpt2.generation.logits.sample`` with a uniform
    number from the row's own generator.
    """
    tokens = torch.empty(len(configs), dtype=torch.long, device=logits.device)
    groups: dict[tuple[float, int | None, float | None, float | None], list[int]] = {}
    for row, c in enumerate(configs):
        groups.setdefault((c.temperature, c.top_k, c.top_p, c.min_p), []).append(row)
    for rows in groups.values():
        index = torch.tensor(rows, device=logits.device)
        group = logits[index].float()
        if configs[rows[0]].temperature == 0:
            tokens[index] = group.argmax(dim=-1)
            continue
        u = torch.cat([torch.rand(1, generator=generators[r], device=logits.device) for r in rows])
        tokens[index] = sample(group, configs[rows[0]], u)
    return tokens.tolist()
