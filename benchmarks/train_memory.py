"""Peak memory and speed of training with GPT-2's 50,257-token vocabulary on the CPU: our trainer beside
transformers' GPT2LMHeadModel, each engine, shape and precision in its own fresh process.

Shapes: ``tiny`` (preset tiny: 4 layers x 256, batch 8 x 256) and ``124M`` (preset gpt2, batch
4 x 1024), both with the 50,257-token vocabulary, whose logits dominate a small model's training
memory (4 x 1024 x 50,257 float32 logits are 823 MB). Ours is the real ``gpt2 train`` setup and loop
(``gpt2.training.config.load_config`` + ``gpt2.training.trainer``'s ``setup`` and ``fit``, the final
checkpoint
left out) on random-token shards, whose loss computes the LM head and the cross-entropy a chunk of
positions at a time (``gpt2.loss``), with AdamW and with ``--optimizer muon`` (one momentum buffer per
block matrix where AdamW holds two). Theirs is GPT2LMHeadModel (SDPA attention) in the plain loop its
users write: the loss from ``labels=`` (the full logits), AdamW, the same batches. Both in float32 and
under the bfloat16 autocast ours picks on this CPU (``autocast_dtype("auto", cpu)``; transformers
under the same ``torch.autocast``). The loops are ``benchmarks/train_gpu.py``'s.

Each row is one process (the script runs itself with ``--engine ours|muon|transformers --shape
tiny|124M --dtype float32|bfloat16``, which prints one JSON line): "peak MB" is that process's
resident high-water mark, VmHWM (interpreter, imports, model, optimiser state, activations, logits;
not ``ru_maxrss``, which Linux carries over from the parent across exec), "train MB" the same
less the process's peak just before its model was built (torch imported, and transformers for theirs);
tokens/s is over the steps after ``--warmup`` (1): 3 for tiny, 2 for 124M (``--steps N``), whose steps
take 10-25 s each on this project's 2-core machine. The whole run (12 processes) takes about 9 minutes
there when nothing else runs, most of it 124M's (2-3 times as long on a loaded machine).

Target (issue 14, item 4): ours <= 0.6x transformers' peak training memory with the 50,257 vocabulary.

    python benchmarks/train_memory.py [--shapes tiny,124M] [--dtypes float32,bfloat16] [--steps N]
                                      [--warmup 1] [--jobs 1]
    python benchmarks/train_memory.py --smoke   # preset nano, 2 x 64 tokens, 3 processes at once: the test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import resident_peak_mb
from train_gpu import Setting, ours, theirs, write_random_shard

from gpt2.config import GPT2_VOCAB_SIZE
from gpt2.training.trainer import autocast_dtype

# preset, tokens per sequence, sequences per step, timed steps (unless --steps)
SHAPES = {"tiny": ("tiny", 256, 8, 3), "124M": ("gpt2", 1024, 4, 2), "smoke": ("nano", 64, 2, 1)}
ENGINES = {"transformers": "transformers GPT2LMHeadModel (full logits)", "ours": "ours adamw (chunked loss)",
           "muon": "ours muon (chunked loss)"}
TARGET = 0.6  # ours' peak / transformers'
CHILD_TIMEOUT = 1800  # seconds: one 124M process is a minute or two on a quiet 2-core machine


def setting(shape: str, dtype: str, steps: int | None, warmup: int) -> Setting:
    """The CPU measurement of ``shape``: ``warmup`` steps, then ``steps`` timed ones (None: the shape's
    own number)."""
    preset, seq_len, batch, timed = SHAPES[shape]
    steps = timed if steps is None else steps
    return Setting(preset, seq_len, batch, warmup + steps, warmup, torch.device("cpu"), getattr(torch, dtype))


def measure(engine: str, shape: str, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row, in this (fresh) process: the engine's tokens/s and this process's memory."""
    s = setting(shape, dtype, args.steps, args.warmup)
    if engine == "transformers":
        import transformers  # part of the baseline, as torch is: the model is what is measured

        _ = transformers.GPT2LMHeadModel
    before = resident_peak_mb()
    if engine == "transformers":
        rate = theirs(args.data, s)
    else:
        rate = ours(args.data, args.run, s, optimizer="muon" if engine == "muon" else "adamw")
    return {"engine": engine, "shape": shape, "dtype": dtype, "peak_mb": round(resident_peak_mb(), 1),
            "base_mb": round(before, 1), "tokens_per_s": round(rate, 1), "threads": torch.get_num_threads()}


def run_child(engine: str, shape: str, dtype: str, data: Path, run: Path, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh process of this script; its JSON line."""
    s = setting(shape, dtype, args.steps, args.warmup)
    command = [sys.executable, __file__, "--engine", engine, "--shape", shape, "--dtype", dtype, "--data",
               str(data), "--run", str(run), "--steps", str(s.steps - s.warmup), "--warmup", str(s.warmup)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        sys.exit(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    row = json.loads(lines[-1])
    print(f"  {shape} {dtype} {engine}: {row['peak_mb']:,.0f} MB, {row['tokens_per_s']:,.0f} tokens/s",
          file=sys.stderr, flush=True)
    return row


def measure_all(shapes: list[str], dtypes: list[str], args: argparse.Namespace) -> list[dict]:
    """Every shape x precision x engine, one process each (``args.jobs`` at a time), on one random-token
    shard per shape."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for shape in shapes:
            data = Path(tmp) / shape
            write_random_shard(data, setting(shape, "float32", args.steps, args.warmup))
            jobs += [(engine, shape, dtype, data, Path(tmp) / f"run-{shape}-{dtype}-{engine}")
                     for dtype in dtypes for engine in ENGINES]
        with ThreadPoolExecutor(args.jobs) as pool:
            return list(pool.map(lambda job: run_child(*job, args), jobs))


def print_table(rows: list[dict]) -> None:
    """One table, ratios against transformers in the same shape and precision; then the target."""
    print(f"\ntraining on the CPU ({rows[0]['threads']} threads), vocabulary {GPT2_VOCAB_SIZE:,}; peak = the "
          "process's VmHWM, train = peak less the process before its model was built")
    print(f"{'shape':<6}  {'dtype':<8}  {'engine':<42}  {'peak MB':>8}  {'train MB':>8}  {'tokens/s':>8}  "
          f"{'peak vs HF':>10}  {'train vs HF':>11}  {'tok/s vs HF':>11}")
    verdicts: dict[str, list[str]] = {}
    for row in rows:
        base = next(r for r in rows if r["engine"] == "transformers" and r["shape"] == row["shape"]
                    and r["dtype"] == row["dtype"])
        train, base_train = row["peak_mb"] - row["base_mb"], base["peak_mb"] - base["base_mb"]
        ratio = row["peak_mb"] / base["peak_mb"]
        print(f"{row['shape']:<6}  {row['dtype']:<8}  {ENGINES[row['engine']]:<42}  {row['peak_mb']:>8,.0f}  "
              f"{train:>8,.0f}  {row['tokens_per_s']:>8,.0f}  {ratio:>9.2f}x  {train / base_train:>10.2f}x  "
              f"{row['tokens_per_s'] / base['tokens_per_s']:>10.2f}x")
        if row["engine"] != "transformers":
            verdict = "met" if ratio <= TARGET else "not met"
            verdicts.setdefault(f"{row['shape']} {row['dtype']}", []).append(
                f"{ENGINES[row['engine']].split(' (')[0]} {ratio:.2f}x ({verdict})")
    print(f"target: ours <= {TARGET}x transformers' peak training memory (peak vs HF)")
    for where, said in verdicts.items():
        print(f"  {where}: {', '.join(said)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,124M", help="comma-separated: tiny, 124M")
    parser.add_argument("--dtypes", default=None, help="comma-separated: float32, bfloat16 (default: float32 "
                        "and the autocast dtype ours picks on this CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per process (default: "
                        "tiny 3, 124M 2)")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the timed ones")
    parser.add_argument("--jobs", type=int, default=1, help="processes at a time (more than 1 disturbs the "
                        "speeds, not the memory)")
    parser.add_argument("--smoke", action="store_true", help="preset nano, 2 x 64 tokens, 1 step timed, "
                        "3 processes at a time")
    child = parser.add_argument_group("one measurement (what the script runs itself with)")
    child.add_argument("--engine", choices=ENGINES)
    child.add_argument("--shape", choices=SHAPES)
    child.add_argument("--dtype", choices=["float32", "bfloat16"])
    child.add_argument("--data", type=Path, help="the random-token shards")
    child.add_argument("--run", type=Path, help="our run directory")
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(measure(args.engine, args.shape, args.dtype, args)))
        return
    auto = str(autocast_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    dtypes = args.dtypes.split(",") if args.dtypes else list(dict.fromkeys(["float32", auto]))
    shapes = ["smoke"] if args.smoke else args.shapes.split(",")
    if args.smoke:
        args.jobs = 3
    unknown = [n for n in shapes if n not in SHAPES] + [d for d in dtypes if d not in ("float32", "bfloat16")]
    if unknown:
        parser.error(f"unknown shape or dtype: {', '.join(unknown)}")
    print_table(measure_all(shapes, dtypes, args))


if __name__ == "__main__":
    main()
