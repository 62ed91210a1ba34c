"""Generating text with a GPT-2: logits processing, the KV-cached decode loop, text in and out.

What to generate is one ``GenerationConfig`` (``gpt2.generation.config``), passed as it is from the
command line or the server to the loop. Read top to bottom: ``next_token`` (penalties and logit
bias, temperature, top-k, top-p, then greedy or a draw), ``stream_tokens`` (the loop: one forward pass
over the prompts, then one cached step per new token), ``generate`` (the same, collected into a
tensor) and the text layer (``generate_text``, ``stream_text`` and the incremental UTF-8 decoder
behind it). Precision, quantisation and compilation are chosen when the model is loaded
(``gpt2.inference.load``), never here.

The loop is written for speed the way gpt-fast is: a KV cache preallocated for the whole generation,
the prompt in one forward pass, logits for the last position only, the token history in one
preallocated buffer, and nothing per step that the settings in use do not need.
"""

from __future__ import annotations

import codecs
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from gpt2.generation.config import ContextWindowReached, GenerationConfig
from gpt2.kv_cache import KVCache
from gpt2.model import Transformer
from gpt2.util.errors import UserError
from gpt2.util.memory import release_freed_memory

# ----------------------------------------------------------------------------------------------------
# Choosing the next token


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019), as transformers applies it: each token already in a row's
    ``history`` (B, L) has its logit divided by ``penalty`` if positive, multiplied if negative."""
    seen = logits.gather(1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def adjust_logits(logits: Tensor, config: GenerationConfig, history: Tensor, prompt_length: int) -> Tensor:
    """``logits`` (B, vocab) after ``config``'s penalties and bias. ``history`` (B, L): every token so
    far, the first ``prompt_length`` of each row its prompt, the rest generated."""
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history, config.repetition_penalty)
    if config.frequency_penalty or config.presence_penalty:
        new = history[:, prompt_length:]
        counts = torch.zeros_like(logits).scatter_add_(1, new, torch.ones_like(new, dtype=logits.dtype))
        logits = logits - config.frequency_penalty * counts - config.presence_penalty * (counts > 0)
    if config.logit_bias:
        ids, biases = zip(*config.logit_bias, strict=True)
        bias = torch.tensor(biases, dtype=logits.dtype, device=logits.device).expand(len(logits), -1)
        logits = logits.index_add(1, torch.tensor(ids, device=logits.device), bias)
    return logits


def filter_logits(
    logits: Tensor, top_k: int | None, top_p: float | None, min_p: float | None = None
) -> Tensor:
    """Set to -inf every logit outside the ``top_k`` largest, outside the nucleus (the smallest set of
    most likely tokens whose probabilities add up to at least ``top_p``) and below ``min_p`` times
    the likeliest token's probability."""
    if top_k and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always has 0 before it
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = logits.scatter(-1, order, sorted_logits)
    if min_p:  # p < min_p * p_max  <=>  logit < logit_max + log(min_p)
        floor = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def next_token(
    logits: Tensor,
    config: GenerationConfig,
    *,
    history: Tensor | None = None,
    prompt_length: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token (B,) of each row from the last position's ``logits`` (B, vocab). ``history``
    and ``prompt_length`` (see ``adjust_logits``) are needed for the penalties."""
    logits = logits.float()
    if config.adjusts_logits and history is not None:
        logits = adjust_logits(logits, config, history, prompt_length)
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    return sample(logits, config, uniform)


def sample(logits: Tensor, config: GenerationConfig, uniform: Tensor) -> Tensor:
    """Tokens (B,) drawn from ``logits`` (B, vocab) after ``config``'s temperature, top-k, top-p and
    min-p, by inverting the cumulative distribution at ``uniform`` (B,), one number in [0, 1) per row.
    (One random number per row: ``torch.multinomial`` costs milliseconds per call at GPT-2's
    vocabulary on a CPU.)"""
    filtered = filter_logits(logits / config.temperature, config.top_k, config.top_p, config.min_p)
    cdf = filtered.softmax(dim=-1).cumsum(dim=-1)
    picked = torch.searchsorted(cdf, (uniform.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)[:, 0]
    return picked.clamp_(max=cdf.shape[1] - 1)  # rounding can leave the last cdf value below u


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
) -> Iterator[tuple[Tensor, Tensor]]:
    """Generate step by step: yields ``(tokens, live)`` per step, both (B * num_samples,).

    ``input_ids`` (B, T) are the prompts, left-padded to a common length with ``attention_mask``
    (B, T; 1 = real token, 0 = padding) when their lengths differ. Rows come out prompt-major
    (prompt 0's samples first). ``live[i]`` is False once row i has stopped; its token is then
    ``pad_token_id``. The loop ends when every row has stopped or ``max_new_tokens`` were made.
    ``decode_bytes`` (a tokenizer's) is needed for stop strings. With ``config.seed`` and no
    ``generator``, sampling is reproducible. The model is left as it was (its mode included).
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
    rows = _Rows(input_ids, attention_mask, config, generator, decode_bytes, pad_token_id)
    return _decode(model, rows, input_ids, attention_mask)  # checked now; generated as it is read


@torch.inference_mode()
def _decode(model: Transformer, rows: _Rows, input_ids: Tensor, attention_mask: Tensor | None
            ) -> Iterator[tuple[Tensor, Tensor]]:
    """The loop: one forward pass over the prompts, then one cached step per new token (in eval mode;
    the model's mode is restored after; the memory of its cache goes back to the system)."""
    was_training = model.training
    model.eval()
    try:
        yield from _steps(model, rows, input_ids, attention_mask)
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
) -> Tensor:
    """Prompts (B, T) -> LongTensor (B * num_samples, T + new): the prompts (with their padding)
    followed by the new tokens; rows that stopped early are filled with ``pad_token_id``."""
    input_ids, attention_mask = _fit_to_window(input_ids, attention_mask, config, model.config.n_positions)
    steps = stream_tokens(model, input_ids, config, attention_mask=attention_mask, generator=generator,
                          decode_bytes=decode_bytes, pad_token_id=pad_token_id)
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
) -> list[str]:
    """The completions of one prompt or a batch of prompts: ``num_samples`` strings per prompt,
    prompt-major. Each stops before ``<|endoftext|>`` (or the given ``stop_token_ids``) and before
    the first of ``stop_strings``."""
    config = text_config(tokenizer, config)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.eot_token, model.device)
    steps = stream_tokens(model, ids, config, attention_mask=mask if not bool(mask.all()) else None,
                          decode_bytes=tokenizer.decode_bytes, pad_token_id=tokenizer.eot_token)
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
) -> Iterator[str]:
    """Yield the completion of ``prompt`` (text, or token ids used as they are, such as a chat
    template's) piece by piece as it is generated; the pieces join to exactly what ``generate_text``
    returns for the same settings and seed. Never splits a character, and holds back text that might
    be the start of a stop string until it is known not to be."""
    config = text_config(tokenizer, config)
    if config.num_samples != 1:
        raise UserError("streaming makes one sample at a time; set num_samples to 1")
    given = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    ids = torch.tensor([given or [tokenizer.eot_token]], device=model.device)
    text = TextStream(tokenizer, config.stop_strings)
    stopped = set(config.stop_token_ids)
    for token, _ in stream_tokens(model, ids, config, decode_bytes=tokenizer.decode_bytes):
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
