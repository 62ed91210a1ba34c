"""Generating text with a GPT-2: settings, logits processing, the KV-cached decode loop, text in and out.

Read top to bottom: ``GenerationConfig`` (the knobs, validated, with named presets), ``next_token``
(penalties and logit bias, temperature, top-k, top-p, then greedy or a draw), ``stream_tokens`` (the loop:
one forward pass over the prompts, then one cached step per new token), ``generate`` (the same,
collected into a tensor), the text layer (``generate_text``, ``stream_text`` and the incremental UTF-8
decoder behind it) and the speed options (``prepare_for_inference``).

The loop is written for speed the way gpt-fast is: a KV cache preallocated for the whole generation,
the prompt in one forward pass, logits for the last position only, the token history in one
preallocated buffer, and nothing per step that the settings in use do not need.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from gpt2.errors import UserError
from gpt2.model import KVCache, Transformer, onednn_linears, plain_linears

# Named sampling settings, the one place where they are defined (``--preset NAME`` on the command line).
SAMPLING_PRESETS: dict[str, dict[str, object]] = {
    "paper": {"temperature": 1.0, "top_k": 40},  # the paper's samples (top-k 40, openai/gpt-2's default T)
    "greedy": {"temperature": 0.0},
    "summarize": {"temperature": 1.0, "top_k": 2, "max_new_tokens": 100},  # the paper's TL;DR: task
}

AtWindow = Literal["error", "stop", "slide"]


class ContextWindowReached(UserWarning):
    """Generation stopped early because the context window is full (``at_window="stop"``)."""


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how. ``temperature`` 0 means greedy decoding.

    ``top_k`` 0 or None and ``top_p`` None (or 1) turn those filters off; ``min_p`` (0 or None =
    off) drops the tokens less likely than ``min_p`` times the likeliest one. ``repetition_penalty``
    (CTRL's, as transformers applies it; 1 = off) covers the prompt and the new tokens;
    ``frequency_penalty`` and ``presence_penalty`` (OpenAI's, in [-2, 2]) subtract from a token's logit
    that much per earlier occurrence, or once if it occurred, among the new tokens; ``logit_bias``
    adds to the logits of the token ids given ({id: bias}). ``stop_token_ids``: a row
    ends after emitting one of them; ``stop_strings``: a row ends once its new text contains one.
    ``truncate``: drop the start of a prompt too long for the window instead of refusing it, keeping
    its last ``window - max_new_tokens`` tokens (half the window when ``max_new_tokens`` fills it).
    ``at_window``: what happens when prompt + new tokens would pass the context window: ``"error"``
    (refuse before starting), ``"stop"`` (stop there, with a ``ContextWindowReached`` warning) or
    ``"slide"`` (re-read the last half of the window and go on).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # also given as a dict
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    num_samples: int = 1
    seed: int | None = None
    truncate: bool = False
    at_window: AtWindow = "error"

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:  # also catches NaN
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise UserError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UserError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        bias = dict(self.logit_bias)
        if any(not isinstance(t, int) or t < 0 for t in bias):
            raise UserError(f"logit_bias keys must be token ids (integers >= 0), got {list(bias)}")
        if self.num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.at_window not in ("error", "stop", "slide"):
            raise UserError(f"at_window must be 'error', 'stop' or 'slide', got {self.at_window!r}")
        if any(not s for s in self.stop_strings):
            raise UserError("stop strings must not be empty")
        # Sequences arrive as lists from users and the CLI; tuples keep the config hashable.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        object.__setattr__(self, "logit_bias", tuple(sorted(bias.items())))

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse token ids (in ``logit_bias``) that the model's vocabulary does not have."""
        beyond = [t for t, _ in self.logit_bias if t >= vocab_size]
        if beyond:
            raise UserError(f"logit_bias names token {beyond[0]}, beyond the vocabulary "
                            f"(0..{vocab_size - 1})")

    @property
    def adjusts_logits(self) -> bool:
        """Whether any penalty or bias applies (``adjust_logits`` is then needed before drawing)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0 or self.presence_penalty != 0
                or bool(self.logit_bias))

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> GenerationConfig:
        """The preset ``name`` (see ``SAMPLING_PRESETS``) with ``overrides`` applied (None values ignored)."""
        if name not in SAMPLING_PRESETS:
            raise UserError(f"unknown sampling preset {name!r}; choose one of: {', '.join(SAMPLING_PRESETS)}")
        settings = {**SAMPLING_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**settings)

    def replace(self, **changes: object) -> GenerationConfig:
        return dataclasses.replace(self, **changes)


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


def _cache_dtype(model: nn.Module) -> torch.dtype:
    # The embedding keeps the activations' dtype, also when int8 quantisation replaced the Linears.
    return model.transformer.wte.weight.dtype


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


@torch.inference_mode()
def stream_tokens(
    model: Transformer,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    config: GenerationConfig,
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
    ``generator``, sampling is reproducible.
    """
    window = model.config.n_positions
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise UserError("input_ids must be a (batch, length) tensor with at least one token per row")
    if config.stop_strings and decode_bytes is None:
        raise UserError("stop strings need a tokenizer to decode with; pass decode_bytes (or a tokenizer)")
    config.check_vocabulary(model.config.vocab_size)
    input_ids, attention_mask = _fit_to_window(input_ids, attention_mask, config, window)
    if config.num_samples > 1:
        input_ids = input_ids.repeat_interleave(config.num_samples, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(config.num_samples, dim=0)
    if generator is None and config.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(config.seed)
    rows, length = input_ids.shape
    new = config.max_new_tokens
    device = input_ids.device

    # Every token so far, one preallocated row each: read by the penalties and for sliding.
    tokens = torch.empty(rows, length + new, dtype=torch.long, device=device)
    real = torch.ones(rows, length + new, dtype=torch.bool, device=device)
    if attention_mask is None:
        tokens[:, :length] = input_ids
    else:
        real[:, :length] = attention_mask.bool()
        # Padding stands in for a real token of its row, so that the penalty never sees the pad id.
        tokens[:, :length] = torch.where(real[:, :length], input_ids, input_ids[:, -1:])
    penalize = config.adjusts_logits
    stop_ids = torch.tensor(config.stop_token_ids, dtype=torch.long, device=device)
    stop_strings = _StopStrings(config.stop_strings, decode_bytes, rows) if config.stop_strings else None
    pad = torch.full((rows,), pad_token_id, dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    onednn_linears(model)  # fp32 CPU products through oneDNN: faster, same values (a no-op otherwise)
    try:
        # The last new token is never fed back, so the cache needs one position less than the text.
        cache_len = window if config.at_window == "slide" else min(window, length + new - 1)
        cache = KVCache(model.config, rows, cache_len, device=device, dtype=_cache_dtype(model))
        logits = model(input_ids, cache=cache, attention_mask=attention_mask, last_only=True)[:, -1]
        slot = torch.full((1,), cache.length, dtype=torch.long, device=device)  # the next token's position
        live = torch.ones(rows, dtype=torch.bool, device=device)
        all_live = True
        for step in range(new):
            end = length + step  # tokens[:, :end] are known
            token = next_token(logits, config, history=tokens[:, :end] if penalize else None,
                               prompt_length=length, generator=generator)
            if not all_live:
                token = torch.where(live, token, pad)
            tokens[:, end] = token
            yield token, live
            if config.stop_token_ids or stop_strings is not None:
                done = torch.isin(token, stop_ids)
                if stop_strings is not None:
                    done |= stop_strings.hits(token, live)
                live = live & ~done
                all_live = bool(live.all())
                if not all_live and not live.any():
                    return
            if step == new - 1:
                return
            if end + 1 >= window and config.at_window != "slide":  # no room for another token
                warnings.warn(
                    f"stopped at the context window ({window} tokens) after {step + 1} new tokens; "
                    "ask to slide the window (at_window='slide', --at-window slide) to go on",
                    ContextWindowReached,
                    stacklevel=2,
                )
                return
            if cache.length == window:  # sliding: re-read the last half of the window
                keep = slice(end + 1 - window // 2, end + 1)
                cache = KVCache(model.config, rows, window, device=device, dtype=_cache_dtype(model))
                logits = model(tokens[:, keep], cache=cache, attention_mask=real[:, keep], last_only=True)
                logits = logits[:, -1]
                slot.fill_(cache.length)
            else:
                logits = model.decode_step(token[:, None], cache, slot)
                cache.length += 1
                slot += 1
    finally:
        model.train(was_training)


def generate(
    model: Transformer,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    decode_bytes: Callable[[list[int]], bytes] | None = None,
    pad_token_id: int = 0,
    **settings: object,
) -> Tensor:
    """Prompts (B, T) -> LongTensor (B * num_samples, T + new): the prompts (with their padding)
    followed by the new tokens; rows that stopped early are filled with ``pad_token_id``.

    ``settings`` are ``GenerationConfig`` fields (``max_new_tokens``, ``temperature``, ``top_k``...).
    """
    config = GenerationConfig(**settings)
    input_ids, attention_mask = _fit_to_window(input_ids, attention_mask, config, model.config.n_positions)
    steps = stream_tokens(
        model, input_ids, attention_mask, config=config, generator=generator,
        decode_bytes=decode_bytes, pad_token_id=pad_token_id,
    )
    new = torch.stack([token for token, _ in steps], dim=1)
    return torch.cat([input_ids.repeat_interleave(config.num_samples, dim=0), new], dim=1)


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


def _text_config(tokenizer: TextTokenizer, settings: dict[str, object]) -> GenerationConfig:
    """Text generation stops at ``<|endoftext|>`` unless other stop ids are given."""
    settings.setdefault("stop_token_ids", (tokenizer.eot_token,))
    return GenerationConfig(**settings)


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


def _device(model: nn.Module) -> torch.device:
    return model.transformer.wte.weight.device


def generate_text(
    model: Transformer, tokenizer: TextTokenizer, prompts: str | Sequence[str], **settings: object
) -> list[str]:
    """The completions of one prompt or a batch of prompts: ``num_samples`` strings per prompt,
    prompt-major. Each stops before ``<|endoftext|>`` (or the given ``stop_token_ids``) and before
    the first of ``stop_strings``. ``settings`` are ``GenerationConfig`` fields."""
    config = _text_config(tokenizer, dict(settings))
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.eot_token, _device(model))
    steps = stream_tokens(model, ids, mask if not bool(mask.all()) else None, config=config,
                          decode_bytes=tokenizer.decode_bytes, pad_token_id=tokenizer.eot_token)
    rows: list[list[int]] = [[] for _ in range(len(prompts) * config.num_samples)]
    stopped = set(config.stop_token_ids)
    for token, live in steps:
        for row, (t, alive) in enumerate(zip(token.tolist(), live.tolist(), strict=True)):
            if alive and t not in stopped:
                rows[row].append(t)
    return [_cut_at_stop(tokenizer.decode(row), config.stop_strings)[0] for row in rows]


def stream_text(
    model: Transformer, tokenizer: TextTokenizer, prompt: str, **settings: object
) -> Iterator[str]:
    """Yield the completion of ``prompt`` piece by piece as it is generated; the pieces join to
    exactly what ``generate_text`` returns for the same settings and seed. Never splits a character,
    and holds back text that might be the start of a stop string until it is known not to be."""
    config = _text_config(tokenizer, dict(settings))
    if config.num_samples != 1:
        raise UserError("streaming makes one sample at a time; set num_samples to 1")
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=_device(model))
    text = TextStream(tokenizer, config.stop_strings)
    stopped = set(config.stop_token_ids)
    for token, _ in stream_tokens(model, ids, config=config, decode_bytes=tokenizer.decode_bytes):
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


# ----------------------------------------------------------------------------------------------------
# Speed options


def prepare_for_inference(
    model: nn.Module, *, bf16: bool = False, int8: bool = False, compile: bool = False
) -> nn.Module:
    """Return ``model`` (changed in place) made faster for generation. Without options, on the CPU:
    fp32 products computed by oneDNN (same weights and shapes; generating does this by itself too).

    ``bf16``: bfloat16 weights and cache, half the bytes read per token (logits are processed in fp32).
    ``int8``: dynamic int8 quantisation of every ``nn.Linear`` (weights int8, activations quantised
    on the fly; CPU only), a quarter of the bytes. ``compile``: ``torch.compile`` the decode step
    (the prompt's forward pass stays eager); it then uses the weights as they were at compile time.
    """
    model.eval()
    if bf16 and int8:
        raise UserError("choose one of bf16 and int8 weights, not both")
    if bf16:
        model.to(torch.bfloat16)
    elif not int8 and _device(model).type == "cpu":
        onednn_linears(model)
    if int8:
        if _device(model).type != "cpu":
            raise UserError("int8 dynamic quantisation runs on the CPU only; drop --int8 or use --device cpu")
        plain_linears(model)  # generating may have moved them to oneDNN already
        with warnings.catch_warnings():  # torch announces the move of this API to torchao
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor", category=UserWarning)
            torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    if compile:  # the decode step: its shapes are fixed during a generation, and symbolic (dynamic=True)
        # in batch size and cache length, so one compilation serves every generation
        if _device(model).type == "cuda":  # "reduce-overhead": replayed as a CUDA graph every step
            model.decode_step = torch.compile(model.decode_step, mode="reduce-overhead", dynamic=True)
        else:  # freezing: weights become constants, prepacked for the CPU's matrix kernels
            model.decode_step = torch.compile(model.decode_step, dynamic=True, options={"freezing": True})
    return model
