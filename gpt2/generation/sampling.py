"""Generating text with a GPT-2: logits processing, the KV-cached decode loop, text in and out.

What to generate is one ``GenerationConfig`` (``gpt2.generation.config``), passed as it is from the
command line or the server to the loop; each token is chosen by ``gpt2.generation.logits``. Read top
to bottom: ``stream_tokens`` (the loop: one forward pass over the prompts, then one cached step per
new token, or with a drafter one verification per draft: ``gpt2.generation.speculative``),
``generate`` (the same, collected into a tensor) and the text layer (``generate_text``,
``stream_text`` and the incremental UTF-8 decoder behind it). Precision, quantisation and
compilation are chosen when the model is loaded (``gpt2.inference.load``), never here.

The loop is written for speed the way gpt-fast is: a KV cache preallocated for the whole generation,
the prompt in one forward pass, logits for the last position only, the token history in one
preallocated buffer, and nothing per step that the settings in use do not need.
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from gpt2.generation.config import ContextWindowReached, GenerationConfig
from gpt2.generation.logits import adjust_logits, next_token
from gpt2.generation.speculative import Draft, Drafter, Pace, accept
from gpt2.kv_cache import KVCache
from gpt2.model import Transformer
from gpt2.util.errors import UserError
from gpt2.util.memory import release_freed_memory

# ----------------------------------------------------------------------------------------------------
# The decode loop


def _fit_to_window(
    input_ids: Tensor, attention_mask: Tensor | None, config: GenerationConfig, window: int
) -> tuple[Tensor, Tensor | None]:
    """Check (and, when asked, left-truncate) the prompts against the context window."""
    length, new = input_ids.shape[1], config.max_new_tokens
    if config.truncate:
        keep = window - new if new < window else window // 2
        if length > keep:
            input_ids = input_ids[:, -keep:]
            attention_mask = attention_mask[:, -keep:] if attention_mask is not None else None
            length = keep
    elif length > window:
        raise UserError(
            f"prompt of {length} tokens exceeds the context window ({window}); shorten it or ask "
            "for left truncation (truncate=True, --truncate)"
        )
    if config.at_window == "error" and length + new > window:
        raise UserError(
            f"prompt ({length} tokens) + max_new_tokens ({new}) exceeds the context window ({window}); "
            "lower max_new_tokens, drop the prompt's start (truncate=True, --truncate), or let generation "
            "stop at the window (at_window='stop', --at-window stop) or slide it (at_window='slide')"
        )
    return input_ids, attention_mask


class _StopStrings:
    """Finds stop strings in each row's new bytes (bytes, so that no character is ever half-seen)."""

    def __init__(self, stops: Sequence[str], decode_bytes: Callable[[list[int]], bytes], rows: int):
        self.stops = [s.encode() for s in stops]
        self.longest = max(len(s) for s in self.stops)
        self.decode_bytes = decode_bytes
        self.tails = [b""] * rows

    def hits(self, tokens: Tensor, live: Tensor) -> Tensor:
        """(B,) True where this step's token completed a stop string."""
        hit = []
        for row, (token, alive) in enumerate(zip(tokens.tolist(), live.tolist(), strict=True)):
            tail = self.tails[row] + self.decode_bytes([token]) if alive else b""
            hit.append(any(s in tail for s in self.stops))
            self.tails[row] = tail[-(self.longest - 1) :] if self.longest > 1 else b""
        return torch.tensor(hit, device=tokens.device)


class _Rows:
    """The rows being generated: every token so far (the prompt, then the new tokens, in one
    preallocated buffer read by the penalties and for sliding), which rows are still live, and the
    rules that stop them."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor | None, config: GenerationConfig,
                 generator: torch.Generator | None, decode_bytes: Callable[[list[int]], bytes] | None,
                 pad_token_id: int) -> None:
        rows, self.length = input_ids.shape
        device = input_ids.device
        self.config = config
        self.tokens = torch.empty(rows, self.length + config.max_new_tokens, dtype=torch.long, device=device)
        self.real = torch.ones(rows, self.length + config.max_new_tokens, dtype=torch.bool, device=device)
        if attention_mask is None:
            self.tokens[:, : self.length] = input_ids
        else:
            self.real[:, : self.length] = attention_mask.bool()
            # Padding stands in for a real token of its row, so that the penalty never sees the pad id.
            prompt_real = self.real[:, : self.length]
            self.tokens[:, : self.length] = torch.where(prompt_real, input_ids, input_ids[:, -1:])
        if generator is None and config.seed is not None:
            generator = torch.Generator(device=device).manual_seed(config.seed)
        self.generator = generator
        self.stop_ids = torch.tensor(config.stop_token_ids or (), dtype=torch.long, device=device)
        self.stop_strings = None
        if config.stop_strings:
            self.stop_strings = _StopStrings(config.stop_strings, decode_bytes, rows)
        self.pad = torch.full((rows,), pad_token_id, dtype=torch.long, device=device)
        self.live = torch.ones(rows, dtype=torch.bool, device=device)
        self.all_live = True

    def choose(self, logits: Tensor, step: int) -> Tensor:
        """The rows' next tokens (``pad`` for stopped rows) from their last ``logits``."""
        end = self.length + step  # tokens[:, :end] are known
        history = self.tokens[:, :end] if self.config.adjusts_logits else None
        token = next_token(logits, self.config, history=history, prompt_length=self.length,
                           generator=self.generator)
        if not self.all_live:
            token = torch.where(self.live, token, self.pad)
        self.tokens[:, end] = token
        return token

    def stop(self, token: Tensor) -> bool:
        """Mark the rows that ``token`` stops; True once no row is live."""
        if not self.config.stop_token_ids and self.stop_strings is None:
            return False
        done = torch.isin(token, self.stop_ids)
        if self.stop_strings is not None:
            done |= self.stop_strings.hits(token, self.live)
        self.live = self.live & ~done  # a new tensor: the one already yielded stays as it was
        self.all_live = bool(self.live.all())
        return not self.all_live and not self.live.any()


def stream_tokens(
    model: Transformer,
    input_ids: Tensor,
    config: GenerationConfig,
    *,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    decode_bytes: Callable[[list[int]], bytes] | None = None,
    pad_token_id: int = 0,
    draft: Drafter | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Generate step by step: yields ``(tokens, live)`` per step, both (B * num_samples,).

    ``input_ids`` (B, T) are the prompts, left-padded to a common length with ``attention_mask``
    (B, T; 1 = real token, 0 = padding) when their lengths differ. Rows come out prompt-major
    (prompt 0's samples first). ``live[i]`` is False once row i has stopped; its token is then
    ``pad_token_id``. The loop ends when every row has stopped or ``max_new_tokens`` were made.
    ``decode_bytes`` (a tokenizer's) is needed for stop strings. With ``config.seed`` and no
    ``generator``, sampling is reproducible. The model is left as it was (its mode included).
    ``draft``: decode speculatively with its drafts (``gpt2.generation.speculative``; one sequence at
    a time): the same greedy tokens, the same distribution when sampling; its ``stats`` count the
    drafts made and kept.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise UserError("input_ids must be a (batch, length) tensor with at least one token per row")
    if config.stop_strings and decode_bytes is None:
        raise UserError("stop strings need a tokenizer to decode with; pass decode_bytes (or a tokenizer)")
    config.check_vocabulary(model.config.vocab_size)
    input_ids, attention_mask = _fit_to_window(input_ids, attention_mask, config, model.config.n_positions)
    rows = len(input_ids) * config.num_samples
    KVCache.check_fits(model.config, rows, _cache_len(model, input_ids, config), model.cache_dtype,
                       model.attention_dtype)  # before any buffer
    if config.num_samples > 1:
        input_ids = input_ids.repeat_interleave(config.num_samples, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(config.num_samples, dim=0)
    if draft is not None:
        _check_speculative(model, draft, rows, config)
    rows = _Rows(input_ids, attention_mask, config, generator, decode_bytes, pad_token_id)
    return _decode(model, rows, input_ids, attention_mask, draft)  # checked now; generated as it is read


def _check_speculative(model: Transformer, draft: Drafter, rows: int, config: GenerationConfig) -> None:
    """Refuse, in one line, what speculative decoding cannot do here."""
    if rows != 1:
        raise UserError(f"speculative decoding makes one sequence at a time here, not {rows}; give one "
                        "prompt and one sample (the server decodes speculative requests together)")
    if config.at_window == "slide":
        raise UserError("speculative decoding cannot slide the context window; use at_window 'stop' or "
                        "'error' (--at-window)")
    draft.check(model)


@torch.inference_mode()
def _decode(model: Transformer, rows: _Rows, input_ids: Tensor, attention_mask: Tensor | None,
            draft: Drafter | None) -> Iterator[tuple[Tensor, Tensor]]:
    """The loop: one forward pass over the prompts, then one cached step per new token, or one
    verification per draft (in eval mode; the model's mode is restored after; the memory of its cache
    goes back to the system)."""
    was_training = model.training
    model.eval()
    try:
        if draft is None:
            yield from _steps(model, rows, input_ids, attention_mask)
        else:
            yield from _speculative_steps(model, rows, input_ids, draft)
    finally:
        model.train(was_training)
        release_freed_memory()


def _steps(model: Transformer, rows: _Rows, input_ids: Tensor, attention_mask: Tensor | None
           ) -> Iterator[tuple[Tensor, Tensor]]:
    """Each step's tokens and live rows, until every row stopped, ``max_new_tokens`` or the window."""
    config, window = rows.config, model.config.n_positions
    new = config.max_new_tokens
    cache = KVCache(model.config, len(input_ids), _cache_len(model, input_ids, config),
                    device=input_ids.device, dtype=model.cache_dtype,
                    attention_dtype=model.attention_dtype)
    logits = model(input_ids, cache=cache, attention_mask=attention_mask, last_only=True)[:, -1]
    for step in range(new):
        token = rows.choose(logits, step)
        yield token, rows.live
        if rows.stop(token) or step == new - 1:
            return
        known = rows.length + step + 1
        if known >= window and config.at_window != "slide":  # no room for another token
            warnings.warn(
                f"stopped at the context window ({window} tokens) after {step + 1} new tokens; "
                "ask to slide the window (at_window='slide', --at-window slide) to go on",
                ContextWindowReached,
                stacklevel=3,
            )
            return
        if cache.length == window:  # sliding: re-read the last half of the window
            keep = slice(known - window // 2, known)
            cache.reset()
            logits = model(rows.tokens[:, keep], cache=cache, attention_mask=rows.real[:, keep],
                           last_only=True)[:, -1]
        else:
            logits = model.decode_step(token[:, None], cache)


def _speculative_steps(model: Transformer, rows: _Rows, input_ids: Tensor, draft: Drafter
                       ) -> Iterator[tuple[Tensor, Tensor]]:
    """Each new token of one row, decoded speculatively: the prompt's forward pass gives the first;
    then, per round, the last token and a draft after it in one forward pass, whose positions are
    verified in order (``speculative.accept``, each position's logits adjusted for the tokens before
    it), and the cache rolled back past the first rejected draft."""
    config, window, new = rows.config, model.config.n_positions, rows.config.max_new_tokens
    cache = KVCache(model.config, 1, _cache_len(model, input_ids, config), device=input_ids.device,
                    dtype=model.cache_dtype, attention_dtype=model.attention_dtype)
    token = rows.choose(model(input_ids, cache=cache, last_only=True)[:, -1], 0)
    yield token, rows.live
    if rows.stop(token):
        return
    made, session, pace = 1, draft.session(cache.max_len + 1), Pace(draft.tokens)
    while made < new:
        known = rows.length + made  # tokens so far; the cache holds all but the last
        if known >= window:
            warnings.warn(f"stopped at the context window ({window} tokens) after {made} new tokens",
                          ContextWindowReached, stacklevel=3)
            return
        history = rows.tokens[0, :known].tolist()
        k = pace.next(min(new - made - 1, min(cache.max_len, window - 1) - known))  # tokens fit the window
        proposal = session.propose(history, k, config, rows.generator) if k else Draft([])
        drafted, start = proposal.tokens[:k], cache.length
        ids = torch.tensor([[history[-1], *drafted]], device=input_ids.device)
        logits = model(ids, cache=cache)[0] if drafted else model.decode_step(ids, cache)
        accepted = 0
        # plain greedy: every position's argmax at once (accept's answer, without a call per position)
        plain_greedy = config.temperature == 0 and not config.adjusts_logits
        best = logits.argmax(dim=-1).tolist() if plain_greedy else None
        for j in range(len(drafted) + 1):
            if best is not None:
                chosen, kept = best[j], j < len(drafted) and best[j] == drafted[j]
            else:
                adjusted = logits[j : j + 1].float()
                if config.adjusts_logits:
                    adjusted = adjust_logits(adjusted, config, rows.tokens[:, : known + j], rows.length)
                at = (drafted[j], None if proposal.probs is None else proposal.probs[j]) \
                    if j < len(drafted) else (None, None)
                chosen, kept = accept(adjusted[0], config, *at, rows.generator)
            accepted += kept
            rows.tokens[0, known + j] = chosen
            token = torch.tensor([chosen], device=input_ids.device)
            made += 1
            yield token, rows.live
            stopped = rows.stop(token)
            if stopped or not kept or made == new:
                break
        draft.stats.add(len(drafted), accepted)
        pace.record(len(drafted), accepted)
        if stopped:
            return
        cache.rollback(start + 1 + accepted, 1)


def _cache_len(model: Transformer, input_ids: Tensor, config: GenerationConfig) -> int:
    """Positions the cache needs: the last new token is never fed back, so one less than the text."""
    window = model.config.n_positions
    if config.at_window == "slide":
        return window
    return min(window, input_ids.shape[1] + config.max_new_tokens - 1)


def generate(
    model: Transformer,
    input_ids: Tensor,
    config: GenerationConfig,
    *,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    decode_bytes: Callable[[list[int]], bytes] | None = None,
    pad_token_id: int = 0,
    draft: Drafter | None = None,
) -> Tensor:
    """Prompts (B, T) -> LongTensor (B * num_samples, T + new): the prompts (with their padding)
    followed by the new tokens; rows that stopped early are filled with ``pad_token_id``. ``draft``:
    as ``stream_tokens``'."""
    input_ids, attention_mask = _fit_to_window(input_ids, attention_mask, config, model.config.n_positions)
    steps = stream_tokens(model, input_ids, config, attention_mask=attention_mask, generator=generator,
                          decode_bytes=decode_bytes, pad_token_id=pad_token_id, draft=draft)
    prompts = input_ids.repeat_interleave(config.num_samples, dim=0)
    out = torch.empty(len(prompts), prompts.shape[1] + config.max_new_tokens, dtype=prompts.dtype,
                      device=prompts.device)
    out[:, : prompts.shape[1]] = prompts
    end = prompts.shape[1]
    # Each token goes straight into the output: a small tensor per step kept until the end would sit
    # inside the heap's freed blocks, and glibc then takes fresh memory for the next step's logits
    # (measured: up to 170 MB more at the peak of 128 steps at batch 8).
    for token, _ in steps:
        out[:, end] = token
        end += 1
    return out[:, :end].contiguous()


# ----------------------------------------------------------------------------------------------------
# Text in, text out


class TextTokenizer(Protocol):
    """What the text layer needs of a tokenizer (``gpt2.Tokenizer`` has it)."""

    eot_token: int

    def encode(self, text: str, *, allowed_special: frozenset[str] = ...) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def decode_bytes(self, ids: list[int]) -> bytes: ...


class IncrementalDecoder:
    """Turns token ids into text one at a time, holding back the bytes of a character that is not
    complete yet, so a multi-byte character (CJK, emoji) never comes out split. Invalid bytes become
    U+FFFD, exactly as in ``tokenizer.decode`` of the whole sequence."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def encode_prompt(tokenizer: TextTokenizer, prompt: str) -> list[int]:
    """The prompt's ids; ``<|endoftext|>`` in it is the special token, and an empty prompt is just
    ``<|endoftext|>`` (the document boundary GPT-2 was trained with)."""
    return tokenizer.encode(prompt, allowed_special=frozenset({"<|endoftext|>"})) or [tokenizer.eot_token]


def text_config(tokenizer: TextTokenizer, config: GenerationConfig | None) -> GenerationConfig:
    """``config`` (default settings when None) for text: it stops at ``<|endoftext|>`` unless other
    stop ids are given."""
    config = config or GenerationConfig()
    if config.stop_token_ids is not None:
        return config
    return config.replace(stop_token_ids=(tokenizer.eot_token,))


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def left_pad(
    prompts: list[list[int]], pad_token_id: int, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths as one left-padded batch (B, T) and its attention mask."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :] = torch.tensor(p)
        mask[row, longest - len(p) :] = 1
    return ids.to(device), mask.to(device)


def generate_text(
    model: Transformer,
    tokenizer: TextTokenizer,
    prompts: str | Sequence[str],
    config: GenerationConfig | None = None,
    draft: Drafter | None = None,
) -> list[str]:
    """The completions of one prompt or a batch of prompts: ``num_samples`` strings per prompt,
    prompt-major. Each stops before ``<|endoftext|>`` (or the given ``stop_token_ids``) and before
    the first of ``stop_strings``. ``draft``: decode speculatively (``stream_tokens``)."""
    config = text_config(tokenizer, config)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.eot_token, model.device)
    steps = stream_tokens(model, ids, config, attention_mask=mask if not bool(mask.all()) else None,
                          decode_bytes=tokenizer.decode_bytes, pad_token_id=tokenizer.eot_token, draft=draft)
    rows: list[list[int]] = [[] for _ in range(len(prompts) * config.num_samples)]
    stopped = set(config.stop_token_ids)
    for token, live in steps:
        for row, (t, alive) in enumerate(zip(token.tolist(), live.tolist(), strict=True)):
            if alive and t not in stopped:
                rows[row].append(t)
    return [_cut_at_stop(tokenizer.decode(row), config.stop_strings)[0] for row in rows]


def stream_text(
    model: Transformer,
    tokenizer: TextTokenizer,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    draft: Drafter | None = None,
) -> Iterator[str]:
    """Yield the completion of ``prompt`` (text, or token ids used as they are, such as a chat
    template's) piece by piece as it is generated; the pieces join to exactly what ``generate_text``
    returns for the same settings and seed. Never splits a character, and holds back text that might
    be the start of a stop string until it is known not to be. ``draft``: decode speculatively
    (``stream_tokens``)."""
    config = text_config(tokenizer, config)
    if config.num_samples != 1:
        raise UserError("streaming makes one sample at a time; set num_samples to 1")
    given = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    ids = torch.tensor([given or [tokenizer.eot_token]], device=model.device)
    text = TextStream(tokenizer, config.stop_strings)
    stopped = set(config.stop_token_ids)
    for token, _ in stream_tokens(model, ids, config, decode_bytes=tokenizer.decode_bytes, draft=draft):
        t = int(token)
        if t in stopped:
            break
        if piece := text.push(t):
            yield piece
        if text.done:
            break
    if rest := text.finish():
        yield rest


class TextStream:
    """The text of generated tokens, released piece by piece as it becomes final: never half a
    character, never text that may be the start of a stop string. ``done`` once a stop string
    appeared; the text ends before it. (``stream_text`` and the server's batched streams use it.)"""

    def __init__(self, tokenizer: TextTokenizer, stop_strings: Sequence[str] = ()) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_strings = stop_strings
        self.text = ""  # everything decoded so far (cut before a stop string)
        self.sent = 0  # how much of it was released
        self.done = False

    def push(self, token_id: int) -> str:
        """Add the next token; returns the text that became final ('' while it is held back)."""
        self.text, self.done = _cut_at_stop(self.text + self.decoder.push(token_id), self.stop_strings)
        held = 0 if self.done else _stop_prefix_length(self.text, self.stop_strings)
        return self._release(len(self.text) - held)

    def finish(self) -> str:
        """The rest of the text once generation has ended (a cut-off last character as U+FFFD,
        as ``tokenizer.decode`` writes it)."""
        if not self.done:
            self.text, self.done = _cut_at_stop(self.text + self.decoder.flush(), self.stop_strings)
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (it may yet become one)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
