"""What fits in this machine's memory: a size that is legal but would not fit is refused up front,
with the estimate, instead of running the machine out of memory part way. And handing freed memory
back to the system while loading a model, and moving a model's weights onto 2 MB pages."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

from gpt2.util.errors import UserError

GIB = 2**30
_HUGE_PAGE = 2 << 20
_MADV_COLLAPSE = 25  # Linux 6.1's madvise: collapse a range's pages into 2 MB pages now


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


def huge_pages(regions: dict[int, int]) -> None:
    """Move the memory of ``regions`` (address -> bytes) onto 2 MB pages, in place: the 2 MB pages each
    covers wholly (Linux's MADV_COLLAPSE; nothing where the kernel or its settings refuse). Streaming
    a large tensor from 4 KB pages pays a page walk every 4 KB, so decoding, which streams every
    weight per token, runs faster from 2 MB pages; collapsing them costs time once, at load."""
    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return
    for address, size in regions.items():
        start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
        end = (address + size) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_COLLAPSE))
