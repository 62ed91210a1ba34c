"""benchmarks/generate.py in its --smoke mode: every engine that is installed runs in its own process on
the same tiny model, and the table has a row of figures for transformers, ours at each precision and
CTranslate2 (and llama.cpp, when llama-cpp-python is installed)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import printed_table, shared_file

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ["b1 tok/s", "b8 tok/s", "prefill 512 ms", "weights MB", "peak MB", "GB/s", "same tokens"]


def number(cell: str) -> float:
    """A figure's value (``*`` marks a disturbed run; ``%`` a share)."""
    return float(cell.rstrip("*%"))


@pytest.mark.slow
def test_the_generation_benchmark_runs_in_its_smoke_mode(tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    shared = shared_file("gpt2.tiktoken").parent
    command = [sys.executable, ROOT / "benchmarks" / "generate.py", "--smoke", "--work", tmp_path]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=os.environ | {"GPT2_SHARED_DATA": str(shared)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["engine"]: r for r in printed_table(result.stdout, "engine")}
    expected = ["transformers fp32", "ours fp32", "ours bf16", "ours int8", "CTranslate2 float32",
                "CTranslate2 int8"]
    if importlib.util.find_spec("llama_cpp") is not None:
        expected += ["llama.cpp F32", "llama.cpp Q8_0"]
    for engine in expected:  # a name may say more in brackets: CTranslate2 int8 (= int8_float32)
        name = next((n for n in rows if re.fullmatch(rf"{re.escape(engine)}( \(.*\))?", n)), engine)
        assert name in rows, (engine, list(rows))
        assert all(number(rows[name][column]) > 0 for column in FIGURES), (name, rows[name])
    assert rows["ours fp32"]["same tokens"] == "100%"
    assert rows["transformers fp32"]["same tokens"] == "100%"
    assert number(rows["ours fp32"]["b1 vs best"].rstrip("x")) > 0
    assert "memory bandwidth" in result.stdout and "targets:" in result.stdout
