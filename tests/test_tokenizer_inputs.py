"""The tokenizer on hostile input: runs of whitespace too long for tiktoken's regex engine, long runs of
one character in training, and a seeded fuzz of the round trip and of tiktoken-identical ids.

tiktoken panics on a run of about a million whitespace characters, so beyond that the reference is
tiktoken's BPE over a split made by the ``regex`` module (``Encoding._encode_only_native_bpe``), which
follows the same pattern with another engine.

Where a test bounds how long something takes (linear time, not quadratic), it measures the CPU time of
this process, which other processes on a busy machine do not lengthen, and not the wall-clock time.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import tiktoken
from conftest import run_cli

from gpt2.tokenizer.bpe import LONG_WHITESPACE, Tokenizer, train_tokenizer

UNDER_LIMIT = LONG_WHITESPACE + 1  # long enough for our cutting, short enough for tiktoken
BEYOND_LIMIT = 1_200_000  # tiktoken's regex engine overflows here
# Unicode's White_Space (what \s matches in GPT-2's pattern), and characters Python's str.isspace()
# calls space that it does not match.
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_WHITE_SPACE = "\x1c\x1d\x1e\x1f\u200b\ufeff"
RUNS = [" ", "\n", "\t", " \n", "\n\n \t", "\u3000", "\xa0", " \xa0\u2009\n", WHITE_SPACE]
BEFORE = ["", "x", "word ", "7."]
AFTER = ["", "word", "Word", "7", "!", "'s", "\x1c", "\u3000x", "\u00e9t\u00e9"]


def run_of(chars: str, n: int) -> str:
    """``chars`` repeated to exactly ``n`` characters."""
    return (chars * (n // len(chars) + 1))[:n]


@pytest.mark.parametrize("chars", RUNS, ids=ascii)
def test_long_whitespace_runs_give_tiktoken_ids(
    gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding, chars: str
) -> None:
    """Runs just long enough to be cut out, before and after words, digits, punctuation, contractions,
    other whitespace and the end of the text, give tiktoken's ids for the whole text."""
    for before in BEFORE:
        for after in AFTER:
            text = before + run_of(chars, UNDER_LIMIT) + after
            assert gpt2_tokenizer.encode(text) == reference_encoding.encode_ordinary(text), (before, after)


def test_whitespace_runs_of_every_length_near_the_cut(
    gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding
) -> None:
    """Lengths on both sides of where cutting starts, and several long runs in one text."""
    for n in (LONG_WHITESPACE - 1, LONG_WHITESPACE, LONG_WHITESPACE + 1, 3 * LONG_WHITESPACE + 5):
        for text in (run_of(" \n", n), run_of("\n", n) + "a", "a" + run_of("\t ", n) + " b"):
            assert gpt2_tokenizer.encode(text) == reference_encoding.encode_ordinary(text), n
    text = "".join(f"part {i}" + run_of(RUNS[i], UNDER_LIMIT + i) for i in range(len(RUNS)))
    assert gpt2_tokenizer.encode(text) == reference_encoding.encode_ordinary(text)


def test_many_runs_just_too_short_to_cut_take_linear_time(
    gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding
) -> None:
    """Finding long runs does not rescan short ones: 1.3 million characters of runs one short of being
    cut (a regex such as ``\\s{65536,}`` takes over a minute on half of this)."""
    text = ("x" + " " * (LONG_WHITESPACE - 1)) * 20
    start = time.process_time()
    ids = gpt2_tokenizer.encode(text)
    seconds = time.process_time() - start
    assert ids == reference_encoding.encode_ordinary(text)
    assert seconds < 5, f"{seconds:.1f} CPU s to encode {len(text):,} characters"


@pytest.mark.parametrize("chars", [" ", " \n\t", "\u3000", "\n"], ids=ascii)
def test_whitespace_runs_beyond_tiktokens_limit(
    gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding, chars: str
) -> None:
    """Runs of over a million characters encode in well under a second a time, to the ids of the
    ``regex``-split reference, and decode back to the text."""
    for text in (run_of(chars, BEYOND_LIMIT), "I" + run_of(chars, BEYOND_LIMIT) + " am."):
        start = time.process_time()
        ids = gpt2_tokenizer.encode(text)
        seconds = time.process_time() - start
        assert ids == reference_encoding._encode_only_native_bpe(text)
        assert gpt2_tokenizer.decode(ids) == text
        assert seconds < 5, f"{seconds:.1f} CPU s to encode {len(text):,} characters"


def test_long_runs_with_special_tokens_and_batches(
    gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding
) -> None:
    """A run that ends just before an allowed special token is a run at the end of a text, as in
    tiktoken; ``encode_batch`` gives what ``encode`` gives."""
    eot = "<|endoftext|>"
    text = run_of(" ", UNDER_LIMIT) + eot + run_of("\n ", UNDER_LIMIT) + "x" + eot + run_of("\t", UNDER_LIMIT)
    expected = reference_encoding.encode(text, allowed_special="all")
    assert gpt2_tokenizer.encode(text, allowed_special="all") == expected
    assert gpt2_tokenizer.encode(text, allowed_special={eot}) == expected
    assert gpt2_tokenizer.encode_batch([text, "hi"], allowed_special="all") == [expected, [5303]]
    assert gpt2_tokenizer.encode(text) == reference_encoding.encode_ordinary(text)

    huge = "a" + run_of(" ", BEYOND_LIMIT) + eot + run_of("\n", BEYOND_LIMIT)
    reference = reference_encoding._encode_only_native_bpe
    ids = [*reference("a" + run_of(" ", BEYOND_LIMIT)), 50256, *reference(run_of("\n", BEYOND_LIMIT))]
    assert gpt2_tokenizer.encode(huge, allowed_special="all") == ids
    assert gpt2_tokenizer.encode_batch([huge, "hi"], num_threads=2) == [reference(huge), [5303]]


def fuzz_texts(seed: int, count: int) -> list[str]:
    """``count`` texts drawn from ``random.Random(seed)``: random bytes read as UTF-8 with replacement,
    random code points (no surrogates), text with whitespace and punctuation, and runs of one
    character or of whitespace up to 120,000 long, alone or between the others."""
    rng = random.Random(seed)
    alphabet = "ab Z9 0.,'!?\n\t-\u00e9\u4e2d\U0001f600\u3000\xa0" + NOT_WHITE_SPACE

    def short() -> str:
        kind = rng.randrange(3)
        n = rng.randrange(1, 60)
        if kind == 0:
            return rng.randbytes(n).decode("utf-8", errors="replace")
        if kind == 1:
            return "".join(chr(rng.choice([rng.randrange(0xD800), rng.randrange(0xE000, 0x110000)]))
                           for _ in range(n))
        return "".join(rng.choice(alphabet) for _ in range(n))

    def long_run() -> str:
        chars = rng.choice([*RUNS, "a", "7", ".", "\u4e2d", "'s", "ab"])
        return run_of(chars, rng.choice([rng.randrange(1, 2000), rng.randrange(LONG_WHITESPACE, 120_000)]))

    texts = []
    for _ in range(count):
        parts = [short() if rng.random() < 0.8 else long_run() for _ in range(rng.randrange(1, 6))]
        texts.append("".join(parts))
    return texts


def test_fuzz_round_trip_and_tiktoken_ids(
    gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding
) -> None:
    """200 seeded random texts under tiktoken's limit: our ids are tiktoken's, and decode gives the text
    back; a few beyond the limit match the ``regex``-split reference."""
    for i, text in enumerate(fuzz_texts(seed=11, count=200)):
        ids = gpt2_tokenizer.encode(text)
        assert ids == reference_encoding.encode_ordinary(text), (i, text[:80])
        assert gpt2_tokenizer.decode(ids) == text, (i, text[:80])
    rng = random.Random(12)
    for i in range(4):
        run = run_of(rng.choice(RUNS), BEYOND_LIMIT + i)
        text = rng.choice(["", "x", "\u00e9 "]) + run + rng.choice(AFTER)
        ids = gpt2_tokenizer.encode(text)
        assert ids == reference_encoding._encode_only_native_bpe(text), (i, text[-10:])
        assert gpt2_tokenizer.decode(ids) == text


def test_cli_encodes_a_million_spaces(
    capsys: pytest.CaptureFixture, gpt2_ranks_file: Path, reference_encoding: tiktoken.Encoding
) -> None:
    """``gpt2 tokenizer encode`` on 1,000,000 spaces, alone and before a word: GPT-2 has no token for two
    spaces, so tiktoken gives one id per space on shorter runs, and we do on this one; no traceback."""
    space = reference_encoding.encode_ordinary(" ")
    assert reference_encoding.encode_ordinary(" " * 1000) == space * 1000
    space_word = reference_encoding.encode_ordinary(" word")
    assert reference_encoding.encode_ordinary(" " * 1000 + "word") == space * 999 + space_word
    code, out, err = run_cli(capsys, "tokenizer", "encode", "--tokenizer", gpt2_ranks_file, " " * 1_000_000)
    assert (code, err) == (0, "")
    assert out.split() == [str(space[0])] * 1_000_000
    code, out, err = run_cli(capsys, "tokenizer", "encode", "--tokenizer", gpt2_ranks_file,
                             " " * 1_000_000 + "word")
    assert (code, err) == (0, "")
    ids = list(map(int, out.split()))
    assert ids == space * 999_999 + space_word


def test_training_on_a_long_run_of_one_character_is_fast(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """``gpt2 tokenizer train`` on 20,000 'a's (45 s in the check of each merge when that was quadratic;
    about 0.1 s in the trainer underneath): the vocabulary it saves encodes the run and decodes back."""
    corpus = tmp_path / "a.txt"
    corpus.write_text("a" * 20_000 + "\nab " * 50)
    start = time.process_time()
    code, _, err = run_cli(capsys, "tokenizer", "train", corpus, "--vocab-size", 400, "--out",
                           tmp_path / "tok")
    seconds = time.process_time() - start
    assert (code, err) == (0, ""), err
    assert seconds < 10, f"{seconds:.1f} CPU s to train and save"
    tokenizer = Tokenizer.from_pretrained(tmp_path / "tok")
    text = "a" * 20_000 + "\nab"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("a" * 20_000)) < 20
    assert tokenizer.merges() == train_tokenizer([corpus], 400).merges()
