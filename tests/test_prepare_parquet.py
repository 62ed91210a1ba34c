"""`gpt2 prepare` on Parquet files: one document per row of a text column, read by pyarrow a batch of
rows at a time, with the tokens the same documents give as text files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from conftest import assert_one_line_error, run_cli

from gpt2 import Tokenizer
from gpt2.data.prepare import PARQUET_BATCH_ROWS, Corpus
from gpt2.data.shards import find_shards, read_shard

EOT = 50256  # GPT-2's <|endoftext|>

DOCS = [
    "First row.\nWith two lines.",
    None,  # a null row: skipped
    "Second: café, naïve, 東京 🤖",
    "   \n",  # blank: skipped, as a blank .txt file or .jsonl record is
    "Third, <|endoftext|> as text",
    "Fourth\n\n\nwith   runs of    whitespace \t",
    "Fifth row, in the third row group.",
]


def write_parquet(path: Path, texts: list[str | None], *, row_group_size: int = 3, **columns: list) -> Path:
    """A Parquet file of a ``text`` column (and ``columns``), ``row_group_size`` rows per row group."""
    table = pa.table({"id": list(range(len(texts))), "text": pa.array(texts, pa.string()), **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def shard_tokens(out: Path) -> list[int]:
    """The tokens of every training shard in ``out``, in order."""
    return np.concatenate([read_shard(s) for s in find_shards(out, "train")]).tolist()


def prepare_cli(
    capsys: pytest.CaptureFixture, ranks: Path, out: Path, *inputs: object, shard: int = 16
) -> str:
    """``gpt2 prepare INPUTS`` with GPT-2's tokenizer into ``out``, all training data; its stdout."""
    code, stdout, err = run_cli(capsys, "prepare", *inputs, "--tokenizer", ranks, "--out", out,
                                "--val-fraction", "0", "--shard-size", shard)
    assert code == 0, err
    return stdout


def test_parquet_rows_give_the_tokens_of_the_same_documents_as_text_files(
    tmp_path: Path, capsys, gpt2_ranks_file: Path, reference_encoding: tiktoken.Encoding
) -> None:
    path = write_parquet(tmp_path / "docs.parquet", DOCS)
    assert pq.ParquetFile(path).num_row_groups == 3
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(DOCS):
        if doc is not None:
            (tmp_path / "txt" / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    stdout = prepare_cli(capsys, gpt2_ranks_file, tmp_path / "pq", path)
    prepare_cli(capsys, gpt2_ranks_file, tmp_path / "tx", tmp_path / "txt")
    expected = [t for d in DOCS if d and d.strip() for t in [EOT, *reference_encoding.encode_ordinary(d)]]
    assert shard_tokens(tmp_path / "pq") == shard_tokens(tmp_path / "tx") == expected
    assert len(find_shards(tmp_path / "pq", "train")) > 1
    assert f"wrote {len(expected):,} training and 0 validation tokens" in stdout


def test_several_files_a_directory_and_a_chosen_column_mix_with_text_files(
    tmp_path: Path, capsys, gpt2_ranks_file: Path, reference_encoding: tiktoken.Encoding
) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_parquet(corpus / "a.parquet", ["alpha one", "alpha two"], body=["A1", "A2"])
    (corpus / "b.txt").write_text("a text file between them")
    write_parquet(corpus / "sub" / "c.parquet", ["gamma", None, "delta"], body=["C1", None, "C3"])
    (corpus / "ignored.bin").write_bytes(b"\0\1")

    def stream(docs: list[str]) -> list[int]:
        return [t for d in docs for t in [EOT, *reference_encoding.encode_ordinary(d)]]

    prepare_cli(capsys, gpt2_ranks_file, tmp_path / "dir", corpus)
    assert shard_tokens(tmp_path / "dir") == stream(["alpha one", "alpha two", "a text file between them",
                                                     "gamma", "delta"])
    prepare_cli(capsys, gpt2_ranks_file, tmp_path / "files", corpus / "sub" / "c.parquet",
                corpus / "a.parquet", "--text-field", "body")
    assert shard_tokens(tmp_path / "files") == stream(["C1", "C3", "A1", "A2"])


def test_a_tokenizer_is_trained_on_parquet_rows(tmp_path: Path, capsys) -> None:
    path = write_parquet(tmp_path / "d.parquet", [f"row {i} of the corpus, some words" for i in range(40)])
    code, out, err = run_cli(capsys, "prepare", path, "--vocab-size", "300", "--out", tmp_path / "out",
                             "--val-fraction", "0")
    assert code == 0 and "training" in out, err
    eot = Tokenizer.from_pretrained(tmp_path / "out").eot_token
    assert shard_tokens(tmp_path / "out").count(eot) == 40  # one document per row


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every ``ParquetFile.iter_batches`` call (its options and the batches it gave so far), pyarrow's
    own method underneath; reading a whole file or row group at once fails the test."""
    calls: list[dict] = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self: pq.ParquetFile, *args: object, **kwargs: object) -> Iterator[pa.RecordBatch]:
        call = {"kwargs": kwargs, "batches": 0, "row_groups": self.num_row_groups}
        calls.append(call)
        for batch in iter_batches(self, *args, **kwargs):
            call["batches"] += 1
            yield batch

    def whole(self: pq.ParquetFile, *args: object, **kwargs: object) -> None:
        raise AssertionError("a Parquet file was read whole")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    for name in ("read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, whole)
    return calls


def test_prepare_streams_only_the_text_column_in_batches(
    tmp_path: Path, capsys, gpt2_ranks_file: Path, reads: list[dict]
) -> None:
    rows = 2 * PARQUET_BATCH_ROWS + 100
    path = write_parquet(tmp_path / "big.parquet", [f"doc {i}" for i in range(rows)], row_group_size=500)
    prepare_cli(capsys, gpt2_ranks_file, tmp_path / "out", path, shard=100_000)
    assert [c["kwargs"] for c in reads] == [{"columns": ["text"], "batch_size": PARQUET_BATCH_ROWS}]
    assert reads[0]["batches"] == 3  # 2,148 rows in batches of 1,024
    assert shard_tokens(tmp_path / "out").count(EOT) == rows


def test_rows_are_read_lazily_batch_after_batch(tmp_path: Path, reads: list[dict]) -> None:
    path = write_parquet(tmp_path / "d.parquet", [f"doc {i}" for i in range(12)])  # 4 row groups of 3
    pieces = Corpus([path], parquet_batch_rows=3).pieces()
    assert next(pieces) == ("doc 0", True)
    assert reads[0]["row_groups"] == 4 and reads[0]["batches"] == 1  # the rest not read yet
    assert [text for text, _ in pieces] == [f"doc {i}" for i in range(1, 12)]
    assert reads[0]["batches"] == 4


def test_null_rows_are_skipped_and_only_nulls_is_an_empty_corpus(
    tmp_path: Path, capsys, gpt2_ranks_file: Path, reference_encoding: tiktoken.Encoding
) -> None:
    path = write_parquet(tmp_path / "d.parquet", [None, None, "only", None, None])
    prepare_cli(capsys, gpt2_ranks_file, tmp_path / "out", path)
    assert shard_tokens(tmp_path / "out") == [EOT, *reference_encoding.encode_ordinary("only")]
    path = write_parquet(tmp_path / "nulls.parquet", [None, None, None, None])
    code, _, err = run_cli(capsys, "prepare", path, "--tokenizer", gpt2_ranks_file, "--out", tmp_path / "o2")
    assert_one_line_error(code, err, "nulls.parquet", "empty")


def corrupt(path: Path) -> None:
    """Overwrite the first half of a Parquet file (its data pages) and keep its footer."""
    data = bytearray(path.read_bytes())
    data[4 : len(data) // 2] = b"\xab" * (len(data) // 2 - 4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("make", "options", "words"),
    [
        (lambda p: write_parquet(p, ["a", "b"]), ["--text-field", "body"],
         ["d.parquet", "no column 'body'", "id, text", "--text-field"]),
        (lambda p: write_parquet(p, ["a", "b"]), ["--text-field", "id"],
         ["d.parquet", "'id' holds int64, not text", "(text)", "--text-field"]),
        (lambda p: write_parquet(p, ["a", "b"], text_bytes=[b"a", b"b"]), ["--text-field", "text_bytes"],
         ["'text_bytes' holds binary, not text"]),
        (lambda p: p.write_text("id,text\n1,not parquet\n"), [], ["d.parquet", "not a readable Parquet"]),
        (lambda p: p.write_bytes(b""), [], ["d.parquet", "not a readable Parquet"]),
        (lambda p: corrupt(write_parquet(p, [f"document number {i} " * 20 for i in range(30)],
                                         row_group_size=10)), [], ["d.parquet", "corrupt"]),
    ],
    ids=["unknown-column", "int-column", "binary-column", "csv", "empty-file", "corrupt-pages"],
)
def test_bad_column_or_file_is_one_error_line(
    tmp_path: Path, capsys, gpt2_ranks_file: Path, make, options: list, words: list
) -> None:
    make(tmp_path / "d.parquet")
    code, _, err = run_cli(capsys, "prepare", tmp_path / "d.parquet", "--tokenizer", gpt2_ranks_file,
                           "--out", tmp_path / "out", *options)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "out").exists()


def test_help_documents_the_text_column(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "prepare", "--help")
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--text-field NAME" in text and ".parquet" in text and "null rows are skipped" in text
