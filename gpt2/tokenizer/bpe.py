"""GPT-2's byte-level BPE tokenizer: tiktoken's encoder over GPT-2's vocabulary, or one trained here.

A vocabulary is held the way tiktoken holds it: *ranks*, every token's bytes -> its id, where a lower
id is a merge made earlier; tiktoken encodes a piece by repeatedly merging the adjacent pair whose
concatenation has the lowest rank. Hugging Face and OpenAI spell the same vocabulary as a token -> id
table plus an ordered list of merges, with bytes written as printable characters (``bytes_to_unicode``);
the two forms agree when every merge's result has a higher id than the merges before it, which the
loaders check. Special tokens (``<|endoftext|>``) are plain text unless a caller allows them.
"""

from __future__ import annotations

import array
import base64
import binascii
import contextlib
import functools
import heapq
import itertools
import json
import os
import re
import unicodedata
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import tiktoken
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from gpt2.util.atomic import write_atomic
from gpt2.util.errors import UserError
from gpt2.util.jsonfile import parse_json_object

# GPT-2's pre-tokenisation: text is split into these pieces, and BPE runs inside each piece.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
# What from_pretrained looks for, in order of preference; a *.tiktoken file comes last.
FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
MERGES_HEADER = "#version: 0.2"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a chat template (read first)
# What ``\s`` matches in GPT2_PATTERN under tiktoken's regex engine: Unicode's White_Space, which is not
# Python's ``\s`` (that adds \x1c-\x1f).
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + \
    "\u2028\u2029\u202f\u205f\u3000"
# tiktoken's regex engine overflows its backtracking stack on a run of about a million whitespace
# characters (a panic, not an exception); runs this long are kept away from it (see _encode_ordinary).
LONG_WHITESPACE = 1 << 16
_WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]*")
_UP_TO_LAST_NON_WHITESPACE = re.compile(f"(?s:.*)[^{WHITESPACE}]")

AllowedSpecial = Collection[str] | Literal["all"]


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the others are
    shifted to 256 and up, so that a token's bytes can be written in a JSON or text file."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _spell(token: bytes) -> str:
    """A token's bytes as Hugging Face / OpenAI files write them."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _split_at_lines(text: str, size: int) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters that encode to the same ids apart as
    together: each cut follows a newline that has non-space characters on both sides, where GPT-2's
    pre-tokeniser always ends a piece (the newline alone) and starts a new one."""
    pieces, start = [], 0
    while len(text) - start > 2 * size:
        cut = text.find("\n", start + size)
        while cut != -1 and (cut + 1 >= len(text) or text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start : cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def _long_runs(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of LONG_WHITESPACE or more whitespace characters in ``text``, in time
    linear in its length. Each such run holds a position ``LONG_WHITESPACE * k - 1``, and the run
    starts less than LONG_WHITESPACE before the first of them in it, so only those are looked at."""
    end = 0
    for i in range(LONG_WHITESPACE - 1, len(text), LONG_WHITESPACE):
        if i < end or text[i] not in WHITESPACE:
            continue
        end = _WHITESPACE_RUN.match(text, i).end()
        lowest = i - LONG_WHITESPACE + 1
        before = _UP_TO_LAST_NON_WHITESPACE.match(text, lowest, i)
        start = before.end() if before else lowest
        if end - start >= LONG_WHITESPACE:
            yield start, end


def _piece_class(char: str) -> str | None:
    """The class that decides where GPT-2's pre-tokeniser ends a piece: "s" (``\\s``), "L" (``\\p{L}``),
    "N" (``\\p{N}``) or "o" (the rest); None for a character this Python's Unicode tables do not know
    (tiktoken's may be newer), which never borders a cut."""
    if char in WHITESPACE:
        return "s"
    category = unicodedata.category(char)
    if category in ("Cn", "Cs"):
        return None
    return category[0] if category[0] in "LN" else "o"


def _cuttable(left: str, right: str) -> bool:
    """Whether GPT-2's pre-tokeniser ends a piece between ``left`` and ``right`` whatever surrounds
    them. ``left`` must not be whitespace (a space joins the word after it, ``\\s+(?!\\S)`` looks at
    what follows) and the two must differ in class: then no pattern takes both (``' ?\\p{L}+'``,
    ``' ?\\p{N}+'``, ``' ?[^\\s\\p{L}\\p{N}]+'`` each hold one class after their optional leading
    space), except an apostrophe before a letter, which may start a contraction (``'s``, ``'ll``)."""
    a, b = _piece_class(left), _piece_class(right)
    return a in ("L", "N", "o") and b is not None and a != b and not (left == "'" and b == "L")


def safe_cut(text: str, lo: int = 1) -> int:
    """The last position ``p >= lo`` in ``text`` where GPT-2's pre-tokeniser ends a piece whatever
    comes before or after (``_cuttable``), else 0. The pattern looks behind nothing, and no piece
    reaches across ``p`` or looks past it, so ``text[:p]`` and ``text[p:]`` encode to ids whose
    concatenation is the ids of ``text``: long texts are encoded in pieces cut here. Special tokens
    are not considered (cut only text encoded as plain text)."""
    lo = max(lo, 1)
    for space in " \n":  # the common case, found at C speed: a word's end before a space or a newline
        at = text.rfind(space, lo)
        while at >= lo and not _cuttable(text[at - 1], text[at]):
            at = text.rfind(space, lo, at)
        if at >= lo:
            return at
    return next((p for p in range(len(text) - 1, lo - 1, -1) if _cuttable(text[p - 1], text[p])), 0)


class Tokenizer:
    """GPT-2's byte-level BPE: ``encode`` text to ids and ``decode`` ids to text.

    ``ranks`` maps every mergeable token's bytes to its id (lower = merged earlier) and must hold all
    256 single bytes; ``special_tokens`` maps text such as ``<|endoftext|>`` to ids outside the ranks.
    ``<|endoftext|>`` is added after the highest id when not given. ``source`` names the vocabulary in
    error messages. ``chat_template``: the Jinja chat template saved with it (Hugging Face's
    ``chat_template`` in tokenizer_config.json; see ``gpt2.tokenizer.chat_template``), None for a base
    model's.
    """

    chat_template: str | None = None

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        *,
        source: str = "vocabulary",
    ) -> None:
        specials = dict(special_tokens or {})
        _check_ids(ranks, specials, source)
        if ENDOFTEXT not in specials:
            specials[ENDOFTEXT] = max([*ranks.values(), *specials.values()]) + 1
        self.source = source
        _compact(ranks)
        self._ranks, self._specials = ranks, specials
        self._encoding = tiktoken.Encoding(
            Path(source).name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )

    def same_tokens(self, other: Tokenizer) -> bool:
        """Whether ``other`` maps every text to the same ids (the same ranks and special tokens): a
        draft model must share its model's tokens."""
        return self._ranks == other._ranks and self._specials == other._specials

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``.tiktoken`` ranks file: one ``BASE64_TOKEN RANK`` per line. ``<|endoftext|>``
        gets the id after the last rank (50256 for GPT-2)."""
        path = Path(path)
        ranks: dict[bytes, int] = {}
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except (ValueError, binascii.Error):
                raise UserError(
                    f"{path}: line {number} is not 'BASE64_TOKEN RANK' ({line[:40]!r}); "
                    "is this a .tiktoken ranks file?"
                ) from None
            if token in ranks:
                raise UserError(f"{path}: line {number} repeats token {token!r}; the file is damaged")
            ranks[token] = rank
        return cls(ranks, source=str(path))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """``from_file`` for a .tiktoken file, ``from_pretrained`` for a directory of tokenizer files."""
        path = Path(path)
        if path.is_file():
            return cls.from_file(path)
        if path.is_dir():
            return cls.from_pretrained(path)
        raise UserError(f"{path}: no such tokenizer file or directory")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        """Load the tokenizer files of a directory, the first found of: tokenizer.json (Hugging Face),
        vocab.json + merges.txt (Hugging Face), encoder.json + vocab.bpe (OpenAI), one *.tiktoken."""
        directory = Path(directory)
        files = find_tokenizer_files(directory)
        if not files:
            raise UserError(
                f"{directory} holds no tokenizer files (tokenizer.json, vocab.json + merges.txt, "
                "encoder.json + vocab.bpe, or a .tiktoken file)"
            )
        if files[0].suffix == ".tiktoken":
            return cls.from_file(files[0])
        if files[0].name == "tokenizer.json":
            return cls._from_tokenizer_json(files[0])._with_template_of(directory)
        vocab_file, merges_file = files
        declared = _declared_specials(directory) if vocab_file.name == "vocab.json" else {ENDOFTEXT: None}
        ranks, specials = _read_vocab_and_merges(vocab_file, merges_file, declared)
        return cls(ranks, specials, source=str(vocab_file.parent))._with_template_of(directory)

    @classmethod
    def _from_tokenizer_json(cls, path: Path) -> Tokenizer:
        return cls(*_read_tokenizer_json(path), source=str(path.parent))

    def _with_template_of(self, directory: Path) -> Tokenizer:
        """Set the chat template that ``directory`` holds: chat_template.jinja (transformers 5) or
        tokenizer_config.json's ``chat_template`` (a string, or named templates of which "default")."""
        jinja, config = directory / CHAT_TEMPLATE_FILE, directory / "tokenizer_config.json"
        if jinja.is_file():
            self.chat_template = _read_text(jinja)
        elif config.is_file():
            template = _read_json(config).get("chat_template")
            if isinstance(template, list):
                template = next((t.get("template") for t in template
                                 if isinstance(t, dict) and t.get("name") == "default"), None)
            if template is not None and not isinstance(template, str):
                raise UserError(f"{config}: 'chat_template' must be a string of Jinja; fix or remove it")
            self.chat_template = template
        return self

    # -- encoding ----------------------------------------------------------------------------------

    def encode(self, text: str, *, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Token ids of ``text``. Special tokens are plain text unless named in ``allowed_special``
        (or ``"all"``). Lone surrogates are replaced by U+FFFD first, as tiktoken does."""
        if not allowed_special:
            return self._encode_ordinary(text)
        allowed = self._allowed(allowed_special)
        if next(_long_runs(text), None) is None:
            return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())
        # tiktoken encodes the text between special tokens as if each stretch were a text of its own.
        names = self._specials if allowed == "all" else allowed
        specials = re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))))
        ids, start = [], 0
        for special in specials.finditer(text):
            ids += self._encode_ordinary(text[start : special.start()])
            ids.append(self._specials[special.group()])
            start = special.end()
        return ids + self._encode_ordinary(text[start:])

    def _encode_ordinary(self, text: str) -> list[int]:
        """tiktoken's ``encode_ordinary``, safe on long runs of whitespace. GPT-2's pattern makes a run
        followed by more text into two pieces (all of it but its last character; that character with
        what follows), and a run that ends the text into one; pieces never reach across the start of a
        run. So a long run's first piece is encoded here, by BPE alone, and the text on either side of
        it by tiktoken, which gives the ids of the whole."""
        ids, start = [], 0
        for run_start, run_end in _long_runs(text):
            end = run_end if run_end == len(text) else run_end - 1
            ids += self._encoding.encode_ordinary(text[start:run_start])
            ids += self._encoding._encode_single_piece(text[run_start:end])
            start = end
        return ids + self._encoding.encode_ordinary(text[start:])

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        num_threads: int | None = None,
        allowed_special: AllowedSpecial = frozenset(),
    ) -> list[list[int]]:
        """``encode`` each text, on ``num_threads`` threads (default: one per CPU); tiktoken releases
        the GIL, so the threads run in parallel. Long texts are cut at line breaks into pieces of
        similar size first, so that the threads share the work evenly."""
        threads = num_threads or os.cpu_count() or 1
        piece_chars = max(1 << 16, sum(map(len, texts)) // (8 * threads))
        pieces_of = [_split_at_lines(text, piece_chars) for text in texts]
        pieces = [piece for text_pieces in pieces_of for piece in text_pieces]
        with ThreadPoolExecutor(threads) as pool:
            encoded = list(pool.map(functools.partial(self.encode, allowed_special=allowed_special), pieces))
        results, i = [], 0
        for text_pieces in pieces_of:
            ids = encoded[i]
            for more in encoded[i + 1 : i + len(text_pieces)]:
                ids.extend(more)
            results.append(ids)
            i += len(text_pieces)
        return results

    def _allowed(self, allowed_special: AllowedSpecial) -> AllowedSpecial:
        unknown = set() if allowed_special == "all" else set(allowed_special) - set(self._specials)
        if unknown:
            raise UserError(
                f"allowed_special names {sorted(unknown)}, which are not special tokens of {self.source} "
                f"(it has {sorted(self._specials)})"
            )
        return allowed_special

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes that ``ids`` (a list, an array or a tensor of ids) stand for."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        try:
            return self._encoding.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            bad = next(i for i in ids if not self._is_id(i))
            raise UserError(f"token id {bad!r} is not in {self.source} ({self.n_vocab} ids)") from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text that ``ids`` stand for; bytes that are not valid UTF-8 (a cut-off character)
        become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _is_id(self, i: object) -> bool:
        try:
            self._encoding.decode_single_token_bytes(i)
        except (KeyError, OverflowError, TypeError):
            return False
        return True

    # -- the vocabulary ----------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        """Number of token ids (the highest id + 1): the size of a model's embedding table."""
        return self._encoding.n_vocab

    @property
    def eot_token(self) -> int:
        """The id of ``<|endoftext|>``, which separates documents."""
        return self._encoding.eot_token

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        return dict(self._specials)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, n_vocab={self.n_vocab}, eot_token={self.eot_token})"

    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merges that build every multi-byte token, in rank order: for each token, BPE on its
        bytes with only the lower ranks leaves two parts, the pair that merges into it."""
        ranks = self._ranks
        merges = []
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            if len(token) > 1:
                parts = _bpe(ranks, token, rank)
                if len(parts) != 2:
                    raise UserError(
                        f"{self.source}: token {token!r} (id {rank}) cannot be made by merging two tokens "
                        "of lower id, so it has no Hugging Face merge"
                    )
                merges.append((parts[0], parts[1]))
        return merges

    def spelled_vocab(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """The vocabulary as Hugging Face and OpenAI spell it (vocab.json and merges.txt): token text
        -> id, the bytes of mergeable tokens written by ``bytes_to_unicode`` and special tokens as
        they are, and the merges in rank order as pairs of token texts."""
        merges = [(_spell(a), _spell(b)) for a, b in self.merges()]
        vocab = {_spell(t): i for t, i in self._ranks.items()}
        vocab.update(sorted(self.special_tokens.items(), key=lambda item: item[1]))
        return vocab, merges

    def save_pretrained(self, directory: str | Path) -> None:
        """Write Hugging Face's tokenizer files (vocab.json, merges.txt, tokenizer.json,
        tokenizer_config.json, special_tokens_map.json), each atomically, that both
        ``Tokenizer.from_pretrained`` and ``transformers.AutoTokenizer.from_pretrained`` load."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab, merges = self.spelled_vocab()
        specials = sorted(self.special_tokens.items(), key=lambda item: item[1])
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(text, special=True, normalized=False) for text, _ in specials])
        roles = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "errors": "replace",
            **roles,
            "added_tokens_decoder": {
                str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
                for text, i in specials
            },
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        files = {
            "vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n",
            "tokenizer.json": hf.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(roles, indent=2) + "\n",
        }
        for name, text in files.items():
            write_atomic(directory / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
        (directory / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)  # an older template would be read first


def find_tokenizer_files(directory: str | Path) -> list[Path]:
    """The files ``Tokenizer.from_pretrained(directory)`` would read; empty when there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory of tokenizer files")
    for names in FILE_SETS:
        if all((directory / name).is_file() for name in names):
            return [directory / name for name in names]
    found = sorted(directory.glob("*.tiktoken"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UserError(f"{directory} holds several .tiktoken files ({names}); keep one")
    return found


def train_tokenizer(
    files: Sequence[str | Path], vocab_size: int, *, special_tokens: Sequence[str] = (ENDOFTEXT,)
) -> Tokenizer:
    """Train a byte-level BPE vocabulary of ``vocab_size`` tokens (256 bytes, merges, then the special
    tokens) on UTF-8 text files, with GPT-2's pre-tokenisation, using the ``tokenizers`` library.

    A corpus too small for that many merges gives a smaller vocabulary.
    """
    specials = list(dict.fromkeys([*special_tokens, ENDOFTEXT]))
    smallest = 256 + len(specials)
    if vocab_size < smallest:
        raise UserError(
            f"vocabulary size {vocab_size} is too small: a byte-level vocabulary holds the 256 bytes and "
            f"{len(specials)} special token(s), so ask for at least {smallest}"
        )
    paths = [Path(f) for f in files]
    if not paths:
        raise UserError("no training files given")
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: no such file; give UTF-8 text files to train on")
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty; give UTF-8 text files to train on")
    trained = trainer_merges(paths, vocab_size - len(specials))
    to_bytes = _unicode_to_bytes()
    ranks = {bytes([b]): i for i, b in enumerate(bytes_to_unicode())}  # GPT-2's order of the bytes
    for pair in trained:
        a, b = pair.split(" ", 1) if isinstance(pair, str) else pair
        token = bytes(to_bytes[c] for c in a + b)
        # Skip a second merge making the same token, and (in theory) a token that merging by rank
        # cannot reach, which would have no Hugging Face merge.
        if token not in ranks and len(_bpe(ranks, token, len(ranks))) == 2:
            ranks[token] = len(ranks)
    return Tokenizer(ranks, {s: len(ranks) + i for i, s in enumerate(specials)}, source="trained vocabulary")


def trainer_merges(paths: Sequence[Path], n_tokens: int) -> list:
    """The merges, in order, that the ``tokenizers`` BPE trainer makes for a byte-level vocabulary of
    ``n_tokens`` on the UTF-8 text files ``paths`` (spelled by ``bytes_to_unicode``); the raw material
    of ``train_tokenizer``."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=n_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(_text_chunks(paths), trainer)
    return json.loads(hf.to_str())["model"]["merges"]


# -- helpers of the loaders and the trainer -----------------------------------------------------------


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE on ``token``'s bytes with the ranks below ``max_rank``: repeatedly merge the adjacent pair
    whose concatenation has the lowest rank, the leftmost of equals (as tiktoken does). A heap of
    candidate pairs makes it O(n log n) on n bytes, where rescanning every pair is O(n^2)."""
    n = len(token)
    nxt = list(range(1, n + 1))  # nxt[i]: where the part starting at byte i ends
    alive = [True] * n  # whether a part starts at byte i
    prev = list(range(-1, n - 1))  # prev[i]: where the part before the one at i starts

    def push(left: int, mid: int, end: int) -> None:
        rank = ranks.get(token[left:end], max_rank)
        if rank < max_rank:
            heapq.heappush(heap, (rank, left, mid, end))

    heap: list[tuple[int, int, int, int]] = []
    for i in range(n - 1):
        push(i, i + 1, i + 2)
    while heap:
        _, left, mid, end = heapq.heappop(heap)
        if not (alive[left] and nxt[left] == mid and nxt[mid] == end):
            continue  # one of the two parts has been merged since
        alive[mid], nxt[left] = False, end
        if end < n:
            prev[end] = left
            push(left, end, nxt[end])
        if left > 0:
            push(prev[left], left, end)
    starts = [i for i in range(n) if alive[i]]
    return [token[i : nxt[i]] for i in starts]


def _check_ids(ranks: dict[bytes, int], specials: dict[str, int], source: str) -> None:
    """What tiktoken needs: every single byte present, every id used once."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(
            f"{source} is not a byte-level BPE vocabulary: {len(missing)} of the 256 single bytes are "
            f"missing (first: byte {missing[0]})"
        )
    ids = [*ranks.values(), *specials.values()]
    if len(set(ids)) != len(ids) or min(ids) < 0:
        seen: set[int] = set()
        bad = next(i for i in ids if i < 0 or i in seen or seen.add(i))
        raise UserError(f"{source}: token id {bad} is {'negative' if bad < 0 else 'used twice'}")


def _compact(ranks: dict[bytes, int]) -> None:
    """Make ``ranks``'s entries again, in place. Made while a file was parsed, they lie among the
    parser's objects, and once those are freed the half-empty pages between them stay with the
    process (Python returns only empty ones): 12 MB more for GPT-2's 50,257 tokens than made afresh.
    So the loaders free what they parsed before a ``Tokenizer`` is made of its ranks."""
    tokens, ids = b"".join(ranks), array.array("q", ranks.values())
    ends = array.array("q", itertools.accumulate(map(len, ranks)))
    ranks.clear()
    for start, end, i in zip(itertools.chain([0], ends), ends, ids, strict=False):
        ranks[tokens[start:end]] = i


def _read_tokenizer_json(path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """The ranks and special tokens of a Hugging Face tokenizer.json (a GPT-2 byte-level BPE one)."""
    data = _read_json(path)
    with _structure_of(path):
        model, pre = data["model"], data.get("pre_tokenizer") or {}
        if model["type"] != "BPE":
            raise UserError(f"{path} holds a {model['type']} model, not a BPE vocabulary")
        byte_level = pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
        affixes = model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
        if not byte_level or data.get("normalizer") or affixes:
            raise UserError(
                f"{path} is not a GPT-2 byte-level BPE vocabulary: it needs a ByteLevel pre-tokenizer "
                "without prefix space, no normalizer and no subword prefix or suffix"
            )
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        added = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
        vocab = _checked_vocab(model["vocab"], path)
    return _ranks_from_merges(vocab, merges, {ENDOFTEXT: None, **added}, str(path))


def _read_vocab_and_merges(vocab_file: Path, merges_file: Path, declared: dict[str, int | None]
                           ) -> tuple[dict[bytes, int], dict[str, int]]:
    """The ranks and special tokens of a vocab.json + merges.txt (or encoder.json + vocab.bpe) pair.
    (A function of its own, like ``_read_tokenizer_json``: the files' parsed text is freed when it
    returns, before ``Tokenizer`` compacts the ranks.)"""
    vocab = _checked_vocab(_read_json(vocab_file), vocab_file)
    merges = _read_merges(merges_file)
    return _ranks_from_merges(vocab, merges, declared, f"{vocab_file} + {merges_file.name}")


def _ranks_from_merges(
    vocab: dict[str, int],
    merges: list[tuple[str, ...]],
    declared_specials: dict[str, int | None],
    source: str,
) -> tuple[dict[bytes, int], dict[str, int]]:
    """tiktoken ranks from a Hugging Face / OpenAI vocabulary (tokens spelled by ``bytes_to_unicode``)
    and merges, after checking that tiktoken's merging by rank gives the same tokens."""
    problem = f"{source} is not a GPT-2 byte-level BPE vocabulary: "
    to_bytes = _unicode_to_bytes()
    ranks: dict[bytes, int] = {}
    for char in bytes_to_unicode().values():
        if char not in vocab:
            raise UserError(problem + f"the byte token {char!r} is missing")
        ranks[bytes([to_bytes[char]])] = vocab[char]
    previous = -1
    for number, pair in enumerate(merges, 1):
        merge = f"{problem}merge {number} {' '.join(pair)!r}"
        merged = _checked_merge(vocab, pair, previous, to_bytes, merge)
        previous = vocab[merged]
        ranks[bytes(to_bytes[c] for c in merged)] = previous
    made = set(to_bytes) | {pair[0] + pair[1] for pair in merges}  # bytes, then what merges make
    return ranks, _specials(vocab, made, declared_specials, problem)


def _checked_merge(
    vocab: dict[str, int], pair: tuple[str, ...], previous: int, alphabet: dict[str, int], merge: str
) -> str:
    """The token that ``pair`` merges into, checked against the vocabulary, GPT-2's byte ``alphabet``
    and the merge order (``previous``: the id the merge before made); ``merge`` names it in errors."""
    if len(pair) != 2 or not all(pair):
        raise UserError(f"{merge} is not a pair of tokens")
    for part in pair:
        if part not in vocab:
            raise UserError(f"{merge} uses {part!r}, which is not in it")
    merged = pair[0] + pair[1]
    if merged not in vocab:
        raise UserError(f"{merge} makes {merged!r}, which is not in it")
    if not all(c in alphabet for c in merged):
        raise UserError(f"{merge} is not written in GPT-2's byte alphabet (bytes_to_unicode)")
    if vocab[merged] <= previous:
        raise UserError(
            f"{merge} makes id {vocab[merged]}, not above the id "
            f"{previous} of the merge before it (tiktoken needs merges in id order)"
        )
    return merged


def _specials(
    vocab: dict[str, int], made: set[str], declared: dict[str, int | None], problem: str
) -> dict[str, int]:
    """The special tokens: declared ones, in the vocabulary or not; every other token must be made."""
    specials = {text: i for text, i in declared.items() if i is not None and text not in vocab}
    leftover = []
    for text, i in vocab.items():
        if text in made:
            continue
        if text in declared:
            specials[text] = i
        else:
            leftover.append((text, i))
    if leftover:
        raise UserError(
            problem + f"{len(leftover)} tokens are neither bytes, made by a merge, nor special tokens "
            f"(first: {leftover[0][0]!r}, id {leftover[0][1]}); are the merges cut short?"
        )
    return specials


def _declared_specials(directory: Path) -> dict[str, int | None]:
    """Special tokens that Hugging Face's side files name (text -> id where they give one)."""
    declared: dict[str, int | None] = {ENDOFTEXT: None}
    config, roles, added = (directory / name for name in ("tokenizer_config.json", "special_tokens_map.json",
                                                          "added_tokens.json"))
    if config.is_file():
        with _structure_of(config):
            for i, token in (_read_json(config).get("added_tokens_decoder") or {}).items():
                declared[token["content"]] = int(i)
    if roles.is_file():
        with _structure_of(roles):
            for value in _read_json(roles).values():
                for token in value if isinstance(value, list) else [value]:
                    declared.setdefault(token["content"] if isinstance(token, dict) else str(token), None)
    if added.is_file():
        declared.update(_checked_vocab(_read_json(added), added))
    return declared


@contextlib.contextmanager
def _structure_of(path: Path) -> Iterator[None]:
    """Turn a missing key or a value of the wrong type in a JSON file into a UserError naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path} does not have the layout of a Hugging Face tokenizer file ({e!r})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a vocabulary file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); is it a vocabulary file?") from None


def _read_json(path: Path) -> dict:
    return parse_json_object(_read_text(path), str(path))


def _checked_vocab(vocab: object, path: Path) -> dict[str, int]:
    """``vocab`` if it maps token text to integer ids."""
    if not isinstance(vocab, dict):
        raise UserError(f"{path} is not a vocabulary: expected a JSON object of token -> id")
    bad = next((k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)), None)
    if bad is not None:
        raise UserError(f"{path} is not a vocabulary: token {bad!r} maps to {vocab[bad]!r}, not an id")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, ...]]:
    """Merge pairs of merges.txt / vocab.bpe: an optional ``#version`` line, then ``A B`` per line."""
    lines = _read_text(path).split("\n")
    header = lines[0].startswith("#version")
    merges = []
    for number, line in enumerate(lines[header:], 1 + header):
        if not line:
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2 or not all(pair):
            raise UserError(f"{path}: line {number} is not a merge 'TOKEN TOKEN' ({line[:40]!r})")
        merges.append(pair)
    return merges


def _text_chunks(paths: Sequence[Path], chunk_chars: int = 1 << 20) -> Iterator[str]:
    """The text of ``paths`` in pieces of about ``chunk_chars``, cut at line ends; binary or non-UTF-8
    files are refused."""
    for path in paths:
        chunk: list[str] = []
        size = 0
        try:
            with open(path, encoding="utf-8", newline="") as f:
                for line in f:
                    if "\0" in line:
                        raise UserError(f"{path} holds NUL bytes: it is binary, not a text file to train on")
                    chunk.append(line)
                    size += len(line)
                    if size >= chunk_chars:
                        yield "".join(chunk)
                        chunk, size = [], 0
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8 first") from None
        if chunk:
            yield "".join(chunk)
