"""What fits in this machine's memory: a size that is legal but would not fit is refused up front,
with the estimate, instead of running the machine out of memory part way."""

from __future__ import annotations

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
