"""benchmarks/finetune_chat.py in its --smoke mode: the whole measurement (instruction set, base,
full fine-tuning, LoRA, accuracy, the 124M shape's memory and speed) runs and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_fine_tuning_benchmark_runs_in_its_smoke_mode(
    tmp_path: Path, shakespeare_files: list[Path]
) -> None:
    result = subprocess.run([sys.executable, ROOT / "benchmarks" / "finetune_chat.py", "--smoke", "--work",
                             tmp_path], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("held-out exact match (%)") and "reverse" in lines[0]
    assert [line.split()[0] for line in lines[1:4]] == ["base", "full", "lora"]
    assert any(line.startswith("124M   LoRA / full: peak memory") for line in lines)
    assert (tmp_path / "lora" / "latest").is_file()
