"""Telling GPT-2's text from people's: zero-shot statistics of a text under a GPT-2 model.

OpenAI staged GPT-2's release over worries about misuse and published studies of detecting its
output (Solaiman et al. 2019). The detector here needs no training, only the model that may have
written the text. At each position it compares the token actually there with what the model would
have drawn itself:

- the **sampling discrepancy** of Fast-DetectGPT (Bao et al. 2024), in its analytic form: the text's
  log-likelihood minus the log-likelihood expected of the model's own samples, in standard deviations
  of the latter, ``sum_t (log p(x_t) - mu_t) / sqrt(sum_t var_t)`` where ``mu_t`` and ``var_t`` are
  the mean and variance of ``log p`` under the model's distribution at position ``t``. For text drawn
  from the model's full distribution at temperature 1 it is about N(0, 1) at any length, and no
  likelihood statistic tells such text from people's (Solaiman et al. found the same). Text sampled
  with top-k, top-p or a temperature below 1 (as people publish it) is likelier than that, by a
  margin per token, so its discrepancy grows with the square root of its length; people's text stays
  near 0 per token. The verdict therefore uses the **score**, the discrepancy divided by the square
  root of the number of tokens, whose threshold holds for texts of any length;
- the baselines it is compared with: mean log-likelihood, mean log-rank, and GLTR's histogram of
  ranks (Gehrmann et al. 2019: the share of tokens that were the model's top-10, 100, 1000 choice).

A verdict is a statistical judgement with error rates (measure them on your texts with
``calibrate``), never proof of who wrote a text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from gpt2.generation.config import GenerationConfig
from gpt2.tokenizer.bpe import Tokenizer
from gpt2.util.errors import UserError

if TYPE_CHECKING:  # torch and the model are imported by the Detector: ``gpt2 detect --help`` does without
    import torch

    from gpt2.model import Transformer

# Where people's text (below) and top-k 40 samples (above) parted on the Shakespeare demo model
# (benchmarks/detect.py): calibrate on your own texts for error rates you can quote.
DEFAULT_THRESHOLD = 0.25
# Below this many tokens no verdict is given: the score of a temperature-1 sample has a standard
# deviation of 1 / sqrt(tokens), too wide for any threshold to mean much.
MIN_TOKENS = 64
RANK_BUCKETS = (10, 100, 1000)  # GLTR's
# The statistics that calibration compares, each with the sign that makes higher mean "generated".
STATISTICS = {"score": 1, "log_likelihood": 1, "log_rank": -1, "top_10": 1}


@dataclass(frozen=True)
class Detection:
    """The statistics of one text (``tokens`` scored) and the verdict at ``threshold``."""

    tokens: int
    discrepancy: float  # Fast-DetectGPT's sampling discrepancy, in standard deviations
    score: float  # discrepancy / sqrt(tokens): what the verdict compares with the threshold
    log_likelihood: float  # mean log p(token), nats
    log_rank: float  # mean log of the token's rank among the model's choices (0 = always the top one)
    top_10: float  # shares of tokens within the model's top 10, 100 and 1000 choices (GLTR)
    top_100: float
    top_1000: float
    threshold: float

    @property
    def machine(self) -> bool:
        """True when the text looks generated: its score is above the threshold."""
        return self.score > self.threshold

    @property
    def verdict(self) -> str:
        """"generated", "human-like", or "too short" (under ``MIN_TOKENS`` tokens)."""
        if self.tokens < MIN_TOKENS:
            return "too short"
        return "generated" if self.machine else "human-like"

    @property
    def perplexity(self) -> float:
        return math.exp(-self.log_likelihood)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "perplexity": self.perplexity, "verdict": self.verdict}


@dataclass(frozen=True)
class Calibration:
    """Scores of people's passages and of the model's continuations of them, the threshold that
    keeps the false-positive rate (people's text called generated) at most ``max_false_positive``,
    and what it achieves; ``auroc`` for each statistic (1 = perfect, 0.5 = chance)."""

    threshold: float
    max_false_positive: float
    false_positive_rate: float
    true_positive_rate: float
    auroc: dict[str, float]
    human: list[Detection]
    machine: list[Detection]


class Detector:
    """Scores texts with ``model`` (the suspected writer) and calls them generated above ``threshold``.

    Texts longer than the context window are read in windows every ``stride`` tokens (default half the
    window), each token scored once with at least ``window - stride`` tokens of context when available.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        stride: int | None = None,
        batch_size: int = 8,
    ) -> None:
        from gpt2.evaluation.scoring import Scorer

        if not math.isfinite(threshold):
            raise UserError(f"the threshold must be a finite number, got {threshold}")
        self.scorer = Scorer(model, tokenizer, batch_size=batch_size)
        self.model, self.tokenizer, self.threshold = model, tokenizer, threshold
        self.stride = max(1, self.scorer.context // 2) if stride is None else stride

    def detect(self, text: str) -> Detection:
        """The statistics of ``text`` (read after ``<|endoftext|>``, as a document start)."""
        return self.detect_ids(self.tokenizer.encode(text))

    def detect_ids(self, ids: Sequence[int]) -> Detection:
        """The statistics of the token ids ``ids``."""
        import torch

        if len(ids) < 2:
            raise UserError(f"a text of {len(ids)} token(s) is too short to judge; give at least a sentence")
        stats = [_token_stats(logits, torch.tensor(targets, device=logits.device)) for logits, targets
                 in self.scorer.window_logits([[self.tokenizer.eot_token, *ids]], stride=self.stride)]
        logprob, mean, variance, rank = (torch.cat(s).double() for s in zip(*stats, strict=True))
        discrepancy = float((logprob - mean).sum() / variance.sum().clamp(min=1e-12).sqrt())
        return Detection(
            tokens=len(logprob),
            discrepancy=discrepancy,
            score=discrepancy / math.sqrt(len(logprob)),
            log_likelihood=float(logprob.mean()),
            log_rank=float(rank.log().mean()),
            top_10=float((rank <= RANK_BUCKETS[0]).double().mean()),
            top_100=float((rank <= RANK_BUCKETS[1]).double().mean()),
            top_1000=float((rank <= RANK_BUCKETS[2]).double().mean()),
            threshold=self.threshold,
        )

    def calibrate(
        self,
        passages: Sequence[Sequence[int]],
        *,
        prompt_tokens: int = 20,
        max_false_positive: float = 0.01,
        sampling: GenerationConfig | None = None,
    ) -> Calibration:
        """Measure the detector on people's ``passages`` (token ids, all of one length) against the
        model's continuations of their first ``prompt_tokens`` tokens, sampled as ``sampling`` says
        (default: plain sampling with seed 0; its length and logit bias are set here), and set
        ``self.threshold`` to the lowest value that calls at most ``max_false_positive`` of the
        passages generated."""
        import torch

        from gpt2.generation.sampling import generate

        lengths = {len(p) for p in passages}
        if len(passages) < 2 or len(lengths) != 1:
            raise UserError("calibration needs at least 2 passages of people's text, all of one length")
        (length,) = lengths
        if not 0 < prompt_tokens < length - 1:
            raise UserError(f"the prompt ({prompt_tokens} tokens) must be shorter than the passages "
                            f"({length} tokens) by at least 2")
        if not 0 <= max_false_positive < 1:
            raise UserError(f"the false-positive rate must be in [0, 1), got {max_false_positive}")
        prompts = torch.tensor([list(p[:prompt_tokens]) for p in passages], device=self.scorer.device)
        never_end = {self.tokenizer.eot_token: -100.0}  # a passage's continuation, not a new document
        sampling = sampling or GenerationConfig(seed=0)
        config = sampling.replace(max_new_tokens=length - prompt_tokens, logit_bias=never_end)
        sampled = generate(self.model, prompts, config)
        human = [self.detect_ids(list(p)) for p in passages]
        machine = [self.detect_ids(row.tolist()) for row in sampled]
        scores = sorted((d.score for d in human), reverse=True)
        self.threshold = scores[int(max_false_positive * len(scores))]  # that many or fewer lie above
        human, machine = [_at(d, self.threshold) for d in human], [_at(d, self.threshold) for d in machine]
        auroc = {name: _auroc(machine, human, name, sign) for name, sign in STATISTICS.items()}
        return Calibration(self.threshold, max_false_positive, sum(d.machine for d in human) / len(human),
                           sum(d.machine for d in machine) / len(machine), auroc, human, machine)


def _token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per position: log p(target), the mean and variance of log p under the model's distribution,
    and the target's rank (1 = the model's likeliest token)."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, targets[:, None])
    probs = logprobs.exp()
    mean = (probs * logprobs).sum(dim=-1)
    variance = (probs * logprobs.square()).sum(dim=-1) - mean.square()
    rank = (logprobs > chosen).sum(dim=-1) + 1
    return chosen[:, 0].cpu(), mean.cpu(), variance.cpu(), rank.cpu()


def _auroc(positive: list[Detection], negative: list[Detection], statistic: str, sign: int) -> float:
    """The probability that a random positive's ``sign * statistic`` is above a random negative's
    (ties count half)."""
    pos = sign * np.array([getattr(d, statistic) for d in positive])[:, None]
    neg = sign * np.array([getattr(d, statistic) for d in negative])[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def _at(detection: Detection, threshold: float) -> Detection:
    return Detection(**{**asdict(detection), "threshold": threshold})


def split_passages(ids: Sequence[int], length: int, count: int) -> list[list[int]]:
    """Up to ``count`` non-overlapping passages of ``length`` tokens spread evenly over ``ids``."""
    if count < 2 or length < 1:
        raise UserError(f"calibration needs at least 2 passages of at least 1 token, asked for {count} of "
                        f"{length}")
    available = len(ids) // length
    if available < 2:
        raise UserError(f"the text has {len(ids)} tokens, too few for 2 passages of {length}; give more "
                        "text or shorter passages")
    picks = np.linspace(0, available - 1, min(count, available)).round().astype(int)
    return [list(ids[i * length : (i + 1) * length]) for i in dict.fromkeys(picks.tolist())]
