"""benchmarks/speculative.py in its --smoke mode: a model and a draft model trained for a few steps on the
demo corpus, every task decoded plainly, with prompt lookup and with the draft model, each engine in its
own process; the table has a row per task and method for ours and for llama.cpp (figures when
llama-cpp-python is installed, else the reason), and prompt lookup gives our plain text."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import printed_table

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["summaries", "editing", "code", "quotes", "free"]
METHODS = ["ours plain", "ours lookup", "ours draft model", "llama.cpp plain", "llama.cpp lookup"]


@pytest.mark.slow
def test_the_speculative_benchmark_runs_in_its_smoke_mode(shakespeare_files: list[Path], tmp_path: Path
                                                          ) -> None:
    command = [sys.executable, ROOT / "benchmarks" / "speculative.py", "--smoke", "--work", tmp_path]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(r["task"], r["method"]): r for r in printed_table(result.stdout, "task")}
    assert sorted(rows) == sorted((task, method) for task in TASKS for method in METHODS), list(rows)
    llama = importlib.util.find_spec("llama_cpp") is not None
    for (_, method), row in rows.items():
        if method.startswith("llama.cpp") and not llama:
            assert row["tok/s"] == "n/a: llama_cpp is not importable (pip install llama-cpp-python)", row
            continue
        assert float(row["tok/s"].rstrip("*")) > 0, row
        if method.endswith("lookup") or method.endswith("draft model"):
            assert row["acceptance"].endswith("%"), row
    for task in TASKS:
        assert rows[task, "ours lookup"]["same text"] == "yes", rows[task, "ours lookup"]
        assert float(rows[task, "ours lookup"]["speed-up"].rstrip("x")) > 0
    assert "targets:" in result.stdout
