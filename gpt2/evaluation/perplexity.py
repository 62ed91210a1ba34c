"""The language-modelling corpora of the GPT-2 paper's Table 3: readers for their raw files, the
invertible de-tokenisers the paper applied to them, and streaming tokenisation.

Files are read in blocks of about a megabyte, never whole. De-tokenisers work line by line (a block
always ends at a line end), so the result does not depend on where blocks end, and tokenisation cuts
the text only where GPT-2's pre-tokenisation splits it anyway, so the ids equal those of the whole
text encoded at once.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from gpt2.evaluation.hub import hub_lines
from gpt2.tokenizer.bpe import Tokenizer
from gpt2.util.errors import UserError

if TYPE_CHECKING:  # the corpora are described without loading torch (for the command line)
    from gpt2.evaluation.scoring import PerplexityResult, Scorer

BLOCK_BYTES = 1 << 20

# -- de-tokenisers ------------------------------------------------------------------------------------
# After Megatron-LM's zero-shot detokenizers (also lm-evaluation-harness's), made line-local: no rule
# looks across a line end, and "a leading space" means one at the start of any line.


def _strip_line_spaces(text: str) -> str:
    """Drop one space at the start and at the end of every line."""
    return re.sub(r"^ | $", "", text, flags=re.MULTILINE)


def wikitext_detokenize(text: str) -> str:
    """WikiText: " @-@ " -> "-", " @,@ " -> ",", " @.@ " -> ".", no space before punctuation, brackets
    and quotes hugging their contents, "= = =" headings closed up."""
    text = text.replace("s '", "s'")
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for mark in ":;.!?,":
        text = text.replace(f" {mark} ", f"{mark} ")
    for left, right in ("()", "[]", "{}", '""', "''"):
        l, r = re.escape(left), re.escape(right)
        text = re.sub(rf"{l} *([^{r}\n]*?) *{r}", rf"{left}\1{right}", text)
    text = text.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    text = text.replace(" ° ", "°")
    text = _strip_line_spaces(text)
    return text.replace(" N ", " 1 ").replace(" 's", "'s")


def ptb_detokenize(text: str) -> str:
    """Penn Treebank: no space before an apostrophe or "n't", numbers ("N") become "1", "$ 1" -> "$1";
    ``<unk>`` stays as it is."""
    text = _strip_line_spaces(text).replace(" '", "'").replace(" n't", "n't")
    text = re.sub(r"(?<![^ \n])N(?![^ \n])", "1", text)
    return text.replace("$ 1", "$1").replace("# 1", "#1")


def moses_detokenize(text: str) -> str:
    """Moses/PTB-style tokenised English (One Billion Word, the Children's Book Test): no space before
    punctuation and clitics, none inside brackets, `` and '' become ASCII double quotes."""
    text = text.replace("`` ", '"').replace(" ''", '"')
    text = re.sub(r" (?=[,.!?;:%)\]}]|'(?:s|re|ve|ll|d|m)\b|n't\b)", "", text)
    text = re.sub(r"(?<=[(\[{$]) ", "", text)
    return _strip_line_spaces(text)


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext_detokenize,
    "ptb": ptb_detokenize,
    "1bw": moses_detokenize,
    "cbt": moses_detokenize,
}


def get_detokenizer(name: str | None) -> Callable[[str], str] | None:
    """The de-tokeniser called ``name`` (None or "none": none)."""
    if name in (None, "none"):
        return None
    if name not in DETOKENIZERS:
        raise UserError(f"unknown de-tokeniser {name!r}; choose one of: none, {', '.join(DETOKENIZERS)}")
    return DETOKENIZERS[name]


# -- the corpora --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """How to read one corpus: its de-tokeniser, the metric the paper reports for it, and for enwik8
    and text8 the standard test split (the last 5·10^6 bytes of the 10^8-byte file)."""

    name: str
    detokenizer: str | None
    metric: str  # a key of PerplexityResult.to_dict()
    standard_split: bool = False


CORPORA: dict[str, Corpus] = {
    "wikitext2": Corpus("wikitext2", "wikitext", "word_perplexity"),
    "wikitext103": Corpus("wikitext103", "wikitext", "word_perplexity"),
    "ptb": Corpus("ptb", "ptb", "word_perplexity"),
    "1bw": Corpus("1bw", "1bw", "word_perplexity"),
    "enwik8": Corpus("enwik8", None, "bits_per_byte", standard_split=True),
    "text8": Corpus("text8", None, "bits_per_char", standard_split=True),
    "raw": Corpus("raw", None, "perplexity"),
}
SPLIT_FILE_BYTES = 10**8  # enwik8 and text8: 90M train, 5M valid, 5M test
SPLITS = {"train": (0, 90 * 10**6), "valid": (90 * 10**6, 95 * 10**6), "test": (95 * 10**6, 10**8)}


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; choose one of: {', '.join(CORPORA)}")
    return CORPORA[name]


@dataclass
class Text:
    """A stream of text blocks (``blocks``, de-tokenised) and, once it is consumed, the number of words
    of the original text (whitespace-separated) and where in the file it came from."""

    blocks: Iterator[str]
    words: int = 0
    span: str = ""


def read_text(
    path: str | Path,
    *,
    detokenizer: str | None = None,
    split: str | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> Text:
    """Stream a UTF-8 text file, de-tokenised by the named de-tokeniser.

    ``split`` ("train", "valid", "test") reads that byte range of the standard enwik8/text8 split; it
    needs the whole 10^8-byte file. None or "all": the whole file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: the file is empty; give a text file to evaluate on")
    start, end = 0, size
    if split not in (None, "all"):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        if size != SPLIT_FILE_BYTES:
            raise UserError(
                f"{path}: {size:,} bytes; the standard {split} split needs the original "
                f"{SPLIT_FILE_BYTES:,}-byte file; to evaluate all of this file use split 'all'"
            )
        start, end = SPLITS[split]
    text = Text(iter(()), span=f"{path} bytes {start:,}-{end:,}" if (start, end) != (0, size) else str(path))
    text.blocks = _prepare(_file_blocks(path, start, end, block_bytes), get_detokenizer(detokenizer), text)
    return text


def hub_text(name: str, *, detokenizer: str | None = None, block_bytes: int = BLOCK_BYTES) -> Text:
    """Stream a language-modelling set from the Hugging Face hub (see ``gpt2.evaluation.hub``)."""
    text = Text(iter(()), span=f"{name} (hub)")
    text.blocks = _prepare(_group_lines(hub_lines(name), block_bytes), get_detokenizer(detokenizer), text)
    return text


def _file_blocks(path: Path, start: int, end: int, block_bytes: int) -> Iterator[str]:
    """The text of bytes [start, end) of a file (moved to character boundaries), block by block."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        start, end = _char_boundary(f, start), _char_boundary(f, end)
        f.seek(start)
        offset = start
        while offset < end:
            raw = f.read(min(block_bytes, end - offset))
            if not raw:  # the file shrank while we read it
                break
            try:
                yield decoder.decode(raw, final=offset + len(raw) >= end)
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}: not UTF-8 text near byte {offset + e.start:,}; give a UTF-8 text file"
                ) from None
            offset += len(raw)


def _group_lines(lines: Iterable[str], block_bytes: int) -> Iterator[str]:
    group: list[str] = []
    size = 0
    for line in lines:
        group.append(line)
        size += len(line)
        if size >= block_bytes:
            yield "".join(group)
            group, size = [], 0
    if group:
        yield "".join(group)


def _prepare(blocks: Iterable[str], detokenize: Callable[[str], str] | None, text: Text) -> Iterator[str]:
    """De-tokenise whole lines (holding back an unfinished one) and count the words of the original."""
    pending = ""  # a line not yet complete, when de-tokenising
    in_word = False  # the previous block ended inside a word
    for raw in blocks:
        block = raw
        if detokenize is not None:
            block, pending = _complete_lines(pending + raw)
        if block:
            text.words += len(block.split()) - (in_word and not block[0].isspace())
            in_word = not block[-1].isspace()
            yield detokenize(block) if detokenize else block
    if pending:
        text.words += len(pending.split()) - (in_word and not pending[0].isspace())
        yield detokenize(pending)  # type: ignore[misc]  (pending is only set when de-tokenising)


def _complete_lines(text: str) -> tuple[str, str]:
    """Split ``text`` into its complete lines and the unfinished rest."""
    cut = text.rfind("\n") + 1
    return text[:cut], text[cut:]


def _char_boundary(f: BinaryIO, position: int) -> int:
    """The first position at or after ``position`` that starts a UTF-8 character."""
    f.seek(position)
    for i, byte in enumerate(f.read(4)):
        if byte & 0xC0 != 0x80:
            return position + i
    return position


def tokenize(blocks: Iterable[str], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Token ids of a stream of text blocks, equal to those of the whole text encoded at once.

    Each block is encoded up to its last safe cut: a space followed by a non-space character, where
    GPT-2's pre-tokenisation always starts a new piece (" word", " 42", " ."), so no piece and no merge
    crosses the cut. The rest waits for the next block.
    """
    pending = ""
    for block in blocks:
        text = pending + block
        cut = _last_safe_cut(text)
        if cut > 0:
            yield tokenizer.encode(text[:cut])
        pending = text[cut:]
    if pending:
        yield tokenizer.encode(pending)


_SAFE_CUT = re.compile(r" (?=\S)")


def _last_safe_cut(text: str) -> int:
    position = len(text) - 1
    while (position := text.rfind(" ", 0, position)) > 0:
        if _SAFE_CUT.match(text, position):
            return position
    return 0


def evaluate_perplexity(
    scorer: Scorer,
    text: Text,
    *,
    context: int | None = None,
    stride: int | None = None,
    words: bool = False,
) -> PerplexityResult:
    """Perplexity, bits per byte and per character of a corpus (see ``Scorer.perplexity`` for the
    windows), and with ``words`` perplexity per (whitespace-separated) word of the original text."""
    result = scorer.perplexity(tokenize(text.blocks, scorer.tokenizer), context=context, stride=stride)
    if words:
        result.words = text.words  # counted while the text streamed by
    result.extra["source"] = text.span
    return result
