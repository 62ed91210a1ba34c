"""benchmarks/precision.py in its --smoke mode: a model trained on the demo corpus, scored on held-out
text at every precision (and in llama.cpp when it is importable), prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.config import PRECISIONS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_precision_benchmark_runs_in_its_smoke_mode(shakespeare_files: list[Path]) -> None:
    result = subprocess.run([sys.executable, ROOT / "benchmarks" / "precision.py", "--smoke"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("held-out perplexity") and lines[1].split()[:2] == ["precision", "ours"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.split()[0] in PRECISIONS}
    assert list(rows) == list(PRECISIONS)
    assert rows["fp32"][2] == "+0.00%" and all(float(row[1]) > 1 for row in rows.values())
