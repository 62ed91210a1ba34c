"""What to generate and how: ``GenerationConfig``, one value that travels as it is from the command line,
the server or a caller to the decode loop (``gpt2.generation.sampling``), and the named sampling presets.
Free of torch, so that the command line can describe the options without loading it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from gpt2.util.errors import UserError

# Named sampling settings, the one place where they are defined (``--preset NAME`` on the command line).
SAMPLING_PRESETS: dict[str, dict[str, object]] = {
    "paper": {"temperature": 1.0, "top_k": 40},  # the paper's samples (top-k 40, openai/gpt-2's default T)
    "greedy": {"temperature": 0.0},
    "summarize": {"temperature": 1.0, "top_k": 2, "max_new_tokens": 100},  # the paper's TL;DR: task
}

AtWindow = Literal["error", "stop", "slide"]

SEEDS = range(-(2**63), 2**64)  # what torch's generators accept


# Speculative decoding (``gpt2.generation.speculative``): drafted tokens verified per forward pass.
DEFAULT_DRAFT_TOKENS = 7  # with the token before them, the 8 rows the CPU kernels multiply per read
MAX_DRAFT_TOKENS = 64  # more is never verified in one pass cheaply


def check_draft_tokens(tokens: object) -> int:
    """``tokens`` if it is a number of draft tokens that can be verified; else one line saying why."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_DRAFT_TOKENS:
        raise UserError(f"draft tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {tokens!r} "
                        "(--draft-tokens)")
    return tokens


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
    ends after emitting one of them (None: the tokenizer's ``<|endoftext|>`` when generating text,
    none when generating token ids); ``stop_strings``: a row ends once its new text contains one.
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
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    num_samples: int = 1
    seed: int | None = None
    truncate: bool = False
    at_window: AtWindow = "error"

    def __post_init__(self) -> None:
        self._check_finite()
        self._check_sampling()
        self._check_penalties()
        if self.num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.at_window not in ("error", "stop", "slide"):
            raise UserError(f"at_window must be 'error', 'stop' or 'slide', got {self.at_window!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed not in SEEDS):
            raise UserError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if any(not s for s in self.stop_strings):
            raise UserError("stop strings must not be empty")
        # Sequences arrive as lists from users and the CLI; tuples keep the config hashable.
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        object.__setattr__(self, "logit_bias", tuple(sorted(dict(self.logit_bias).items())))

    def _check_finite(self) -> None:
        """Refuse infinite and NaN settings (JSON's ``Infinity`` and ``--temperature inf`` parse)."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value}")
        for token, bias in dict(self.logit_bias).items():
            if isinstance(bias, float) and not math.isfinite(bias):
                raise UserError(f"logit_bias must be finite numbers, got {bias} for token {token}")

    def _check_sampling(self) -> None:
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

    def _check_penalties(self) -> None:
        if not self.repetition_penalty > 0:
            raise UserError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UserError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if any(not isinstance(t, int) or t < 0 for t in dict(self.logit_bias)):
            keys = list(dict(self.logit_bias))
            raise UserError(f"logit_bias keys must be token ids (integers >= 0), got {keys}")

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
