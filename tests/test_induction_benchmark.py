"""benchmarks/induction_heads.py in its --smoke mode: a toy model trained for a few steps, its head
scores, ablations and patching as tables, and run_with_cache timed beside TransformerLens's in their own
processes on a small shape (TransformerLens's row says why when it is not installed)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import printed_table

ROOT = Path(__file__).resolve().parents[1]
TIMING = ["ms", "loaded MB", "peak MB", "cache MB", "entries"]  # positive; run MB may be 0 on a tiny shape


def number(cell: str) -> float:
    """A figure's value (``*`` marks a disturbed run, ``x`` a ratio, ``+`` an increase)."""
    return float(cell.rstrip("*x"))


@pytest.mark.slow
def test_the_induction_benchmark_runs_in_its_smoke_mode(tmp_path: Path) -> None:
    command = [sys.executable, ROOT / "benchmarks" / "induction_heads.py", "--smoke", "--work", tmp_path]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for first in ("induction score", "previous-token score", "patching share"):  # layers x heads
        rows = printed_table(out, first)
        assert [row[first] for row in rows] == ["L0", "L1"], (first, rows)
        assert all(set(row) == {first, "H0", "H1"} for row in rows), rows
        numbers = [number(row[h]) for row in rows for h in ("H0", "H1")]
        if first != "patching share":
            assert all(0 <= n <= 1 for n in numbers), rows
    ablation = {row["ablation"]: row for row in printed_table(out, "ablation")}
    for label in ("none", "induction heads (1, named)", "other 1: mean of 3", "other 1: largest"):
        assert label in ablation, (label, list(ablation))
    for label, row in ablation.items():
        for column in ("zero: loss", "mean: loss"):
            assert number(row[column]) > 0, (label, row)
        if label != "none":
            assert all(row[column][0] in "+-" for column in ("zero: +", "mean: +")), (label, row)
    engines = {row["engine"]: row for row in printed_table(out, "engine")}
    assert list(engines) == ["ours run_with_cache", "TransformerLens run_with_cache"], engines
    assert all(number(engines["ours run_with_cache"][c]) > 0 for c in TIMING), engines
    assert number(engines["ours run_with_cache"]["run MB"]) >= 0, engines
    if importlib.util.find_spec("transformer_lens") is None:
        assert engines["TransformerLens run_with_cache"]["ms"].startswith("n/a: transformer_lens"), engines
    else:
        lens = engines["TransformerLens run_with_cache"]
        assert all(number(lens[c]) > 0 for c in TIMING) and number(lens["run MB"]) >= 0, engines
        assert lens["entries"] == engines["ours run_with_cache"]["entries"]
        assert number(engines["ours run_with_cache"]["time vs TL"]) > 0
        assert "  the same activations: ok" in out
    assert "targets:" in out and "  trained: " in out
