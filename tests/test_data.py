"""Data preparation and loading: llm.c shards, corpora, the validation split, the DDP-aware loader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
from conftest import assert_one_line_error, run_cli

from gpt2 import Tokenizer, UserError
from gpt2.data.loader import ShardLoader
from gpt2.data.prepare import VAL_PIECE_TOKENS, Corpus, prepare
from gpt2.data.shards import find_shards, read_shard, write_shard

EOT = 50256  # GPT-2's <|endoftext|>

# The fixtures gpt2_tokenizer and reference_encoding (tiktoken's own GPT-2 encoding) are conftest's.


def spec_shard(tokens: list[int]) -> bytes:
    """An llm.c shard byte by byte: 256 little-endian int32 (magic, version, count, zeros), uint16s."""
    header = struct.pack("<256i", 20240520, 1, len(tokens), *([0] * 253))
    return header + struct.pack(f"<{len(tokens)}H", *tokens)


# ---------------------------------------------------------------------------------------------
# Shards


def test_shard_written_from_the_header_spec_reads_back_and_ours_is_identical(tmp_path: Path) -> None:
    tokens = [0, 1, 2, 50256, 65535, 12345, 7]
    (tmp_path / "spec.bin").write_bytes(spec_shard(tokens))
    assert read_shard(tmp_path / "spec.bin").tolist() == tokens
    write_shard(tmp_path / "ours.bin", np.array(tokens))
    assert (tmp_path / "ours.bin").read_bytes() == spec_shard(tokens)


@pytest.mark.parametrize(
    ("header", "body", "words"),
    [
        ((1234, 1, 3), b"\0" * 6, ["magic number 1234"]),
        ((20240520, 2, 3), b"\0" * 12, ["version 2"]),
        ((20240520, 1, 10), b"\0" * 6, ["truncated"]),
    ],
)
def test_shard_with_a_wrong_header_is_refused(
    tmp_path: Path, header: tuple, body: bytes, words: list
) -> None:
    path = tmp_path / "bad_train_000000.bin"
    path.write_bytes(struct.pack("<256i", *header, *([0] * 253)) + body)
    with pytest.raises(UserError) as e:
        read_shard(path)
    assert str(path) in str(e.value) and all(w in str(e.value) for w in words)
    path.write_bytes(b"tiny")
    with pytest.raises(UserError, match="too short"):
        read_shard(path)


# ---------------------------------------------------------------------------------------------
# Preparing


def write_corpus(root: Path) -> list[str]:
    """A directory with .txt files (one nested) and a .jsonl file; its documents in reading order."""
    docs = [
        "First document.\nWith two lines.",
        "Second: a JSON record",
        "Third, <|endoftext|> as text",
        "Fourth document, in a subdirectory.\n",
    ]
    root.mkdir()
    (root / "a.txt").write_text(docs[0])
    (root / "b.jsonl").write_text(
        json.dumps({"text": docs[1]}) + "\n\n" + json.dumps({"text": docs[2]}) + "\n"
    )
    (root / "sub").mkdir()
    (root / "sub" / "c.txt").write_text(docs[3])
    (root / "ignored.bin").write_bytes(b"\0\1\2")  # not .txt/.jsonl: not read from a directory
    return docs


def test_prepare_writes_eot_separated_documents_in_shards_of_the_given_size(
    tmp_path: Path, gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding
) -> None:
    docs = write_corpus(tmp_path / "corpus")
    counts = prepare(Corpus([tmp_path / "corpus"]), tmp_path / "out", tokenizer=gpt2_tokenizer,
                     shard_tokens=10, val_fraction=0.0, progress=False)
    expected = [t for d in docs for t in [EOT, *reference_encoding.encode_ordinary(d)]]
    shards = find_shards(tmp_path / "out", "train")
    assert [len(read_shard(s)) for s in shards[:-1]] == [10] * (len(shards) - 1)
    assert np.concatenate([read_shard(s) for s in shards]).tolist() == expected
    assert counts == {"train": len(expected), "val": 0} and not find_shards(tmp_path / "out", "val")
    saved = Tokenizer.from_pretrained(tmp_path / "out")  # the tokenizer travels with the shards
    assert saved.encode(docs[0]) == reference_encoding.encode_ordinary(docs[0])


def test_validation_split_takes_evenly_spread_pieces(tmp_path: Path, gpt2_tokenizer: Tokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(12_000))  # ~24k tokens: 6 pieces
    (tmp_path / "c.txt").write_text(text)
    prepare(Corpus([tmp_path / "c.txt"]), tmp_path / "out", tokenizer=gpt2_tokenizer, val_fraction=0.25,
            progress=False)
    stream = [EOT, *gpt2_tokenizer.encode(text)]
    pieces = [stream[i : i + VAL_PIECE_TOKENS] for i in range(0, len(stream), VAL_PIECE_TOKENS)]
    assert len(pieces) >= 5
    val = np.concatenate([read_shard(s) for s in find_shards(tmp_path / "out", "val")]).tolist()
    train = np.concatenate([read_shard(s) for s in find_shards(tmp_path / "out", "train")]).tolist()
    assert val == [t for i, p in enumerate(pieces) if i % 4 == 3 for t in p]  # every 4th piece
    assert train == [t for i, p in enumerate(pieces) if i % 4 != 3 for t in p]


def test_small_corpus_still_gets_a_validation_piece(tmp_path: Path, gpt2_tokenizer: Tokenizer) -> None:
    (tmp_path / "c.txt").write_text("one two three " * 2000)
    counts = prepare(Corpus([tmp_path / "c.txt"]), tmp_path / "out", tokenizer=gpt2_tokenizer,
                     val_fraction=0.01, progress=False)
    assert counts["val"] > 0 and counts["train"] > 0


def test_prepare_cli_trains_a_tokenizer_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    write_corpus(tmp_path / "corpus")
    code, out, _ = run_cli(capsys, "prepare", tmp_path / "corpus", "--vocab-size", "300", "--out",
                           tmp_path / "out", "--val-fraction", "0")
    assert code == 0 and "training" in out
    tokenizer = Tokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.n_vocab <= 300
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    code, _, err = run_cli(
        capsys, "prepare", tmp_path / "corpus", "--vocab-size", "280", "--out", tmp_path / "out"
    )
    assert_one_line_error(code, err, "--overwrite")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_vocabulary_too_large_for_uint16_is_refused(tmp_path: Path) -> None:
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({f"<{i}>".encode(): 256 + i for i in range(70_000)})
    (tmp_path / "c.txt").write_text("some text")
    with pytest.raises(UserError, match="uint16"):
        prepare(Corpus([tmp_path / "c.txt"]), tmp_path / "out", tokenizer=Tokenizer(ranks), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", ["empty"]),
        (b" \n\n\t ", ["empty"]),
        (b"text\x00\x01\x02 more", ["binary", "c.txt"]),
    ],
    ids=["empty", "blank", "binary"],
)
def test_bad_corpus_is_one_error_line_and_the_output_is_kept(
    tmp_path: Path, capsys, gpt2_ranks_file: Path, content: bytes, words: list
) -> None:
    (tmp_path / "c.txt").write_bytes(content)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.bin").write_bytes(b"precious")
    code, _, err = run_cli(capsys, "prepare", tmp_path / "c.txt", "--tokenizer", gpt2_ranks_file, "--out",
                           tmp_path / "out", "--overwrite")
    assert_one_line_error(code, err, *words)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.bin"]
    assert (tmp_path / "out" / "keep.bin").read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary debris


def test_invalid_utf8_is_replaced_with_a_warning_giving_the_count(
    tmp_path: Path, capsys, caplog, gpt2_ranks_file: Path, gpt2_tokenizer: Tokenizer
) -> None:
    # 0xFF and 0xFE never occur in UTF-8, and a lone continuation byte 0x80 is invalid: 3 sequences.
    # A U+FFFD written in the file (EF BF BD) is valid text and not counted.
    (tmp_path / "c.txt").write_bytes(b"caf\xc3\xa9 \xff\xfe ok \x80 \xef\xbf\xbd end")
    code, _, _ = run_cli(capsys, "prepare", tmp_path / "c.txt", "--tokenizer", gpt2_ranks_file, "--out",
                         tmp_path / "out", "--val-fraction", "0")
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if "invalid UTF-8" in r.getMessage()]
    assert len(warnings) == 1 and "c.txt: 3 invalid UTF-8 sequences" in warnings[0]
    tokens = np.concatenate([read_shard(s) for s in find_shards(tmp_path / "out", "train")]).tolist()
    assert gpt2_tokenizer.decode(tokens[1:]) == "café \ufffd\ufffd ok \ufffd \ufffd end"


def test_missing_input_and_bad_jsonl_are_one_line_errors(
    tmp_path: Path, capsys, gpt2_ranks_file: Path
) -> None:
    code, _, err = run_cli(
        capsys, "prepare", tmp_path / "nope.txt", "--tokenizer", gpt2_ranks_file, "--out", tmp_path / "out"
    )
    assert_one_line_error(code, err, "nope.txt")
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    code, _, err = run_cli(
        capsys, "prepare", tmp_path / "c.jsonl", "--tokenizer", gpt2_ranks_file, "--out", tmp_path / "out"
    )
    assert_one_line_error(code, err, "c.jsonl:2", "text")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    """Three shards of consecutive numbers, of different lengths."""
    paths, start = [], 0
    for i, n in enumerate([1000, 650, 1301]):
        paths.append(tmp_path / f"d_train_{i:06d}.bin")
        write_shard(paths[-1], np.arange(start, start + n) % 60_000)
        start += n
    return paths


def batches(loader: ShardLoader, n: int) -> list[torch.Tensor]:
    return [loader.next_batch()[0] for _ in range(n)]


def test_batches_are_next_token_pairs_and_an_epoch_visits_every_sample_once(shards: list[Path]) -> None:
    loader = ShardLoader(shards, batch_size=3, seq_len=16, seed=5)
    x, y = loader.next_batch()[:2]
    assert x.dtype == torch.int64 and x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
    loader.reset()
    per_epoch = loader.num_samples  # 62 + 40 + 81 samples of 16 (+1) tokens
    assert per_epoch == 999 // 16 + 649 // 16 + 1300 // 16
    starts = [int(row[0]) for b in batches(loader, per_epoch) for row in b]  # batch_size samples each
    firsts = starts[:per_epoch]
    assert len(set(firsts)) == per_epoch  # no sample twice within the epoch
    second = starts[per_epoch : 2 * per_epoch]
    assert set(second) == set(firsts) and second != firsts  # the next epoch is another order


def test_ranks_read_disjoint_parts_that_together_are_the_single_process_stream(shards: list[Path]) -> None:
    single = batches(ShardLoader(shards, batch_size=4, seq_len=8, seed=1), 120)
    rank0 = batches(ShardLoader(shards, batch_size=4, seq_len=8, seed=1, rank=0, world_size=2), 60)
    rank1 = batches(ShardLoader(shards, batch_size=4, seq_len=8, seed=1, rank=1, world_size=2), 60)
    assert all(torch.equal(a, b) for a, b in zip(single[0::2], rank0, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(single[1::2], rank1, strict=True))


def test_loader_position_restores_exactly_across_epochs(shards: list[Path]) -> None:
    loader = ShardLoader(shards, batch_size=5, seq_len=32, seed=3)
    batches(loader, 17)  # into the second epoch (91 samples per epoch)
    state = json.loads(json.dumps(loader.state_dict()))  # it is plain data
    expected = batches(loader, 25)
    restored = ShardLoader(shards, batch_size=5, seq_len=32, seed=3)
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(batches(restored, 25), expected, strict=True))


def test_shards_too_small_for_one_sequence_are_refused(tmp_path: Path) -> None:
    write_shard(tmp_path / "train_000000.bin", np.arange(10))
    with pytest.raises(UserError, match="fewer than one sequence"):
        ShardLoader([tmp_path / "train_000000.bin"], batch_size=1, seq_len=64)
