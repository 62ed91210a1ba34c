"""Atomic file writes: readers, and a crash half-way, see the old file or the new one, never a part.
An output that is a symbolic link is written through it (the link stays), and ``check_apart`` keeps
every verb's output off its inputs."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from gpt2.util.errors import UserError


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, flush it to disk and rename it to
    ``path``. On any error the temporary file is removed and ``path`` is left as it was."""
    path = followed(Path(path))
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        write(tmp)
        # Writers that replace the file (safetensors makes its own 0600 one): the umask's mode, set here.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def followed(path: Path) -> Path:
    """``path``, or what it names when it is a symbolic link: an output replaced there keeps the link
    (renaming over the link itself would replace the link, and an old directory set aside as a link
    could not be removed)."""
    return _real(path) if path.is_symlink() else path


Inputs = Mapping[str, "str | Path | Iterable[str | Path] | None"]


def check_apart(output: str | Path, inputs: Inputs, option: str = "--out") -> None:
    """Refuse an ``output`` that is, holds or lies inside one of ``inputs`` (what names them, such as
    ``--data``, -> a path or paths), symbolic links followed: replacing it would destroy what is read
    (``prepare DOCS --out DOCS --overwrite``), and writing inside an input would mix the output into
    it. Inputs that are not on disk (a hub model's name, a named corpus) are skipped. Every verb calls
    it with its own inputs before it writes anything."""
    out = _real(Path(output))
    for name, value in inputs.items():
        for given in [value] if value is None or isinstance(value, str | Path) else value:
            if given is None or str(given) == "-" or not os.path.lexists(Path(given).expanduser()):
                continue
            source = _real(Path(given))
            if out == source or out in source.parents or source in out.parents:
                how = "is" if out == source else "holds" if out in source.parents else "lies inside"
                raise UserError(f"{option} {output} {how} the {name} {given}: writing it would destroy or "
                                f"mix with what is read; choose an {option} apart from every input")


def _real(path: Path) -> Path:
    """``path`` absolute, with every symbolic link followed."""
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise UserError(f"{path}: cannot follow its symbolic links ({e}); remove the loop or choose another "
                        "path") from None


def _umask() -> int:
    """The process's umask (reading it means setting it: put straight back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    """Flush ``directory``'s entries to disk, so that renames inside it survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Flush the finished directory ``new`` to disk and rename it to ``target``; an old ``target`` is
    set aside first and removed only once the new one is in place."""
    for p in new.iterdir():
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(new)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    new.rename(target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def building_dir(target: str | Path, *, overwrite: bool, option: str = "--out") -> Iterator[Path]:
    """A fresh temporary directory beside ``target`` to fill; when the block ends without an error it
    becomes ``target`` (``replace_dir``), otherwise it is removed and ``target`` is left as it was.
    A ``target`` that already holds files is refused unless ``overwrite``; ``option`` names the flag
    that chose it, for that message. A ``target`` that is a symbolic link: what it names is replaced."""
    target = followed(Path(target))
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not overwrite):
        raise UserError(f"{target} already exists and is not empty; choose another {option} or add "
                        "--overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
