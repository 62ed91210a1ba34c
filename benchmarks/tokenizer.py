"""Encoding throughput on Shakespeare's works: tiktoken vs ours single-threaded, and our batch encoding
on 2 threads vs our single thread. Targets: ours >= 0.9x tiktoken; 2 threads >= 1.6x one thread.
Then pathological input: training a vocabulary on one long run of 'a', ours (``train_tokenizer``) vs
the ``tokenizers`` trainer underneath it; and encoding a million spaces, which tiktoken alone cannot.

    python benchmarks/tokenizer.py [RANKS_FILE]   # default $GPT2_SHARED_DATA/gpt2.tiktoken
"""

from __future__ import annotations

import base64
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken

from gpt2.data import corpora
from gpt2.tokenizer.bpe import ENDOFTEXT, GPT2_PATTERN, Tokenizer, train_tokenizer, trainer_merges

REPEATS = 5
RUN_LENGTHS = (30_000, 100_000)  # characters of the one-character training corpus


def ranks_file() -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("GPT2_SHARED_DATA", default)) / "gpt2.tiktoken"


def best_seconds(encode: Callable[[], object]) -> float:
    """The fastest of REPEATS runs, after one warm-up run."""
    encode()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        encode()
        times.append(time.perf_counter() - start)
    return min(times)


def seconds(work: Callable[[], object]) -> float:
    """The time one run of ``work`` takes."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def pathological(ours: Tokenizer) -> None:
    """Training on long runs of one character, and encoding a long run of whitespace."""
    with tempfile.TemporaryDirectory() as directory:
        for n in RUN_LENGTHS:
            corpus = Path(directory) / f"a{n}.txt"
            corpus.write_text("a" * n)
            underneath = seconds(lambda corpus=corpus: trainer_merges([corpus], 1000))
            total = seconds(lambda corpus=corpus: train_tokenizer([corpus], 1001))
            print(f"train on {n:>7,} 'a's      ours {total:6.2f} s   tokenizers trainer {underneath:6.2f} s")
    spaces = " " * 1_000_000
    print(f"encode 1,000,000 spaces  ours {seconds(lambda: ours.encode(spaces)):6.2f} s")


def main() -> None:
    path = ranks_file()
    ours = Tokenizer.from_file(path)
    lines = path.read_text().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    peer = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)})
    texts = [f.read_text(encoding="utf-8") for f in corpora.shakespeare()]
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    assert [ours.encode(t) for t in texts] == [peer.encode_ordinary(t) for t in texts]

    tiktoken_1 = best_seconds(lambda: [peer.encode_ordinary(t) for t in texts])
    ours_1 = best_seconds(lambda: [ours.encode(t) for t in texts])
    ours_2 = best_seconds(lambda: ours.encode_batch(texts, num_threads=2))

    print(f"Shakespeare: {len(texts)} texts, {megabytes:.2f} MB, best of {REPEATS}")
    print(f"tiktoken, 1 thread     {megabytes / tiktoken_1:8.2f} MB/s")
    print(f"ours, 1 thread         {megabytes / ours_1:8.2f} MB/s   {tiktoken_1 / ours_1:.2f}x tiktoken "
          "(target >= 0.9)")
    print(f"ours, batch, 2 threads {megabytes / ours_2:8.2f} MB/s   {ours_1 / ours_2:.2f}x ours on 1 thread "
          "(target >= 1.6)")
    pathological(ours)


if __name__ == "__main__":
    main()
