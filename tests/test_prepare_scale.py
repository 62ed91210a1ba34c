"""`gpt2 prepare` at scale: large files read and tokenised in pieces, with the ids of the whole file,
in bounded memory, and the same shards on any number of threads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from conftest import run_cli

from gpt2 import Tokenizer
from gpt2.data.prepare import Corpus, prepare
from gpt2.data.shards import find_shards, read_shard

EOT = 50256  # GPT-2's <|endoftext|>

# Text that is hard to cut: whitespace runs of every kind around line breaks (a cut inside or after one
# changes the ids), CRLF lines, non-ASCII whitespace and CJK text before newlines, invalid UTF-8.
TRICKY = [
    b"plain words here\n",
    b"trailing spaces   \n  leading spaces\n",
    b"a long run" + b" " * 300 + b"\n" * 50 + b"\t" * 40 + b"  \n then words\n",
    b"windows line\r\nand another\r\n\r\n",
    "ideographic space\u3000\nno-break\u00a0\n".encode(),
    "\u4e2d\u6587\u7684\u53e5\u5b50\u3002\n\u7b2c\u4e8c\u884c\n".encode(),
    b"bad \xff\xfe bytes \x80\n",
    b"words\n\n\n\nafter blank lines\n \n \n",
    b"x\ny\nz\n",
]


def tricky_text(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return b"".join(TRICKY[i] for i in rng.integers(0, len(TRICKY), n)) + b"  \n\n   "


def train_tokens(out: Path) -> list[int]:
    return np.concatenate([read_shard(s) for s in find_shards(out, "train")]).tolist()


@pytest.mark.parametrize("piece_bytes", [1, 64, 4096])
def test_a_file_read_in_many_pieces_has_the_ids_of_the_whole_file(
    tmp_path: Path, gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding, piece_bytes: int
) -> None:
    (tmp_path / "corpus").mkdir()
    files = [tricky_text(400, seed=0), tricky_text(300, seed=1)]
    for i, data in enumerate(files):
        (tmp_path / "corpus" / f"{i}.txt").write_bytes(data)
    corpus = Corpus([tmp_path / "corpus"], piece_bytes=piece_bytes)
    starts = [starts_document for _, starts_document in corpus.pieces()]
    assert starts.count(True) == 2 and len(starts) > 10  # two documents, many pieces each

    prepare(corpus, tmp_path / "out", tokenizer=gpt2_tokenizer, shard_tokens=1000, val_fraction=0.0,
            progress=False)
    whole = [t for data in files
             for t in [EOT, *reference_encoding.encode_ordinary(data.decode("utf-8", errors="replace"))]]
    assert train_tokens(tmp_path / "out") == whole


# The process's own high-water mark (VmHWM, KB): ru_maxrss would start at the parent's (pytest's) peak,
# which Linux carries over across exec, and hide the growth.
MEASURE = """
import json, re, sys
from gpt2.data.prepare import Corpus, prepare
from gpt2.tokenizer.bpe import Tokenizer
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
tokenizer = Tokenizer.from_file(sys.argv[1])
before = peak()
counts = prepare(Corpus([sys.argv[2]]), sys.argv[3], tokenizer=tokenizer, shard_tokens=1_000_000,
                 num_threads=2, progress=False)
after = peak()
print(json.dumps({"growth_mb": (after - before) / 1024, "tokens": counts["train"] + counts["val"]}))
"""


def test_a_12_mb_file_is_prepared_in_bounded_memory(
    tmp_path: Path, gpt2_ranks_file: Path, shakespeare_files: list[Path]
) -> None:
    text = b"".join(f.read_bytes() for f in shakespeare_files)
    big = tmp_path / "big.txt"
    with big.open("wb") as f:
        while f.tell() < 12_000_000:
            f.write(text)
    result = subprocess.run([sys.executable, "-c", MEASURE, gpt2_ranks_file, big, tmp_path / "out"],
                            capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout)
    assert measured["tokens"] > 3_000_000
    # Reading the file whole took about 200 MB more; its pieces and 1M-token shards take about 60.
    assert measured["growth_mb"] < 120, measured


def test_two_threads_write_the_same_shards_as_one(
    tmp_path: Path, capsys, gpt2_ranks_file: Path, shakespeare_files: list[Path]
) -> None:
    (tmp_path / "corpus").mkdir()
    for f in shakespeare_files[:6]:
        (tmp_path / "corpus" / f.name).write_bytes(f.read_bytes())
    shards = []
    for threads in (1, 2):
        out = tmp_path / f"out{threads}"
        code, stdout, _ = run_cli(capsys, "prepare", tmp_path / "corpus", "--tokenizer", gpt2_ranks_file,
                                  "--out", out, "--shard-size", "50000", "--val-fraction", "0.1",
                                  "--threads", threads)
        assert code == 0 and stdout.startswith("wrote ")
        shards.append({p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))})
    assert len(shards[0]) > 4 and any(name.startswith("val_") for name in shards[0])
    assert shards[0] == shards[1]


def test_invalid_utf8_in_many_pieces_is_counted_for_the_whole_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, gpt2_tokenizer: Tokenizer
) -> None:
    (tmp_path / "c.txt").write_bytes(b"bad \xff byte\n" * 3000)  # 3000 pieces of 12 bytes: 3 batches
    prepare(Corpus([tmp_path / "c.txt"], piece_bytes=12), tmp_path / "out", tokenizer=gpt2_tokenizer,
            progress=False)
    warnings = [r.getMessage() for r in caplog.records if "invalid UTF-8" in r.getMessage()]
    assert warnings == [f"warning: {tmp_path / 'c.txt'}: 3000 invalid UTF-8 sequences replaced with U+FFFD"]
