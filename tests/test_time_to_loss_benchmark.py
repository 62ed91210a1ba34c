"""benchmarks/time_to_loss.py in its --smoke mode: transformers, ours AdamW and ours Muon each train in
their own process for a few seconds, and the table has a row of figures for each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import printed_table

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"transformers GPT2LMHeadModel": "float32", "ours AdamW": "(bfloat16|float32)",
           "ours Muon": "(bfloat16|float32)"}


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


@pytest.mark.slow
def test_the_time_to_loss_benchmark_runs_in_its_smoke_mode(
    tmp_path: Path, shakespeare_files: list[Path]
) -> None:
    command = [sys.executable, ROOT / "benchmarks" / "time_to_loss.py", "--smoke", "--work", tmp_path]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = printed_table(result.stdout, "vocab")
    assert [row["vocab"] for row in rows] == ["512"] * 3
    for row, (engine, dtype) in zip(rows, ENGINES.items(), strict=True):
        assert re.fullmatch(f"{engine} {dtype}", row["engine"]), row
        for column in ("final val loss", "steps", "tokens", "train s", "peak MB", "peak vs transformers"):
            assert number(row[column]) > 0, (column, row)
        assert 0 < number(row["final val loss"]) < 10, row  # ln 512 = 6.2 at the start
        assert number(row["train s"]) >= 3.0, row  # the budget: 0.05 min of training
        if row["s to target"] != "not reached":
            assert number(row["s to target"]) > 0 and number(row["tokens to target"]) > 0, row
    assert rows[0]["time vs transformers"] == "1.00x" and rows[0]["peak vs transformers"] == "1.00x"
    assert "target: ours Muon reaches transformers' final validation loss" in result.stdout
