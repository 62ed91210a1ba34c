"""benchmarks/serve_load.py in its --smoke mode: 8 concurrent clients (half streaming) against a `gpt2
serve` of the tiny preset, then batching against --no-batching; every table has its rows, no request
failed, and the figures hang together (a stream's first token comes before its end, memory is read)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import printed_table

ROOT = Path(__file__).resolve().parents[1]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.slow
def test_the_serving_load_benchmark_runs_in_its_smoke_mode() -> None:
    command = [sys.executable, ROOT / "benchmarks" / "serve_load.py", "--smoke"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    rows = {row["clients"]: row for row in printed_table(out, "clients")}
    assert list(rows) == ["streaming", "non-streaming", "all"], out
    for row in rows.values():
        assert row["errors"] == "0", row
        assert 0 < number(row["tokens"]) <= number(row["requests"]) * 8, row  # --smoke: 8 new tokens each
        assert number(row["tokens/s"]) > 0, row
        assert 0 < number(row["latency p50 ms"]) <= number(row["latency p99 ms"]), row
    assert [number(rows[k]["requests"]) for k in rows] == [8, 8, 16]  # 8 clients x 2 requests
    assert number(rows["streaming"]["tokens"]) + number(rows["non-streaming"]["tokens"]) == number(
        rows["all"]["tokens"])
    stream = rows["streaming"]
    assert 0 < number(stream["TTFT p50 ms"]) <= number(stream["TTFT p99 ms"]), stream
    assert number(stream["TTFT p50 ms"]) <= number(stream["latency p50 ms"]), stream
    assert 0 < number(stream["ITL p50 ms"]) <= number(stream["ITL p99 ms"]), stream
    assert number(stream["ITL p50 ms"]) < number(stream["latency p50 ms"]), stream  # a gap within a stream
    assert rows["non-streaming"]["TTFT p50 ms"] == "-" and rows["all"]["ITL p99 ms"] == "-"

    # the clients were served together: the server's own count of the most sequences in one forward
    # pass (a poll of /health every 50 ms may see one at a time however many were decoded together)
    together = re.search(r"server's most at once: \d+ running, \d+ waiting \(polled\); most decoded "
                         r"together: (\d+)", out)
    assert together and int(together[1]) >= 2, out
    cpu = re.search(r"CPU time over the run: the server (\d+\.\d) s", out)
    assert cpu and float(cpu[1]) > 0, out

    memory = {row["server memory"]: row for row in printed_table(out, "server memory")}
    assert list(memory) == ["before", "after"], out
    for row in memory.values():
        assert 0 < number(row["VmRSS MB"]) <= number(row["VmHWM MB"]), row
    assert number(memory["before"]["VmHWM MB"]) <= number(memory["after"]["VmHWM MB"])

    modes = {row["mode"]: row for row in printed_table(out, "mode")}
    assert list(modes) == ["batching", "no-batching"], out
    assert all(row["errors"] == "0" and number(row["tokens"]) > 0 for row in modes.values()), modes
    assert re.search(r"batching / no-batching tokens/s: \d+\.\d\dx .*errors: 0 \(target 0\)", out), out
    assert "errors in part 1: 0 (target 0)" in out
