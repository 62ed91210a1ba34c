"""What fits in this machine's memory: a size that is legal but would not fit is refused up front,
with the estimate, instead of running the machine out of memory part way. And handing freed memory
back to the system while loading a model."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

from gpt2.errors import UserError

GIB = 2**30


def physical_memory() -> int | None:
    """Bytes of memory this machine has (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(
    nbytes: int, what: str, fix: str, *, total: int | None = None, where: str = "this machine"
) -> None:
    """Refuse ``what`` (needing about ``nbytes``) when it exceeds ``total`` bytes (default: the
    machine's memory) of ``where``; ``fix`` says what to ask for instead."""
    total = physical_memory() if total is None else total
    if total is not None and nbytes > total:
        raise UserError(f"{what} needs about {nbytes / GIB:,.1f} GiB, more than {where}'s "
                        f"{total / GIB:,.1f} GiB of memory; {fix}")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Return the memory freed so far to the system (glibc's ``malloc_trim``; elsewhere nothing).
    glibc keeps freed blocks for reuse, and after large temporaries it serves later tensors from
    them, so loading a model tensor by tensor (reading, converting, quantising) would otherwise hold
    far more at its peak than the model it ends with."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
