"""`gpt2 prepare` on one long line (issue 32): a .txt file without line breaks, a long Parquet row or
JSON line, one huge chat example. Text is tokenised in pieces cut where GPT-2's pre-tokeniser ends a
token whatever surrounds the cut (``gpt2.tokenizer.bpe.safe_cut``), so the ids are those of the text
encoded whole; memory stays bounded whatever the length of a line: a 50 MB line without a line break
peaks under ``TXT_BOUND_MB``, a 50 MB Parquet row (which pyarrow holds whole) under
``PARQUET_BOUND_MB``, and a chat example over ``MAX_EXAMPLE_BYTES`` is refused in one line, read no
further."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from conftest import assert_one_line_error

from gpt2.data.chat import MAX_EXAMPLE_BYTES
from gpt2.data.prepare import PIECE_BYTES, Corpus, prepare
from gpt2.data.shards import find_shards, read_shard
from gpt2.tokenizer.bpe import Tokenizer, safe_cut

EOT = 50256
TXT_BOUND_MB = 400  # the peak of `gpt2 prepare` on a 50 MB line without a line break (was 920 MB)
PARQUET_BOUND_MB = 600  # ... on a 50 MB Parquet row (was 1,028 MB); pyarrow holds ~3x the row

# Characters of every class GPT-2's pre-tokeniser tells apart, and the pairs it treats specially:
# contractions (and an apostrophe before other letters), whitespace of every kind (Unicode's, and
# \x1c, which Python calls a space and tiktoken does not), CJK text and punctuation, combining marks,
# digits of other scripts, emoji, U+FFFD, a character newer than Python's Unicode tables.
ALPHABET = [*"abcxyzAZ019 '\"\n\t\r.,!?-_()", "'s", "'t", "'re", "'ll", "'d", "'m", "'ve", "'S", "  ",
            "\u00a0", "\u3000", "\x1c", "\x85", "\u4e2d", "\u6587", "\u3002", "\uff0c", "é", "e\u0301",
            "\u0663", "\u2167", "\U0001f600", "\ufffd", "\u2028", "\u200b", "ß", "\U0001fae8"]


def random_text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def test_text_cut_where_safe_cut_says_encodes_as_the_whole(reference_encoding: tiktoken.Encoding) -> None:
    checked = 0
    for seed in range(1500):
        text = random_text(random.Random(seed).randint(2, 24), seed)
        whole = reference_encoding.encode_ordinary(text)
        for lo in range(1, len(text)):
            cut = safe_cut(text, lo)
            if cut:
                assert cut >= lo
                pieces = reference_encoding.encode_ordinary(text[:cut]) + reference_encoding.encode_ordinary(
                    text[cut:])
                assert pieces == whole, (text[:cut], text[cut:])
                checked += 1
    assert checked > 5000


def line_of_words(n_bytes: int, seed: int) -> str:
    """Words, numbers, punctuation and CJK text on one line of about ``n_bytes`` bytes."""
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "don't", "café", "naïve", "2024", "3.14", "(hello)", "e-mail",
             "\u4e2d\u6587\u3002", "it's", "—", "x" * 40, "  ", "\t", "\U0001f600"]
    chunk = "".join(rng.choice(words) + rng.choice([" ", " ", "", "  "]) for _ in range(50_000))
    return (chunk * (n_bytes // len(chunk.encode()) + 1))[: n_bytes]


def shard_ids(out: Path) -> list[int]:
    return np.concatenate([read_shard(s) for s in find_shards(out, "train")]).tolist()


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_a_long_line_is_tokenised_in_pieces_with_the_ids_of_the_whole(
    suffix: str, tmp_path: Path, gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding
) -> None:
    # Over PIECE_BYTES: a Parquet row that long is decoded from pyarrow's bytes a piece at a time.
    text = line_of_words(PIECE_BYTES + 200_000, seed=1) + random_text(20_000, seed=2).replace("\n", " ")
    path = tmp_path / f"line{suffix}"
    if suffix == ".txt":
        path.write_text(text, encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    else:
        pq.write_table(pa.table({"text": [text]}), path)
    corpus = Corpus([path], piece_bytes=8192)
    assert sum(1 for _ in corpus.pieces()) > 1  # cut: the line did not come whole
    prepare(corpus, tmp_path / "out", tokenizer=gpt2_tokenizer, val_fraction=0.0, progress=False)
    assert shard_ids(tmp_path / "out") == [EOT, *reference_encoding.encode_ordinary(text)]


def test_text_with_no_safe_cut_is_cut_anyway_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "word.txt"
    path.write_text("a" * 50_000 + " b", encoding="utf-8")  # one "word" of 50,000 letters
    pieces = [text for text, _ in Corpus([path], piece_bytes=1000, max_piece_chars=10_000).pieces()]
    assert "".join(pieces) == "a" * 50_000 + " b" and max(map(len, pieces)) <= 11_000
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"warning: {path}: 10,000 characters with no place where GPT-2's tokens end whatever follows; cut "
        "there anyway (the ids at the cut may differ)"]


# Runs ARGV and prints the peak resident memory of it (MB): RUSAGE_CHILDREN in this small process, so
# the peak is the command's own, not pytest's (which a child forked from pytest would carry over).
PEAK = """
import json, resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"peak_mb": peak, "code": result.returncode, "out": result.stdout, "err": result.stderr}))
"""


def peak_of_prepare(gpt2_ranks_file: Path, path: Path, out: Path) -> dict:
    """`gpt2 prepare PATH` in a process of its own: its exit status, output and peak memory."""
    command = [sys.executable, "-m", "gpt2", "prepare", path, "--tokenizer", gpt2_ranks_file, "--out", out]
    result = subprocess.run([sys.executable, "-c", PEAK, *map(str, command)], capture_output=True, text=True,
                            check=True, timeout=600)
    return json.loads(result.stdout)


@pytest.mark.slow
def test_a_50_mb_line_without_a_line_break_is_prepared_in_bounded_memory(
    tmp_path: Path, gpt2_ranks_file: Path
) -> None:
    (tmp_path / "line.txt").write_text(line_of_words(50_000_000, seed=3), encoding="utf-8")
    measured = peak_of_prepare(gpt2_ranks_file, tmp_path / "line.txt", tmp_path / "out")
    assert measured["code"] == 0, measured["err"]
    assert sum(len(read_shard(s)) for s in find_shards(tmp_path / "out", "train")) > 10_000_000
    assert measured["peak_mb"] < TXT_BOUND_MB, measured["peak_mb"]


@pytest.mark.slow
def test_a_50_mb_parquet_row_is_prepared_in_bounded_memory(tmp_path: Path, gpt2_ranks_file: Path) -> None:
    pq.write_table(pa.table({"text": [line_of_words(50_000_000, seed=4), "a short row"]}),
                   tmp_path / "rows.parquet")
    measured = peak_of_prepare(gpt2_ranks_file, tmp_path / "rows.parquet", tmp_path / "out")
    assert measured["code"] == 0, measured["err"]
    assert measured["peak_mb"] < PARQUET_BOUND_MB, measured["peak_mb"]


@pytest.mark.parametrize("line", [1, 2])
def test_a_chat_example_too_long_for_any_window_is_refused_unread(
    line: int, tmp_path: Path, gpt2_ranks_file: Path
) -> None:
    examples = [{"prompt": "Say it.", "completion": "Yes."}]
    examples.insert(line - 1, {"prompt": "Say it all.", "completion": line_of_words(50_000_000, seed=5)})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(example) + "\n" for example in examples), encoding="utf-8")
    measured = peak_of_prepare(gpt2_ranks_file, data, tmp_path / "out")
    assert_one_line_error(measured["code"], measured["err"], f"chat.jsonl:{line}",
                          f"{MAX_EXAMPLE_BYTES:,} bytes", "split")
    assert measured["peak_mb"] < 200, measured["peak_mb"]  # far below the 50 MB line it did not read
