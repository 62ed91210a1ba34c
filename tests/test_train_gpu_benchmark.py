"""benchmarks/train_gpu.py in its --smoke mode, on the CPU (no GPU needed): transformers and ours with
both optimisers train the tiny shape with GPT-2's vocabulary, and the table has a row of figures for
each and says that ours computes the loss in chunks where transformers materialises the logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import printed_table

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ["transformers GPT2LMHeadModel (SDPA, eager, full logits)", "ours adamw (eager, chunked loss)",
           "ours muon (eager, chunked loss)"]


@pytest.mark.slow
def test_the_gpu_training_benchmark_runs_on_the_cpu_in_its_smoke_mode() -> None:
    result = subprocess.run([sys.executable, ROOT / "benchmarks" / "train_gpu.py", "--smoke"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["engine"]: r for r in printed_table(result.stdout, "engine")}
    assert list(rows) == ENGINES, list(rows)
    for name, row in rows.items():
        assert float(row["tokens/s"].replace(",", "")) > 0, (name, row)
        assert float(row["vs transformers"].rstrip("x")) > 0, (name, row)
        assert row["MFU"] == row["peak MB"] == "-", (name, row)  # GPU figures: none on the CPU
    assert rows[ENGINES[0]]["vs transformers"] == "1.00x"
    assert "vocabulary 50,257" in result.stdout
    assert "the full logits never held" in result.stdout and "logits and their gradient materialised" in (
        result.stdout)
    assert "target: ours >= 1.5x transformers' tokens/s" in result.stdout
