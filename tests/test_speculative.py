"""Speculative decoding in the decode loop, the Python API and the command line (issue 34): greedy
tokens identical to plain decoding for both drafters at every precision, sampling that keeps the
model's distribution (statistically, at fixed seeds), the fallback to plain decoding, and the bad
inputs, each one line."""

from __future__ import annotations

import itertools
import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
import torch
from conftest import BYTES, assert_one_line_error, random_model, run_cli, saved_model_dir
from scipy.stats import chi2

from gpt2 import GPT2
from gpt2.generation.config import ContextWindowReached, GenerationConfig
from gpt2.generation.logits import distribution
from gpt2.generation.sampling import generate, generate_text
from gpt2.generation.speculative import (
    Draft,
    Drafter,
    DraftModel,
    DraftSession,
    Pace,
    PromptLookup,
    accept,
    lookup,
)
from gpt2.inference.load import load_for_inference
from gpt2.util.errors import UserError

GREEDY = GenerationConfig(max_new_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model and a smaller draft model over the same 257 byte ids, saved (shapes the CPU kernels take
    at every precision)."""
    model = random_model(n_layer=2, n_head=2, n_embd=128, n_positions=128, seed=0, tokenizer=BYTES)
    small = random_model(n_layer=1, n_head=2, n_embd=64, n_positions=128, seed=1, tokenizer=BYTES)
    return saved_model_dir(model, tmp_path_factory), saved_model_dir(small, tmp_path_factory)


def prompts(n: int) -> list[torch.Tensor]:
    """``n`` prompts of 6 to 30 random byte ids, each repeating its first part (as a document quoted
    by its summary), so lookup finds drafts."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        part = torch.randint(0, 256, (1, 4 + i % 12), generator=g)
        out.append(torch.cat([part, part[:, : 2 + i % 5], part], dim=1))
    return out


def test_lookup_drafts_what_followed_the_latest_earlier_occurrence_of_the_last_tokens() -> None:
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3, 3, 1) == [7, 8, 1]  # the latest match of 1 2 3
    assert lookup([5, 6, 7, 5, 6], 5, 3, 1) == [7, 5, 6]  # 5 6, then what followed it
    assert lookup([4, 1, 2, 4], 2, 3, 2) == []  # no 2-gram earlier
    assert lookup([4, 1, 2, 4], 2, 3, 1) == [1, 2]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_greedy_tokens_are_plain_decodings_for_100_prompts_with_each_drafter(
    dirs: tuple[Path, Path], precision: str
) -> None:
    model = load_for_inference(dirs[0], precision=precision, device="cpu")
    small = load_for_inference(dirs[1], precision=precision, device="cpu")
    drafters = [PromptLookup(tokens=5), DraftModel(small, tokens=4)]
    for prompt in prompts(100):
        plain = generate(model, prompt, GREEDY)
        for draft in drafters:
            assert torch.equal(generate(model, prompt, GREEDY, draft=draft), plain), (draft.name, prompt)
    for draft in drafters:  # the drafts did the work: most were kept (random models repeat themselves)
        assert draft.stats.accepted > 0.3 * draft.stats.drafted > 100, (draft.name, draft.stats)


def test_stops_penalties_and_the_window_end_where_plain_decoding_ends(dirs: tuple[Path, Path]) -> None:
    model = GPT2.from_pretrained(dirs[0])
    small = GPT2.from_pretrained(dirs[1])
    texts = ["abcabcabc abcabc", "the cat the cat the", "xyzzy " * 5]
    settings = [GREEDY.replace(stop_strings=("ca", "zz")), GREEDY.replace(repetition_penalty=1.3),
                GREEDY.replace(frequency_penalty=0.7, presence_penalty=0.4, logit_bias={ord("a"): 2.0}),
                GREEDY.replace(stop_token_ids=(ord("c"), ord("y"))),
                GREEDY.replace(max_new_tokens=120, at_window="stop")]
    for text, config in itertools.product(texts, settings):
        def window(stops: bool = config.at_window == "stop") -> AbstractContextManager:
            return pytest.warns(ContextWindowReached) if stops else nullcontext()

        with window():
            plain = generate_text(model, BYTES, text, config)
        for draft in (PromptLookup(), DraftModel(small)):
            with window():
                assert generate_text(model, BYTES, text, config, draft) == plain, (text, config, draft.name)


def test_streamed_text_and_the_api_agree_with_plain_decoding(dirs: tuple[Path, Path]) -> None:
    model = GPT2.from_pretrained(dirs[0])
    ids = torch.tensor([list(b"one two one two one")])
    plain = model.generate(ids, max_new_tokens=30, temperature=0)
    assert torch.equal(model.generate(ids, max_new_tokens=30, temperature=0, draft=PromptLookup()), plain)
    steps = [int(t) for t, _ in model.stream(ids, max_new_tokens=30, temperature=0, draft=PromptLookup())]
    assert steps == plain[0, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------------------------------
# Sampling keeps the model's distribution


def _chi_square(counts: dict[tuple[int, ...], int], expected: dict[tuple[int, ...], float], n: int) -> float:
    """Pearson's statistic over the outcomes expected at least 5 times (the rest pooled), and its
    p-value."""
    big = [k for k, p in expected.items() if p * n >= 5]
    observed = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    wanted = [expected[k] * n for k in big] + [n * (1 - sum(expected[k] for k in big))]
    pairs = [(o, e) for o, e in zip(observed, wanted, strict=True) if e > 0]
    statistic = sum((o - e) ** 2 / e for o, e in pairs)
    return float(chi2.sf(statistic, len(pairs) - 1))


@pytest.mark.parametrize("q_kind", ["point", "spread"])
def test_accept_draws_from_the_models_distribution_whatever_the_draft(q_kind: str) -> None:
    """One position: drafts drawn from q (a point mass, as lookup's, or a distribution of their own, as a
    sampling draft model's), kept or replaced by ``accept``: the tokens come out distributed as p."""
    vocab, n = 8, 20_000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=g) * 1.5
    config = GenerationConfig(temperature=0.9, top_k=6)
    p = distribution(logits[None], config)[0]
    q = torch.softmax(torch.randn(vocab, generator=g), dim=0)
    counts: dict[tuple[int, ...], int] = {}
    for i in range(n):
        if q_kind == "point":
            draft, probs = i % vocab, None  # every token drafted in turn, even those p rules out
        else:
            draft, probs = int(torch.multinomial(q, 1, generator=g)), q
        token, _ = accept(logits, config, draft, probs, g)
        counts[(token,)] = counts.get((token,), 0) + 1
    expected = {(t,): float(p[t]) for t in range(vocab)}
    assert all(counts.get((t,), 0) == 0 for t in range(vocab) if p[t] == 0)  # top-k's cut kept
    assert _chi_square(counts, expected, n) > 1e-3


def test_sampled_sequences_keep_the_models_joint_distribution(dirs: tuple[Path, Path]) -> None:
    """Whole generations of three tokens over a six-token vocabulary, the second and third verified
    from drafts (prompt lookup and a sampling draft model): their frequencies match the model's exact
    probabilities of each sequence."""
    model = random_model(vocab_size=6, n_layer=1, n_head=2, n_embd=32, n_positions=16, seed=3).eval()
    small = random_model(vocab_size=6, n_layer=1, n_head=2, n_embd=32, n_positions=16, seed=4).eval()
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    config = GenerationConfig(max_new_tokens=3, temperature=1.0, top_p=0.95)
    expected = {}
    with torch.inference_mode():
        for seq in itertools.product(range(6), repeat=3):
            ids = torch.cat([prompt, torch.tensor([seq[:2]])], dim=1)
            p = distribution(model(ids)[0, -3:].float(), config)
            expected[seq] = math.prod(float(p[i, t]) for i, t in enumerate(seq))
    n = 2500
    for draft in (PromptLookup(tokens=2), DraftModel(small, tokens=2)):
        counts: dict[tuple[int, ...], int] = {}
        g = torch.Generator().manual_seed(1)
        for _ in range(n):
            seq = tuple(generate(model, prompt, config, generator=g, draft=draft)[0, 5:].tolist())
            counts[seq] = counts.get(seq, 0) + 1
        assert draft.stats.drafted > n // 2, draft.stats  # the drafts were verified, not skipped
        assert _chi_square(counts, expected, n) > 1e-3, draft.name


# ----------------------------------------------------------------------------------------------------
# Falling back, and what cannot be done


def test_drafts_that_keep_failing_are_given_up_for_a_while() -> None:
    pace = Pace(tokens=5)
    for _ in range(Pace.PATIENCE):
        assert pace.next(room=100) == 5
        pace.record(drafted=5, accepted=0)
    assert [pace.next(room=100) for _ in range(Pace.REST)] == [0] * Pace.REST
    assert pace.next(room=3) == 3  # then it tries again, within the room left


class Contrary(Drafter, DraftSession):
    """A drafter (users may write their own) whose drafts are always wrong: a token the text never holds."""

    def session(self, max_len: int) -> Contrary:
        return self

    def propose(self, history, k, config, generator) -> Draft:
        return Draft([256] * k)


def test_drafts_that_never_agree_cost_few_rounds_of_drafting(dirs: tuple[Path, Path]) -> None:
    model = GPT2.from_pretrained(dirs[0])
    draft = Contrary(tokens=7)
    config = GREEDY.replace(max_new_tokens=100)
    text = "a quiet line of text"
    assert generate_text(model, BYTES, text, config, draft) == generate_text(model, BYTES, text, config)
    # drafting every round would draft 7 tokens for each of the 99 after the first
    assert draft.stats.accepted == 0 and draft.stats.drafted < 0.25 * 7 * 99, draft.stats


def test_what_speculative_decoding_cannot_do_is_refused_in_one_line(dirs: tuple[Path, Path]) -> None:
    model = GPT2.from_pretrained(dirs[0])
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(UserError, match="one sequence at a time"):
        model.generate(ids, num_samples=2, draft=PromptLookup())
    with pytest.raises(UserError, match="cannot slide"):
        model.generate(ids, at_window="slide", draft=PromptLookup())
    other = random_model(vocab_size=300, n_layer=1, n_head=2, n_embd=64)
    with pytest.raises(UserError, match="vocabulary"):
        model.generate(ids, draft=DraftModel(other))
    for tokens in (0, 65, -1, 2.5):
        with pytest.raises(UserError, match="draft tokens must be an integer from 1 to 64"):
            PromptLookup(tokens=tokens)  # type: ignore[arg-type]


def test_the_command_line_decodes_speculatively_and_reports_acceptance(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    model, small = dirs
    common = ["generate", "--model", model, "--prompt", "to be or not to be, to be", "--preset", "greedy",
              "--max-new-tokens", "40"]
    code, plain, _ = run_cli(capsys, *common)
    assert code == 0
    for draft in ("lookup", small):
        code, out, err = run_cli(capsys, *common, "--draft", draft, "--draft-tokens", "4", "-v")
        assert (code, out) == (0, plain)
        assert "drafted tokens accepted" in err, err
    answer = ["task", "answer", "--model", model, "--text", "a b a b", "--question", "a?"]
    assert run_cli(capsys, *answer, "--draft", "lookup")[:2] == run_cli(capsys, *answer)[:2]


def test_bad_draft_options_are_one_line_errors(
    dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    model = dirs[0]
    common = ["generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "4"]
    other = saved_model_dir(random_model(vocab_size=300, n_layer=1, n_head=2, n_embd=64), tmp_path_factory)
    for extra, message in [(["--draft", "lookup", "--draft-tokens", "0"], "draft tokens must be"),
                           (["--draft", "lookup", "--draft-tokens", "1000"], "draft tokens must be"),
                           (["--draft-tokens", "3"], "--draft-tokens needs --draft"),
                           (["--draft", other], "vocabulary"),
                           (["--draft", "lookup", "--num-samples", "2", "--no-stream"], "one sequence"),
                           (["--draft", "lookup", "--at-window", "slide"], "cannot slide")]:
        code, _, err = run_cli(capsys, *common, *extra)
        assert_one_line_error(code, err, message)
    code, _, err = run_cli(capsys, *common, "--draft", model)  # as large as the model: said, not refused
    assert code == 0 and "not smaller than the model" in err, err
