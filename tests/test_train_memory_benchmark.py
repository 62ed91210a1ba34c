"""benchmarks/train_memory.py in its --smoke mode: transformers and ours with both optimisers, in float32
and in the autocast dtype ours picks on this CPU, each in its own process on a micro shape with GPT-2's
vocabulary; the table has a row of figures for each and the target's verdicts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import printed_table

from gpt2.training.trainer import autocast_dtype

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ["transformers GPT2LMHeadModel (full logits)", "ours adamw (chunked loss)",
           "ours muon (chunked loss)"]


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


@pytest.mark.slow
def test_the_training_memory_benchmark_runs_in_its_smoke_mode() -> None:
    result = subprocess.run([sys.executable, ROOT / "benchmarks" / "train_memory.py", "--smoke"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = printed_table(result.stdout, "shape")
    dtypes = list(dict.fromkeys(["float32", str(autocast_dtype("auto", torch.device("cpu")))[6:]]))
    assert [(r["dtype"], r["engine"]) for r in rows] == [(d, e) for d in dtypes for e in ENGINES], rows
    for row in rows:
        assert row["shape"] == "smoke"
        for column in ("peak MB", "train MB", "tokens/s", "peak vs HF", "train vs HF", "tok/s vs HF"):
            assert number(row[column]) > 0, (column, row)
        assert number(row["peak MB"]) > number(row["train MB"]), row  # the imports come on top
        if row["engine"] == ENGINES[0]:
            assert row["peak vs HF"] == row["tok/s vs HF"] == "1.00x", row
    assert "vocabulary 50,257" in result.stdout
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("  smoke ")]
    assert len(verdicts) == len(dtypes), result.stdout
    verdict = r"[\d.]+x \((not )?met\)"
    pattern = rf"  smoke \w+: ours adamw {verdict}, ours muon {verdict}"
    assert all(re.fullmatch(pattern, v) for v in verdicts), verdicts
