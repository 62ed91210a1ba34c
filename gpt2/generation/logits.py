"""Choosing the next token from a model's logits: penalties and logit bias, then temperature, top-k,
top-p and min-p, then greedy or one draw. The decode loop (``gpt2.generation.sampling``), speculative
decoding's verification (``gpt2.generation.speculative``) and the serving engine all choose here, so a
token is chosen the same way everywhere."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gpt2.generation.config import GenerationConfig


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
    return invert(distribution(logits, config), uniform)


def distribution(logits: Tensor, config: GenerationConfig) -> Tensor:
    """The distribution (rows, vocab) that ``sample`` draws from for ``config`` (temperature, top-k,
    top-p, min-p), given float32 ``logits`` (rows, vocab) with the penalties applied."""
    return filter_logits(logits / config.temperature, config.top_k, config.top_p, config.min_p).softmax(-1)


def draw_from(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token (rows,) from each row of ``probs`` (rows, vocab; sums that need not be 1)."""
    return invert(probs, torch.rand(probs.shape[0], generator=generator, device=probs.device))


def invert(probs: Tensor, uniform: Tensor) -> Tensor:
    """The tokens (rows,) where each row's cumulative ``probs`` first passes ``uniform`` times its sum."""
    cdf = probs.cumsum(dim=-1)
    picked = torch.searchsorted(cdf, (uniform.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)[:, 0]
    return picked.clamp_(max=cdf.shape[1] - 1)  # rounding can leave the last cdf value below u
