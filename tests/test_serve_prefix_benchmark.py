"""benchmarks/serve_prefix.py in its --smoke mode: prompts sharing a prefix, one by one and all at once,
with the prefix cache off and on; the table says what the cache saved and that the tokens are the same."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import printed_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_prefix_benchmark_runs_in_its_smoke_mode() -> None:
    result = subprocess.run([sys.executable, ROOT / "benchmarks" / "serve_prefix.py", "--smoke"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = printed_table(result.stdout, "arrival")
    assert [(r["arrival"], r["prefix cache"]) for r in rows] == [
        ("one by one", "off"), ("one by one", "4,096"), ("all at once", "off"), ("all at once", "4,096")]
    prompts = 8 * (100 + 10)  # --smoke: 8 requests, a 100-token prefix, 10 tokens each of their own
    for r in rows:
        assert r["same tokens"] == "yes", r
        assert float(r["median TTFT ms"].replace(",", "")) > 0, r
        read, reused = (int(r[k].replace(",", "")) for k in ("positions read", "reused"))
        assert read + reused == prompts, r
        # off: nothing reused; on: the 96 cached positions of the prefix for all but the first request
        assert reused == (0 if r["prefix cache"] == "off" else 7 * 96), r
    assert "one by one:" in result.stdout and "all at once:" in result.stdout
