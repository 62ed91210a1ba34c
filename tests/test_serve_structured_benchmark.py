"""benchmarks/serve_structured.py in its --smoke mode: free text, a JSON schema and a regex decoded
by the engine in one run, and the table has a row of figures for each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import printed_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_structured_output_benchmark_runs_in_its_smoke_mode(gpt2_ranks_file: Path) -> None:
    command = [sys.executable, ROOT / "benchmarks" / "serve_structured.py", "--smoke", "--ranks",
               gpt2_ranks_file]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = printed_table(result.stdout, "format")
    assert [row["format"] for row in rows] == ["text", "json_schema", "regex"]
    for row in rows:
        assert 0 < int(row["tokens"]) <= 4 * 8, row
        assert float(row["ms/token"]) > 0 and float(row["vs text"].rstrip("x")) > 0, row
    assert rows[0]["vs text"] == "1.00x" and rows[0]["mask ms/token"] == "-"
    assert all(float(row["mask ms/token"]) > 0 for row in rows[1:]), rows
