"""Detection: the statistics against a direct computation, windows over long texts, the behaviour the
criterion promises (temperature-1 samples about N(0, 1), top-k samples far above, other text below),
calibration, and the ``gpt2 detect`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BYTES, random_model, random_words, run_cli, saved_model_dir

from gpt2 import GPT2
from gpt2.evaluation.detection import MIN_TOKENS, Detector, split_passages
from gpt2.evaluation.scoring import Scorer
from gpt2.generation.sampling import GenerationConfig, generate
from gpt2.util.errors import UserError


def confident_model(n_positions: int = 256) -> GPT2:
    """A random 2-layer model over bytes, sharpened: next-token entropy about 3 nats, as in a trained
    model, not the initialisation's 5.5."""
    model = random_model(n_embd=64, n_positions=n_positions, tokenizer=BYTES).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def model() -> GPT2:
    return confident_model()


PEOPLE_WORDS = ["the", "king", "shall", "speak", "of", "love", "and", "war", "to", "night", ",", "."]


def people_text(n_chars: int, seed: int) -> str:
    """Text that the model did not write: random words."""
    return random_words(PEOPLE_WORDS, n_chars, seed)[:n_chars]


def test_statistics_equal_a_direct_computation(model: GPT2) -> None:
    text = people_text(120, seed=1)
    ids = BYTES.encode(text)
    got = Detector(model, BYTES).detect(text)
    with torch.no_grad():
        logits = model(torch.tensor([[BYTES.eot_token, *ids]]))[0, :-1].double().numpy()
    gaps, variances, ranks, logprobs = [], [], [], []
    for row, token in zip(logits, ids, strict=True):
        logp = row - row.max() - math.log(np.exp(row - row.max()).sum())
        p = np.exp(logp)
        mean = (p * logp).sum()
        gaps.append(logp[token] - mean)
        variances.append((p * (logp - mean) ** 2).sum())
        ranks.append(1 + (logp > logp[token]).sum())
        logprobs.append(logp[token])
    ranks = np.array(ranks)
    assert got.tokens == len(ids)
    assert got.discrepancy == pytest.approx(sum(gaps) / math.sqrt(sum(variances)), rel=1e-4)
    assert got.score == pytest.approx(got.discrepancy / math.sqrt(len(ids)))
    assert got.log_likelihood == pytest.approx(np.mean(logprobs), rel=1e-5)
    assert got.log_rank == pytest.approx(np.log(ranks).mean(), rel=1e-5)
    assert got.top_10 == pytest.approx((ranks <= 10).mean())
    assert got.top_100 == pytest.approx((ranks <= 100).mean())


def test_long_texts_are_read_in_windows_each_token_once() -> None:
    small = confident_model(n_positions=32)
    text = people_text(150, seed=2)
    ids = BYTES.encode(text)
    got = Detector(small, BYTES, stride=16).detect(text)
    assert got.tokens == len(ids)
    # The same windows as the evaluation's perplexity (its stream starts with <|endoftext|> here too).
    reference = Scorer(small, BYTES).perplexity([[BYTES.eot_token, *ids]], context=32, stride=16)
    assert got.log_likelihood == pytest.approx(-reference.nll / reference.tokens, rel=1e-5)


@pytest.mark.slow
def test_temperature_one_samples_score_like_a_standard_normal(model: GPT2) -> None:
    prompts = torch.full((40, 1), BYTES.eot_token)
    samples = generate(
        model, prompts, GenerationConfig(max_new_tokens=120, seed=0, logit_bias={BYTES.eot_token: -100.0})
    )
    detector = Detector(model, BYTES)
    scores = np.array([detector.detect_ids(row[1:].tolist()).discrepancy for row in samples])
    assert abs(scores.mean()) < 0.5 and 0.6 < scores.std() < 1.5


def test_calibration_separates_top_k_samples_from_people_s_text(model: GPT2) -> None:
    detector = Detector(model, BYTES)
    passages = split_passages(BYTES.encode(people_text(6000, seed=3)), 100, 30)
    assert len(passages) == 30 and {len(p) for p in passages} == {100}
    calibration = detector.calibrate(
        passages, sampling=GenerationConfig(top_k=5, seed=0), max_false_positive=0.1
    )
    assert calibration.auroc["score"] > 0.95
    assert calibration.false_positive_rate <= 0.1 and calibration.true_positive_rate > 0.9
    assert detector.threshold == calibration.threshold
    # Unseen texts of both kinds, judged at the calibrated threshold.
    config = GenerationConfig(max_new_tokens=100, top_k=5, seed=99, logit_bias={BYTES.eot_token: -100.0})
    sample = generate(model, torch.tensor([BYTES.encode("the king shall")]), config)
    assert detector.detect_ids(sample[0].tolist()).verdict == "generated"
    assert detector.detect(people_text(150, seed=4)).verdict == "human-like"


def test_short_texts_get_no_verdict_and_bad_input_is_refused(model: GPT2) -> None:
    detector = Detector(model, BYTES)
    assert detector.detect("x" * (MIN_TOKENS - 1)).verdict == "too short"
    with pytest.raises(UserError, match="too short"):
        detector.detect("x")
    with pytest.raises(UserError, match="2 passages"):
        split_passages(list(range(150)), 100, 10)
    with pytest.raises(UserError, match="at least 2 passages"):
        detector.calibrate([[1] * 50])
    with pytest.raises(UserError, match="false-positive rate"):
        detector.calibrate([[1] * 50, [2] * 50], max_false_positive=1.5)
    with pytest.raises(UserError, match="prompt"):
        detector.calibrate([[1] * 50, [2] * 50], prompt_tokens=49)


# ----------------------------------------------------------------------------------------------------
# gpt2 detect


@pytest.fixture(scope="module")
def model_dir(model: GPT2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_model_dir(model, tmp_path_factory)


def test_detect_command_table_json_and_calibration(model, model_dir: Path, tmp_path: Path, capsys) -> None:
    people = tmp_path / "people.txt"
    people.write_text(people_text(150, seed=5), encoding="utf-8")
    ascii_only = {token: -100.0 for token in range(128, BYTES.n_vocab)}  # so that the file is UTF-8
    sample = generate(model, torch.tensor([BYTES.encode("the king")]),
                      GenerationConfig(max_new_tokens=120, top_k=5, seed=1, logit_bias=ascii_only))
    machine = tmp_path / "machine.txt"
    machine.write_bytes(BYTES.decode_bytes(sample[0].tolist()))
    status, out, _ = run_cli(capsys, "detect", "--model", model_dir, "--file", people, "--file", machine)
    assert status == 0
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert lines[str(people)][3] == "human-like" and lines[str(machine)][3] == "generated"

    status, out, _ = run_cli(capsys, "detect", "--model", model_dir, "--file", people, "--json")
    (record,) = [json.loads(line) for line in out.splitlines()]
    expected = Detector(model, BYTES).detect(people.read_text(encoding="utf-8"))
    assert record["source"] == str(people) and record["score"] == pytest.approx(expected.score)

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(people_text(5000, seed=6), encoding="utf-8")
    status, out, err = run_cli(capsys, "detect", "--model", model_dir, "--calibrate", corpus,
                               "--passage-tokens", 100, "--passages", 20, "--top-k", 5,
                               "--max-false-positive", 0.1, "--file", machine)
    assert status == 0
    threshold = float(out.split("threshold ")[1].split(":")[0])
    assert "note:" not in err  # 20 passages can measure a 10% false-positive rate
    assert f"the score is above {threshold:.4f}" in out  # the calibrated threshold judges the file
    row = out.splitlines()[-2].split()
    assert row[0] == str(machine) and row[3] == "generated"
    _, _, err = run_cli(capsys, "detect", "--model", model_dir, "--calibrate", corpus, "--passage-tokens",
                        100, "--passages", 20)
    assert err.startswith("note: 20 passages cannot measure a false-positive rate of 1.0%")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([], "nothing to judge"),
        (["--file", "no-such-file.txt"], "no-such-file.txt: cannot read the text"),
        (["--text", "x"], "too short to judge"),
        (["--text", "x" * 100, "--stride", "0"], "stride must be between 1"),
    ],
)
def test_detect_command_bad_input(model_dir: Path, capsys, options: list[str], message: str) -> None:
    status, out, err = run_cli(capsys, "detect", "--model", model_dir, *options)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
