"""benchmarks/generate.py in its --smoke mode: every engine that is installed runs in its own process on
the same tiny model, and the table has a row of figures for transformers, ours at each precision and
CTranslate2 (and llama.cpp, when llama-cpp-python is installed), and the row after run_with_hooks;
``--isa`` runs ours forced to a level against llama.cpp from ``--llama-dir``, and refuses in one line
a directory holding no llama_cpp."""

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


def smoke(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    shared = shared_file("gpt2.tiktoken").parent
    command = [sys.executable, ROOT / "benchmarks" / "generate.py", "--smoke", "--work", tmp_path, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"GPT2_SHARED_DATA": str(shared)})


def row_named(rows: dict[str, dict[str, str]], engine: str) -> str:
    """The name of ``engine``'s row (a name may say more in brackets: CTranslate2 int8 (= int8_float32),
    ours int8 [avx2])."""
    return next((n for n in rows if re.fullmatch(rf"{re.escape(engine)}( [(\[].*[)\]])?", n)), engine)


def number(cell: str) -> float:
    """A figure's value (``*`` marks a disturbed run; ``%`` a share)."""
    return float(cell.rstrip("*%"))


@pytest.mark.slow
def test_the_generation_benchmark_runs_in_its_smoke_mode(tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    result = smoke(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["engine"]: r for r in printed_table(result.stdout, "engine")}
    expected = ["transformers fp32", "ours fp32", "ours bf16", "ours int8", "CTranslate2 float32",
                "CTranslate2 int8"]
    if importlib.util.find_spec("llama_cpp") is not None:
        expected += ["llama.cpp F32", "llama.cpp Q8_0"]
    for engine in expected:
        name = row_named(rows, engine)
        assert name in rows, (engine, list(rows))
        assert all(number(rows[name][column]) > 0 for column in FIGURES), (name, rows[name])
    assert rows["ours fp32"]["same tokens"] == "100%"
    assert rows["transformers fp32"]["same tokens"] == "100%"
    assert number(rows["ours fp32"]["b1 vs best"].rstrip("x")) > 0
    assert "memory bandwidth" in result.stdout and "targets:" in result.stdout
    # after run_with_hooks: the inference model built from a model the hooks ran on, beside ours fp32
    hooks = rows["ours fp32, after run_with_hooks"]
    assert all(number(hooks[column]) > 0 for column in FIGURES), hooks
    line = r"^hooks: after run_with_hooks b1 [\d.]+\*? tok/s = [\d.]+x ours fp32"
    assert re.search(line, result.stdout, re.MULTILINE), result.stdout[-2000:]


def test_isa_refuses_a_llama_dir_without_llama_cpp_in_one_line(tmp_path: Path) -> None:
    command = [sys.executable, ROOT / "benchmarks" / "generate.py", "--smoke", "--isa", "avx2",
               "--llama-dir", tmp_path / "nowhere"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--llama-dir" in result.stderr and "no llama_cpp package" in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_isa_runs_ours_forced_against_llama_cpp_from_its_directory(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        pytest.skip("llama-cpp-python is not installed")
    llama_dir = Path(spec.origin).parents[1]  # the installed one stands in for a per-level build
    result = smoke(tmp_path, "--isa", "avx2", "--llama-dir", str(llama_dir), "--only", "int8,Q8_0")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["engine"]: r for r in printed_table(result.stdout, "engine")}
    ours = row_named(rows, "ours int8")
    assert re.fullmatch(r"ours int8 \[(avx2\??|kernels off)\]", ours), list(rows)
    assert set(rows) == {"transformers fp32", ours, "llama.cpp Q8_0"}, list(rows)  # no CTranslate2, no hooks
    for name in rows:
        assert all(number(rows[name][column]) > 0 for column in FIGURES), (name, rows[name])
    assert "ours (GPT2_KERNELS_ISA=avx2): kernels " in result.stdout
    assert f"llama.cpp ({llama_dir.resolve()}): CPU : " in result.stdout
    assert re.search(rf"^  {re.escape(ours)}: b1 .*; same tokens \d+% vs llama.cpp Q8_0's \d+% (ok|MISSED)",
                     result.stdout, re.MULTILINE), result.stdout[-2000:]
