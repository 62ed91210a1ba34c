"""`gpt2 prepare` at scale: peak memory and throughput on a 5 MB and a 200 MB single .txt file and on a
directory of many files, each made from the demo corpus (Shakespeare's works), on 1 and 2 tokenizer
threads. Every case runs the real command (`gpt2 prepare --tokenizer GPT-2 ...`) in a fresh Python
process, whose own high-water mark (VmHWM) is the peak; the time is the command's (loading and saving
the tokenizer included), imports excluded.

Targets: peak memory flat in the input size (200 MB file / 5 MB file ~ 1.0, and <= 1 GB for 200 MB);
2 threads >= 1.6x the throughput of one, which needs two idle cores: the "CPUs used" column (CPU time
over wall time) shows how much of the machine the command got. Shards of 10M tokens (``--shard-size``):
memory is bounded by a shard per split, so at llm.c's 100M a 200 MB file (about 60M tokens) would
still be filling its first.

    python benchmarks/prepare.py [RANKS_FILE] [--shard-size N]   # default $GPT2_SHARED_DATA/gpt2.tiktoken
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gpt2.data import corpora

THREADS = (1, 2)
CHILD = r"""
import json, re, resource, sys, time
import gpt2.cli.prepare  # the imports (torch among them) are not timed
from gpt2.cli import main
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
start, cpu_start = time.perf_counter(), cpu()
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
seconds = time.perf_counter() - start
print(json.dumps({"code": code, "seconds": seconds, "cpu": (cpu() - cpu_start) / seconds,
                  # VmHWM: ru_maxrss would start at the parent's peak, which Linux keeps across exec
                  "peak_mb": int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1]) / 1024}))
"""


def default_ranks() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("GPT2_SHARED_DATA", default)) / "gpt2.tiktoken"


def make_inputs(root: Path) -> dict[str, tuple[Path, int]]:
    """The cases: name -> (input path, bytes)."""
    works = [f.read_bytes() for f in corpora.shakespeare()]
    text = b"".join(works)
    small = root / "5mb.txt"
    small.write_bytes(text[: text.index(b"\n", 5_000_000) + 1])
    large = root / "200mb.txt"
    with large.open("wb") as f:
        while f.tell() < 200_000_000:
            f.write(text)
    directory = root / "files"
    directory.mkdir()
    for copy in range(8):
        for i, work in enumerate(works):
            (directory / f"{copy}_{i:02d}.txt").write_bytes(work)
    files = len(works) * 8
    return {"5 MB file": (small, small.stat().st_size), "200 MB file": (large, large.stat().st_size),
            f"dir, {files} files": (directory, 8 * len(text))}


def measure(*argv: object) -> dict[str, float]:
    """Run ``gpt2 ARGV`` in a fresh process (no arguments: only the imports); its time and peak RSS."""
    result = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"gpt2 {' '.join(map(str, argv))} failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ranks", nargs="?", type=Path, default=default_ranks())
    parser.add_argument("--shard-size", type=int, default=10_000_000)
    args = parser.parse_args()
    baseline = measure()["peak_mb"]
    print(f"shards of {args.shard_size:,} tokens; the imports alone peak at {baseline:.0f} MB; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'input':<20}{'MB':>8}{'threads':>9}{'peak MB':>10}{'MB/s':>8}{'CPUs used':>11}")
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, size) in make_inputs(Path(tmp)).items():
            for threads in THREADS:
                out = Path(tmp) / "out"
                r = measure("prepare", path, "--tokenizer", args.ranks, "--out", out, "--overwrite",
                            "--shard-size", args.shard_size, "--threads", threads)
                r["mb_s"] = size / 1e6 / r["seconds"]
                results[name, threads] = r
                print(f"{name:<20}{size / 1e6:8.1f}{threads:9d}{r['peak_mb']:10.0f}{r['mb_s']:8.2f}"
                      f"{r['cpu']:11.2f}")
    names = list(dict.fromkeys(name for name, _ in results))
    for threads in THREADS:
        ratio = results["200 MB file", threads]["peak_mb"] / results["5 MB file", threads]["peak_mb"]
        print(f"peak memory, 200 MB / 5 MB file, {threads} thread(s): {ratio:.2f}x (target ~1.0, "
              f"<= 1024 MB: {results['200 MB file', threads]['peak_mb']:.0f} MB)")
    for name in names:
        speedup = results[name, 2]["mb_s"] / results[name, 1]["mb_s"]
        print(f"throughput, 2 threads / 1, {name}: {speedup:.2f}x (target >= 1.6)")
    print(f"load average after: {os.getloadavg()[0]:.1f} (other work on the machine skews the times)")


if __name__ == "__main__":
    main()
