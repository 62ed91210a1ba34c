"""llm.c's token shards on disk: a header of 256 little-endian int32 (magic 20240520, version 1, token
count), then the tokens as uint16, so shards made by llm.c's or modded-nanogpt's scripts train here
unchanged and ours open there. Free of torch (the command line describes them without loading it).

Chat shards (``gpt2.data.chat``) add a loss mask beside each shard: ``NAME.mask.npy``, numpy's format,
one uint8 per token: ``LOSS`` where the token is a target to learn, ``START`` where an example
begins. The token shard itself stays llm.c's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt2.util.atomic import write_atomic
from gpt2.util.errors import UserError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 2**16  # token ids are stored as uint16
DEFAULT_SHARD_TOKENS = 10**8  # llm.c's shard size
MASK_SUFFIX = ".mask.npy"
LOSS, START = 1, 2  # bits of a mask


def check_vocab_size(n_vocab: int) -> None:
    """Refuse a vocabulary whose ids do not fit uint16 shards."""
    if n_vocab > MAX_VOCAB:
        raise UserError(f"the tokenizer has {n_vocab:,} tokens but llm.c shards store ids as uint16 "
                        f"(at most {MAX_VOCAB:,}); use a smaller vocabulary")


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write ``tokens`` (ids < 65,536) as an llm.c shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= MAX_VOCAB:
        raise UserError(f"{path}: token id {int(tokens.max())} does not fit a uint16 shard")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    ids = tokens.astype("<u2", copy=False)  # no copy of a uint16 buffer: a shard is held once

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            f.write(header.tobytes())
            ids.tofile(f)

    write_atomic(Path(path), write)


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of an llm.c shard as a read-only uint16 memmap; a wrong header is a UserError."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise UserError(f"{path}: {size} bytes is too short for an llm.c shard header; prepare it again")
    magic, version, count = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic != SHARD_MAGIC:
        raise UserError(
            f"{path}: not an llm.c token shard (magic number {magic}, expected {SHARD_MAGIC}); "
            "make shards with `gpt2 prepare`"
        )
    if version != SHARD_VERSION:
        raise UserError(
            f"{path}: shard version {version} is not supported (only version {SHARD_VERSION}, uint16 "
            "GPT-2 tokens); prepare the data with `gpt2 prepare`"
        )
    if size != HEADER_BYTES + 2 * count:
        raise UserError(
            f"{path}: the header counts {count} tokens but the file holds {(size - HEADER_BYTES) / 2:g}; "
            "the shard is truncated or corrupt, prepare it again"
        )
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def find_shards(directory: str | Path, split: str) -> list[Path]:
    """The shards of ``split`` ("train" or "val") in ``directory``, in name order; names as llm.c's
    (``fineweb_train_000001.bin``, ``tiny_shakespeare_val.bin``) or ours (``train_000000.bin``)."""
    return sorted(p for p in Path(directory).glob(f"*{split}*.bin") if p.is_file())


def mask_path(shard: Path) -> Path:
    """Where the loss mask of ``shard`` (``train_000000.bin``) is: ``train_000000.mask.npy``."""
    return shard.with_name(shard.name.removesuffix(".bin") + MASK_SUFFIX)


def write_mask(shard: Path, mask: np.ndarray) -> None:
    """Write the loss mask (uint8, one per token) of ``shard``, atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.save would add ".npy" to the temporary name
            np.save(f, np.asarray(mask, dtype=np.uint8))

    write_atomic(mask_path(shard), write)


def read_mask(shard: Path, length: int) -> np.ndarray | None:
    """The loss mask beside ``shard`` as a read-only memmap (None when it has none), checked against
    the shard's ``length``."""
    path = mask_path(shard)
    if not path.is_file():
        return None
    try:
        mask = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the loss mask ({e}); prepare the data again") from None
    if mask.shape != (length,) or mask.dtype != np.uint8:
        raise UserError(f"{path}: a mask of {mask.shape} {mask.dtype} does not fit {shard} ({length} "
                        "tokens); prepare the data again")
    return mask
