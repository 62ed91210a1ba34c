"""Training data: text corpora in, llm.c token shards out (``gpt2.data.loader`` feeds them to the trainer).

Text flows from documents (text files, JSON lines, Parquet files, named corpora, Hugging Face
datasets) to token ids (``<|endoftext|>`` before every document, as llm.c writes them) to shards in
llm.c's .bin format (``gpt2.data.shards``).
"""

from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from gpt2.data import corpora
from gpt2.data.shards import (
    DEFAULT_SHARD_TOKENS,
    check_vocab_size,
    write_shard,
)
from gpt2.tokenizer.bpe import Tokenizer, safe_cut, train_tokenizer
from gpt2.util.atomic import building_dir
from gpt2.util.errors import UserError
from gpt2.util.jsonfile import parse_json

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

VAL_PIECE_TOKENS = 4096  # the validation split takes whole pieces of this many tokens, spread evenly
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
PIECE_BYTES = 1 << 20  # a .txt file is read, and any text tokenised, in pieces of about this many bytes
# A stretch of text this long with no place to cut safely (one "word" of millions of characters) is cut
# anyway: the bound on a piece, so on memory, whatever the lengths of lines and documents.
MAX_PIECE_CHARS = 1 << 22
PARQUET_BATCH_ROWS = 1024  # rows of a Parquet file's text column decoded at once
BATCH_CHARS = 2_000_000  # characters encoded at once: a batch's text and ids are what memory holds
NAMED_CORPORA: dict[str, Callable[[], list[Path]]] = {"shakespeare": corpora.shakespeare}


# ---------------------------------------------------------------------------------------------
# Reading corpora


class Corpus:
    """The documents of some inputs: .txt files (one document each), .jsonl files (one document per
    line, in its ``text_field``), .parquet files (one document per row, in its ``text_field`` column; null
    rows skipped), directories of those, the named corpora of ``gpt2.data.corpora`` (``shakespeare``) and,
    with the ``datasets`` library and a network, Hugging Face datasets by name. Memory stays bounded: a
    .txt file is read ``piece_bytes`` at a time, a .jsonl file a line at a time, a .parquet file
    ``parquet_batch_rows`` rows at a time, and all text is tokenised in pieces of at most
    ``max_piece_chars`` characters (``_pieces``), however long its lines. So a .txt file's peak does
    not grow with its length or its lines' (under 400 MB for a 50 MB line without a break, as
    tests/test_prepare_long_lines.py holds it); a JSON line is held whole as it is read (a few times
    its size), a Parquet row by pyarrow (about three times its size: under 600 MB for a 50 MB row).
    """

    def __init__(
        self,
        inputs: Sequence[str | Path],
        *,
        text_field: str = "text",
        dataset_split: str = "train",
        dataset_config: str | None = None,
        piece_bytes: int = PIECE_BYTES,
        parquet_batch_rows: int = PARQUET_BATCH_ROWS,
        max_piece_chars: int = MAX_PIECE_CHARS,
    ) -> None:
        if not inputs:
            raise UserError("no input given; name .txt/.jsonl/.parquet files, directories or a dataset")
        self.inputs = [str(i) for i in inputs]
        self.text_field = text_field
        self.parquet_batch_rows = parquet_batch_rows
        self.dataset_split = dataset_split
        self.dataset_config = dataset_config
        self.piece_bytes = piece_bytes
        self.max_piece_chars = max_piece_chars
        self._invalid: dict[str, int] = {}  # invalid UTF-8 sequences per file, not yet reported
        self._warned: set[str] = set()  # each file is reported once, not on every pass
        self._reading: str | None = None  # the file being read, whose count is not complete yet

    def pieces(self) -> Iterator[tuple[str, bool]]:
        """Every non-blank document in input order, as (text, starts_document) pairs: a document longer
        than ``piece_bytes`` comes in pieces of about that many characters, cut where GPT-2's
        pre-tokeniser ends a token anyway (``gpt2.tokenizer.bpe.safe_cut``), so the pieces of a
        document encode to the ids of the whole document."""
        for spec in self.inputs:
            path = Path(spec)
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
                if not files:
                    raise UserError(f"{path}: the directory holds no .txt, .jsonl or .parquet files")
                yield from self._file_pieces(files)
            elif path.is_file():
                yield from self._file_pieces([path])
            elif spec in NAMED_CORPORA:
                yield from self._file_pieces(NAMED_CORPORA[spec]())
            else:
                for doc in self._dataset_documents(spec):
                    yield from self._document(self._slices(doc), spec)

    def _file_pieces(self, files: Iterable[Path]) -> Iterator[tuple[str, bool]]:
        for path in files:
            self._reading = str(path)
            if path.suffix not in (".jsonl", ".parquet"):  # text
                yield from self._document(self._text_blocks(path), str(path))
            else:
                documents = (self._jsonl_documents(path) if path.suffix == ".jsonl" else
                             parquet_documents(path, self.text_field, self.parquet_batch_rows))
                for doc in documents:  # a long Parquet row comes in pieces already
                    yield from self._document(self._slices(doc) if isinstance(doc, str) else doc, str(path))
            self._reading = None

    def _document(self, blocks: Iterable[str], name: str) -> Iterator[tuple[str, bool]]:
        """One document, from its ``blocks``, in pieces (``_pieces``); nothing if it is blank. Every
        safe cut follows a non-space character, so only a forced cut leaves a blank piece."""
        started = False
        for piece in _pieces(blocks, self.max_piece_chars, name):
            if started or piece.strip():
                yield piece, not started
                started = True

    def _slices(self, text: str) -> Iterator[str]:
        """A document held whole, ``piece_bytes`` characters at a time (a short one as it is)."""
        step = self.piece_bytes
        yield from (text,) if len(text) <= step else (text[i : i + step] for i in range(0, len(text), step))

    def _text_blocks(self, path: Path) -> Iterator[str]:
        """The text of ``path``, read ``piece_bytes`` at a time and decoded as the whole file decodes
        (a character split between two reads is decoded whole)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        before = b""  # the last two bytes read: a U+FFFD written in the file may straddle two reads
        with path.open("rb") as f:
            while True:
                data = f.read(self.piece_bytes)
                text = self._counted(path, before + data, decoder.decode(data, final=not data))
                if text:
                    yield text
                if not data:
                    return
                before = (before + data)[-2:]

    def _jsonl_documents(self, path: Path) -> Iterator[str]:
        for where, record in json_lines(path, lambda raw: self._decode(path, raw)):
            text = record.get(self.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(
                    f"{where}: no string field {self.text_field!r}; give each line "
                    f'{{"{self.text_field}": "..."}} or choose the field with --text-field'
                )
            if text.strip():
                yield text

    def _decode(self, path: Path, data: bytes) -> str:
        """UTF-8 text; NUL bytes mean a binary file (an error), invalid sequences are replaced."""
        return self._counted(path, data, data.decode("utf-8", errors="replace"))

    def _counted(self, path: Path, data: bytes, text: str) -> str:
        """``text``, decoded from the end of ``data``, once ``data`` is checked for NUL bytes (a binary
        file: an error) and the invalid sequences replaced in ``text`` are counted."""
        if b"\x00" in data:
            raise UserError(
                f"{path}: binary file (it holds NUL bytes); give UTF-8 text files, or remove this one"
            )
        # U+FFFD written in the file itself is EF BF BD; every other one replaced an invalid sequence.
        invalid = text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
        if invalid:
            self._invalid[str(path)] = self._invalid.get(str(path), 0) + invalid
        return text

    def report_invalid_utf8(self) -> None:
        """Warn once per file read to its end about the invalid UTF-8 sequences replaced in it."""
        for name in [name for name in self._invalid if name != self._reading]:
            count = self._invalid.pop(name)
            if name not in self._warned:
                self._warned.add(name)
                log.warning(f"warning: {name}: {count} invalid UTF-8 sequences replaced with U+FFFD")

    def _dataset_documents(self, name: str) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise UserError(
                f"{name}: no such file or directory (to read a Hugging Face dataset by name, "
                "`pip install datasets`)"
            ) from None
        try:
            rows = datasets.load_dataset(name, self.dataset_config, split=self.dataset_split, streaming=True)
        except Exception as e:  # the library raises many kinds (network, missing name, bad config)
            raise UserError(f"{name}: could not open the Hugging Face dataset ({e}); check the name") from e
        for row in rows:
            text = row.get(self.text_field)
            if not isinstance(text, str):
                raise UserError(f"{name}: rows have no string field {self.text_field!r}; use --text-field")
            if text.strip():
                yield text


def json_lines(
    path: Path, decode: Callable[[bytes], str], max_bytes: int | None = None
) -> Iterator[tuple[str, object]]:
    """The values of a JSON-lines file's non-blank lines (each line's bytes through ``decode``), with
    where each is (``file:line``); a line that is not JSON, or holds what cannot be read
    (``gpt2.util.jsonfile``), that ``decode`` finds is not UTF-8, or longer than ``max_bytes`` (read
    no further: memory stays bounded) is a one-line error naming it."""
    limit = -1 if max_bytes is None else max_bytes + 1
    with path.open("rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(limit), b""), 1):
            where = f"{path}:{lineno}"
            if max_bytes is not None and len(raw) > max_bytes and not raw.endswith(b"\n"):
                raise UserError(f"{where}: the line is longer than {max_bytes:,} bytes, the most one may "
                                "hold here; shorten it or split it")
            try:
                line = decode(raw)
            except UnicodeDecodeError as e:
                raise UserError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start + 1} of the line); "
                                "save the file as UTF-8 (e.g. iconv -f cp1252 -t utf-8)") from None
            if not line.strip():
                continue
            yield where, parse_json(line, where)


def parquet_documents(
    path: Path, column: str, batch_rows: int = PARQUET_BATCH_ROWS
) -> Iterator[str | Iterator[str]]:
    """The strings of a Parquet file's ``column``, one document per row, null rows skipped. Only that
    column is read, ``batch_rows`` rows at a time (pyarrow's ``iter_batches``, row group after row
    group) through a buffer of ``PIECE_BYTES`` (not a whole column chunk), so memory holds about one
    batch whatever the sizes of the file and its row groups. A row longer than ``PIECE_BYTES`` comes
    as an iterator of its text, decoded from pyarrow's bytes a piece at a time (not as one Python
    string, up to 4 bytes a character, beside pyarrow's copy). A file that is not Parquet, a missing
    column or one that is not text is a one-line error."""
    import pyarrow as pa  # imported here: only Parquet inputs pay for it
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path, buffer_size=PIECE_BYTES, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({_one_line(e)}); fetch it again if it was "
                        "cut short, or remove it") from None
    with parquet:
        _check_text_column(path, parquet.schema_arrow, column)
        batches = parquet.iter_batches(columns=[column], batch_size=batch_rows)
        while True:
            try:
                batch = next(batches, None)
                values = None if batch is None else batch.column(0)
                long = values is not None and _has_long_row(values)
                texts = [] if values is None or long else values.to_pylist()
            except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
                raise _corrupt(path, e) from None
            if values is None:
                return
            yield from _row_texts(path, values) if long else (text for text in texts if text is not None)


def _corrupt(path: Path, error: Exception) -> UserError:
    """The one error for Parquet data pyarrow cannot read or that is not UTF-8, wherever it shows."""
    return UserError(f"{path}: the Parquet data is corrupt ({_one_line(error)}); fetch the file again or "
                     "remove it")


def _has_long_row(values: pa.Array) -> bool:
    """Whether a row of the batch ``values`` holds more than ``PIECE_BYTES`` (the batch's size first)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if values.nbytes <= PIECE_BYTES:
        return False
    strings = values.dictionary if pa.types.is_dictionary(values.type) else values
    try:
        return (pc.max(pc.binary_length(strings)).as_py() or 0) > PIECE_BYTES
    except pa.ArrowNotImplementedError:  # string views: taken row by row
        return True


def _row_texts(path: Path, values: pa.Array) -> Iterator[str | Iterator[str]]:
    """The texts of a batch holding a long row, one row at a time: a long one as its pieces."""
    import pyarrow as pa

    try:
        if pa.types.is_dictionary(values.type):
            values = values.dictionary_decode()
        for value in values:
            if value.is_valid:
                data = value.as_buffer()
                yield value.as_py() if data.size <= PIECE_BYTES else _decoded(path, memoryview(data))
    except (pa.ArrowException, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from None


def _decoded(path: Path, data: memoryview) -> Iterator[str]:
    """The UTF-8 ``data`` as text, ``PIECE_BYTES`` at a time (a character split between two is whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for start in range(0, len(data), PIECE_BYTES):
            yield decoder.decode(data[start : start + PIECE_BYTES], final=start + PIECE_BYTES >= len(data))
    except UnicodeDecodeError as e:
        raise _corrupt(path, e) from None


def _check_text_column(path: Path, schema: pa.Schema, column: str) -> None:
    """Refuse a Parquet file's ``schema`` without a string column named ``column``."""
    kinds = {field.name: field.type for field in schema}
    if column not in kinds:
        raise UserError(f"{path}: no column {column!r}; the file's columns are {', '.join(kinds) or 'none'}; "
                        "name the one holding the text with --text-field NAME")
    if not _is_text(kinds[column]):
        text = [name for name, kind in kinds.items() if _is_text(kind)]
        fix = (f"name one of its text columns ({', '.join(text)}) with --text-field NAME" if text
               else "the file has no text column")
        raise UserError(f"{path}: column {column!r} holds {kinds[column]}, not text; {fix}")


def _is_text(kind: pa.DataType) -> bool:
    """Whether a pyarrow type holds strings (plain, large, view, or dictionary-encoded)."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)


def _one_line(error: Exception) -> str:
    """An exception's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def _pieces(blocks: Iterable[str], max_chars: int, name: str) -> Iterator[str]:
    """The text of ``blocks`` in pieces of about a block (one block whole): when a block comes, what came
    before it is cut at its last place where GPT-2's pre-tokeniser ends a token whatever surrounds it
    (``safe_cut``), so that the pieces encode to the ids of the whole text. Text with no such place in
    ``max_chars`` characters (a "word" of millions of characters) is cut anyway, with a warning: the
    ids at that cut may differ, but no piece, and so no batch, grows past ``max_chars`` and a block."""
    buffer, searched, warned = "", 0, False
    for block in blocks:
        cut = safe_cut(buffer, searched) if buffer else 0  # before ``searched``: looked at already
        if not cut and len(buffer) >= max_chars:
            cut = len(buffer)
            if not warned:
                log.warning(f"warning: {name}: {len(buffer):,} characters with no place where GPT-2's "
                            "tokens end whatever follows; cut there anyway (the ids at the cut may differ)")
                warned = True
        if cut:
            yield buffer[:cut]
            buffer = buffer[cut:]
        searched = len(buffer)
        buffer += block
    if buffer:
        yield buffer


# ---------------------------------------------------------------------------------------------
# Preparing shards


class ShardWriter:
    """Cuts one token stream into a validation and a training split and writes full shards.

    The stream is cut in pieces of ``VAL_PIECE_TOKENS``; a fraction ``val_fraction`` of them, evenly
    spread over the corpus, goes to validation. The last piece is held back until the end so that a
    small corpus still gets a validation piece. Each split fills one shard-sized buffer, written out
    and reused when full: memory stays at a shard per split, whatever the corpus's size.
    """

    def __init__(self, directory: Path, shard_tokens: int, val_fraction: float) -> None:
        if shard_tokens <= 0:
            raise UserError(f"shard size must be a positive number of tokens, got {shard_tokens}")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
        self.directory = directory
        self.shard_tokens = shard_tokens
        self.val_fraction = val_fraction
        self.buffers: dict[str, np.ndarray] = {}  # made when first needed; pages count once touched
        self.filled = {"val": 0, "train": 0}
        self.tokens = {"val": 0, "train": 0}
        self.shards = {"val": 0, "train": 0}
        self.piece = np.empty(VAL_PIECE_TOKENS, dtype=np.uint16)
        self.piece_tokens = 0
        self.pieces = 0  # pieces routed so far
        self.held: np.ndarray | None = None

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, VAL_PIECE_TOKENS - self.piece_tokens)
            self.piece[self.piece_tokens : self.piece_tokens + take] = tokens[:take]
            self.piece_tokens += take
            tokens = tokens[take:]
            if self.piece_tokens == VAL_PIECE_TOKENS:
                if self.held is not None:
                    self._route(self.held, last=False)
                self.held = self.piece.copy()
                self.piece_tokens = 0

    def close(self) -> dict[str, int]:
        """Route and write what remains; the number of tokens in each split."""
        last = [p for p in (self.held, self.piece[: self.piece_tokens]) if p is not None and p.size]
        for i, piece in enumerate(last):
            self._route(piece, last=i == len(last) - 1)
        for split, filled in self.filled.items():
            if filled:
                self._write(split, self.buffers[split][:filled])
        return dict(self.tokens)

    def _route(self, piece: np.ndarray, *, last: bool) -> None:
        f = self.val_fraction
        to_val = int((self.pieces + 1) * f) > int(self.pieces * f)
        to_val = to_val or (last and f > 0 and not self.tokens["val"])
        self.pieces += 1
        split = "val" if to_val else "train"
        self.tokens[split] += piece.size
        if split not in self.buffers:
            self.buffers[split] = np.empty(self.shard_tokens, dtype=np.uint16)
        buffer = self.buffers[split]
        while piece.size:
            take = min(piece.size, self.shard_tokens - self.filled[split])
            buffer[self.filled[split] : self.filled[split] + take] = piece[:take]
            self.filled[split] += take
            piece = piece[take:]
            if self.filled[split] == self.shard_tokens:
                self._write(split, buffer)
                self.filled[split] = 0

    def _write(self, split: str, tokens: np.ndarray) -> None:
        write_shard(self.directory / f"{split}_{self.shards[split]:06d}.bin", tokens)
        self.shards[split] += 1


def prepare(
    corpus: Corpus,
    out_dir: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    vocab_size: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_fraction: float = 0.05,
    overwrite: bool = False,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Tokenise ``corpus`` into llm.c shards in ``out_dir``, with the tokenizer saved beside them.

    Give ``tokenizer``, or ``vocab_size`` to train a new byte-level BPE vocabulary on the corpus.
    The directory appears complete or not at all: it is built beside ``out_dir`` and renamed into
    place. Returns the number of tokens in each split.
    """
    if (tokenizer is None) == (vocab_size is None):
        raise UserError("give either a tokenizer (--tokenizer) or a vocabulary size to train (--vocab-size)")
    num_threads = num_threads or os.cpu_count() or 1
    with building_dir(out_dir, overwrite=overwrite) as tmp:
        if tokenizer is None:
            assert vocab_size is not None
            tokenizer = _train_on_corpus(corpus, vocab_size, tmp)
        check_vocab_size(tokenizer.n_vocab)
        writer = ShardWriter(tmp, shard_tokens, val_fraction)
        counts = _tokenize(corpus, tokenizer, writer, num_threads, progress)
        tokenizer.save_pretrained(tmp)
    return counts


def _train_on_corpus(corpus: Corpus, vocab_size: int, workdir: Path) -> Tokenizer:
    """Train a BPE vocabulary on the corpus's documents, gathered in one UTF-8 file."""
    text_file = workdir / "corpus.txt"
    with text_file.open("w", encoding="utf-8") as f:
        for i, (text, starts_document) in enumerate(corpus.pieces()):
            if starts_document and i:
                f.write("\n\n")
            f.write(text)
        f.write("\n\n")
    corpus.report_invalid_utf8()
    if text_file.stat().st_size == 0:
        raise UserError(f"{', '.join(corpus.inputs)}: the corpus is empty; give files that hold text")
    tokenizer = train_tokenizer([text_file], vocab_size)
    text_file.unlink()
    return tokenizer


def _tokenize(
    corpus: Corpus, tokenizer: Tokenizer, writer: ShardWriter, num_threads: int, progress: bool
) -> dict[str, int]:
    """Encode the corpus's pieces in batches on ``num_threads`` threads; ``<|endoftext|>`` before each
    document."""
    eot = np.array([tokenizer.eot_token], dtype=np.uint16)
    documents = 0
    # delay: a corpus that fails at once shows its one error line, no bar
    with tqdm(desc="tokenizing", unit="tok", unit_scale=True, delay=0.5, disable=not progress) as bar:
        for batch in _batches(corpus.pieces(), max_chars=BATCH_CHARS, max_pieces=1024):
            encoded = tokenizer.encode_batch([text for text, _ in batch], num_threads=num_threads)
            for (_, starts_document), ids in zip(batch, encoded, strict=True):
                if starts_document:
                    writer.add(eot)
                    documents += 1
                writer.add(np.asarray(ids, dtype=np.uint16))
                bar.update(len(ids) + starts_document)
            corpus.report_invalid_utf8()
    corpus.report_invalid_utf8()  # the last file's
    if documents == 0:
        raise UserError(f"{', '.join(corpus.inputs)}: the corpus is empty; give files that hold text")
    counts = writer.close()
    if counts["train"] == 0:
        raise UserError(
            f"the corpus has only {counts['val']} tokens, too few to split off validation data; "
            "add text or use --val-fraction 0"
        )
    return counts


def _batches(
    pieces: Iterator[tuple[str, bool]], *, max_chars: int, max_pieces: int
) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[0])
        if chars >= max_chars or len(batch) >= max_pieces:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch

