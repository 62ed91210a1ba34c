"""Chat and instruction data: JSON lines of conversations to token shards with a loss mask.

Each line is one example in one of three formats:

- OpenAI's fine-tuning format: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``,
  in the shapes the server takes too (``gpt2.tokenizer.chat_template.check_messages``: the
  ``developer`` role as ``system``, content as a list of text parts); an assistant message with
  ``"weight": 0`` is not trained on;
- prompt-completion (TRL's): ``{"prompt": ..., "completion": ...}``: a user turn and the reply;
- Alpaca's: ``{"instruction": ..., "input": ... (optional), "output": ...}``: the instruction (and its
  input after a blank line) as a user turn, the output as the reply.

An example is rendered with the chat template (``gpt2.tokenizer.chat_template``) and tokenised; the tokens of
the assistant's turns, end-of-turn marker included, are the ones trained on. Examples are packed
whole into windows of ``seq_len`` tokens, the rest of a window padded with ``<|endoftext|>``; the
trainer keeps attention and positions within each example (``Transformer.forward``'s ``segments``),
so an example trains as if it were alone. An example longer than a window is truncated to it or
dropped (``too_long``); one left with no trained token is dropped either way, and data where every
example is dropped so is refused. A line longer than ``MAX_EXAMPLE_BYTES`` is refused.

On disk, beside llm.c's token shards (``train_000000.bin``, windows one after the other, then one
padding token, so the shard holds exactly its windows' samples), ``train_000000.mask.npy`` holds a
uint8 per token: ``LOSS`` (1) where the token is a target to learn, ``START`` (2) where an example
(or a window's padding) begins. ``chat.json`` records the window length and the counts. Validation
shards hold whole held-out examples, spread evenly over the input.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gpt2.data.prepare import json_lines
from gpt2.data.shards import DEFAULT_SHARD_TOKENS, LOSS, START, check_vocab_size, write_mask, write_shard
from gpt2.tokenizer.bpe import Tokenizer
from gpt2.tokenizer.chat_template import GPT2_CHAT_TEMPLATE, ChatTemplate, Message, check_messages
from gpt2.util.atomic import building_dir, write_atomic
from gpt2.util.errors import UserError
from gpt2.util.jsonfile import check_field, parse_json, read_json_object

CHAT_INFO = "chat.json"
TOO_LONG = ("truncate", "drop")
FORMATS = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"),
           "alpaca": ("instruction", "output")}
_CHAT_START = re.compile(rb'\s*\{\s*"(messages|prompt|instruction)"\s*:')
# The most one example's line may hold. An example is cut to one window (--seq-len tokens, 1024 by
# default: some kilobytes), and reading, rendering and tokenising one takes memory in proportion to it,
# so a longer line is refused (and read no further) rather than letting one line decide the peak.
MAX_EXAMPLE_BYTES = 1 << 22


def is_chat_file(path: str | Path) -> bool:
    """Whether ``path`` is a .jsonl file whose first example has a chat format's keys."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open("rb") as f:
        for raw in iter(lambda: f.readline(MAX_EXAMPLE_BYTES + 1), b""):
            if raw.strip():
                if len(raw) > MAX_EXAMPLE_BYTES:  # too long to parse: its first key tells (and
                    return _CHAT_START.match(raw) is not None  # read_examples refuses it)
                try:  # not UTF-8 is no sign of a text corpus: read_examples names the line
                    record = parse_json(raw.decode("utf-8", errors="replace"), str(path))
                except UserError:  # then it is read as text, whose reading names what is wrong
                    return False
                return isinstance(record, dict) and _format_of(record) is not None
    return False


def _format_of(record: dict) -> str | None:
    return next((name for name, keys in FORMATS.items() if all(k in record for k in keys)), None)


def example_messages(record: object, where: str) -> list[Message]:
    """The conversation of one example in any of the three formats, checked: known roles, string
    contents, at least one assistant turn."""
    kind = _format_of(record) if isinstance(record, dict) else None
    if kind is None:
        raise UserError(f"{where}: not a chat example; give {{\"messages\": [...]}}, "
                        '{"prompt": ..., "completion": ...} or {"instruction": ..., "output": ...}')
    assert isinstance(record, dict)
    if kind == "messages":
        messages = check_messages(record["messages"], where)
    else:
        keys = (*FORMATS[kind], "input") if kind == "alpaca" else FORMATS[kind]
        bad = next((k for k in keys if not isinstance(record.get(k, ""), str)), None)
        if bad is not None:
            raise UserError(f"{where}: {bad!r} must be a string, got {type(record[bad]).__name__}")
        if kind == "prompt-completion":
            question, reply = record["prompt"], record["completion"]
        else:
            given = record.get("input", "")
            question = record["instruction"] + (f"\n\n{given}" if given else "")
            reply = record["output"]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing to learn; add one")
    return messages


def example_weights(record: dict, where: str) -> list[bool]:
    """For each assistant message of an example, whether it is trained on: OpenAI's fine-tuning format
    gives an assistant message ``"weight": 0`` to leave it out (1, or no weight, trains on it)."""
    if _format_of(record) != "messages":
        return [True]
    weights = []
    for i, message in enumerate(record["messages"]):
        weight = message.get("weight", 1)
        if type(weight) is not int or weight not in (0, 1):
            raise UserError(f"{where}: message {i} has weight {weight!r}; a weight is 0 (not trained on) "
                            "or 1 (trained on)")
        if message["role"] == "assistant":
            weights.append(weight == 1)
    return weights


def read_examples(files: Sequence[Path]) -> Iterator[tuple[list[Message], list[bool], str]]:
    """Every example of the .jsonl ``files`` in order: its messages, whether each assistant message is
    trained on (``example_weights``), and where it is (``file:line``). A line that is not UTF-8 or
    longer than ``MAX_EXAMPLE_BYTES`` is a one-line error naming it."""
    for path in files:
        seen = False
        for where, record in json_lines(path, bytes.decode, MAX_EXAMPLE_BYTES):
            seen = True
            messages = example_messages(record, where)
            assert isinstance(record, dict)
            yield messages, example_weights(record, where), where
        if not seen:
            raise UserError(f"{path}: holds no examples; give one JSON object per line")


@dataclass
class ChatCounts:
    """What ``prepare_chat`` wrote: examples and tokens per split, and what did not fit."""

    seq_len: int
    examples: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    trained_tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    windows: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    truncated: int = 0
    dropped: int = 0


class WindowWriter:
    """Packs examples whole into windows of ``seq_len`` tokens and writes them as shards of
    ``windows_per_shard`` windows (plus the one padding token that ends each shard) and their masks.
    The buffers are left unwritten until used (and so take no memory until then): a small dataset
    does not pay for a full shard."""

    def __init__(self, directory: Path, split: str, seq_len: int, windows_per_shard: int, pad: int) -> None:
        self.directory, self.split, self.seq_len, self.pad = directory, split, seq_len, pad
        size = windows_per_shard * seq_len + 1
        self.tokens = np.empty(size, dtype=np.uint16)
        self.mask = np.empty(size, dtype=np.uint8)
        self.filled = 0  # tokens in the buffer's finished windows and the current one
        self.shards = self.windows = 0

    def add(self, ids: Sequence[int], trained: Sequence[bool]) -> None:
        """Append one example (at most ``seq_len`` tokens), in a new window if it does not fit this one."""
        room = self.seq_len - self.filled % self.seq_len
        if len(ids) > room:
            self._pad_window()
        n, at = len(ids), self.filled
        self.windows += at % self.seq_len == 0
        self.tokens[at : at + n] = ids
        self.mask[at : at + n] = np.asarray(trained, dtype=np.uint8) * LOSS
        self.mask[at] |= START
        self.filled += n
        if self.filled == len(self.tokens) - 1:
            self._write()

    def _pad_window(self) -> None:
        if self.filled % self.seq_len:
            end = self.filled + self.seq_len - self.filled % self.seq_len
            self.tokens[self.filled : end] = self.pad
            self.mask[self.filled : end] = 0
            self.mask[self.filled] = START  # the padding is a segment of its own
            self.filled = end
            if self.filled == len(self.tokens) - 1:
                self._write()

    def close(self) -> None:
        """Write what remains."""
        self._pad_window()
        if self.filled:
            self._write()

    def _write(self) -> None:
        n = self.filled
        self.tokens[n], self.mask[n] = self.pad, START
        name = f"{self.split}_{self.shards:06d}"
        write_shard(self.directory / f"{name}.bin", self.tokens[: n + 1])
        write_mask(self.directory / f"{name}.bin", self.mask[: n + 1])
        self.shards += 1
        self.filled = 0


def prepare_chat(
    files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: Tokenizer,
    template: ChatTemplate | None = None,
    seq_len: int = 1024,
    too_long: str = "truncate",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_fraction: float = 0.05,
    overwrite: bool = False,
) -> ChatCounts:
    """Render, tokenise, mask and pack the examples of ``files`` into ``out_dir`` (see the module's
    docstring), with the tokenizer saved beside them carrying the template (by default the
    tokenizer's own, else GPT-2's). The directory appears complete or not at all."""
    template = template or ChatTemplate.of(tokenizer) or ChatTemplate(GPT2_CHAT_TEMPLATE, "GPT-2's template")
    _check_options(template, seq_len, too_long, val_fraction)
    check_vocab_size(tokenizer.n_vocab)
    counts = ChatCounts(seq_len)
    with building_dir(out_dir, overwrite=overwrite) as tmp:
        per_shard = max(1, shard_tokens // seq_len)
        writers = {split: WindowWriter(tmp, split, seq_len, per_shard, tokenizer.eot_token)
                   for split in ("train", "val")}
        held: tuple[list[int], list[bool]] | None = None  # the newest example, routed once the next comes
        for messages, weights, where in read_examples([Path(f) for f in files]):
            try:
                encoded = template.encode(messages, tokenizer, trained_turns=weights)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
            example = _fitted(encoded, seq_len, too_long, counts)
            if example is None:
                continue
            if held is not None:
                _route(held, writers, counts, val_fraction, last=False)
            held = example
        if held is None:  # training would see a loss of 0 throughout
            raise UserError(f"{', '.join(map(str, files))}: no example has a token to train on (all "
                            f"{counts.dropped} have every assistant message at \"weight\": 0 or past "
                            f"--seq-len {seq_len}); give assistant messages weight 1 or raise --seq-len")
        _route(held, writers, counts, val_fraction, last=True)
        if not counts.examples["train"]:
            raise UserError(f"{counts.examples['val']} example(s) fit --seq-len {seq_len}, too few for "
                            "training and validation; add examples, raise --seq-len or use --val-fraction 0")
        for split, writer in writers.items():
            writer.close()
            counts.windows[split] = writer.windows
        saved = copy.copy(tokenizer)
        saved.chat_template = template.source
        saved.save_pretrained(tmp)
        info = {"format": "chat", **asdict(counts), "mask": {"loss": LOSS, "start": START}}
        write_atomic(tmp / CHAT_INFO, lambda path: path.write_text(json.dumps(info, indent=2) + "\n"))
    return counts


def _check_options(template: ChatTemplate, seq_len: int, too_long: str, val_fraction: float) -> None:
    if not template.marks_replies:
        raise UserError(f"{template.origin} marks no assistant part to train on: wrap each assistant turn "
                        "in {% generation %}...{% endgeneration %} (as transformers and TRL expect)")
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if too_long not in TOO_LONG:
        raise UserError(f"--too-long must be one of {', '.join(TOO_LONG)}, got {too_long!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")


def _fitted(example: tuple[list[int], list[bool]], seq_len: int, too_long: str,
            counts: ChatCounts) -> tuple[list[int], list[bool]] | None:
    """The example cut to ``seq_len`` tokens (or None: dropped), counted in ``counts``."""
    ids, trained = example
    if len(ids) > seq_len:
        if too_long == "drop":
            counts.dropped += 1
            return None
        ids, trained = ids[:seq_len], trained[:seq_len]
        counts.truncated += 1
    if not any(trained[1:]):  # an example's first token is never a target
        counts.dropped += 1
        return None
    return ids, trained


def _route(example: tuple[list[int], list[bool]], writers: dict[str, WindowWriter], counts: ChatCounts,
           val_fraction: float, *, last: bool) -> None:
    """Send the ``n``-th example to validation when ``val_fraction`` of the examples so far says so
    (evenly spread), and the last one when validation would otherwise be empty."""
    n, f = sum(counts.examples.values()), val_fraction
    to_val = int((n + 1) * f) > int(n * f) or (last and f > 0 and not counts.examples["val"] and n > 0)
    split = "val" if to_val else "train"
    ids, trained = example
    writers[split].add(ids, trained)
    counts.examples[split] += 1
    counts.trained_tokens[split] += sum(trained[1:])


def read_chat_info(directory: str | Path) -> dict | None:
    """The ``chat.json`` of a directory of chat shards (None: plain text shards)."""
    path = Path(directory) / CHAT_INFO
    if not path.is_file():
        return None
    info = read_json_object(path)
    check_field(info, "seq_len", (int,), str(path))
    if info.get("seq_len", 0) < 1:
        raise UserError(f"{path}: seq_len must be a positive integer; prepare the data again")
    return info
