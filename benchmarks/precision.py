"""What each reduced precision costs in accuracy: held-out perplexity at every precision against fp32,
on a trained model (random weights predict nothing, so rounding them shows nothing): ours, and
llama.cpp's for the matching format from our GGUF export when llama-cpp-python is importable.

The model: ``--model DIR``, or the demo's (the tiny shape over a 4,096-token BPE vocabulary) trained
here on Shakespeare for ``--steps``. The held-out text is the validation split that ``gpt2 prepare``
kept out of training; it is scored in windows of the model's context, every engine on the same ids.

    python benchmarks/precision.py [--model DIR] [--steps 800] [--windows 40] [--smoke]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2.config import PRECISIONS
from gpt2.data.shards import find_shards, read_shard
from gpt2.inference.load import load_for_inference

sys.path.insert(0, str(Path(__file__).parent))
from generate import GGUF_TYPES, use_plain_llama_buffers


def gpt2(*args: object) -> None:
    """Run ``gpt2 ARGS`` in its own process; its output only when it fails."""
    result = subprocess.run([sys.executable, "-m", "gpt2", *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"gpt2 {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")


def trained_model(work: Path, steps: int, smoke: bool) -> tuple[Path, Path]:
    """The demo's shape trained on Shakespeare for ``steps``; (model, data) directories."""
    data, run = work / "shakespeare", work / "run"
    gpt2("prepare", "shakespeare", "--vocab-size", 512 if smoke else 4096, "--out", data, "--overwrite")
    gpt2("train", "--data", data, "--out", run, "--preset", "nano" if smoke else "tiny", "--max-steps", steps,
         "--micro-batch", 8, "--lr", 2e-3, "--warmup-steps", min(50, steps), "--dropout", 0,
         "--eval-interval", 0, "--sample-tokens", 0, "--checkpoint-interval", 0, "--log-interval", 0,
         "--overwrite")
    return run, data


def held_out_windows(data: Path, context: int, count: int) -> torch.Tensor:
    """The first ``count`` windows of ``context`` + 1 tokens of the validation split, (count, context+1)."""
    tokens = np.concatenate([read_shard(shard) for shard in find_shards(data, "val")]).astype(np.int64)
    count = min(count, (len(tokens) - 1) // context)
    starts = np.arange(count) * context
    return torch.from_numpy(np.stack([tokens[s : s + context + 1] for s in starts]))


def ours(model_dir: Path, precision: str, windows: torch.Tensor) -> float:
    """Perplexity of our model at ``precision`` over the windows (every position but the first)."""
    model = load_for_inference(model_dir, precision=precision, device="cpu")
    total = 0.0
    with torch.inference_mode():
        for row in windows:
            logits = model(row[None, :-1]).float()[0]
            total += F.cross_entropy(logits, row[1:], reduction="sum").item()
    return math.exp(total / windows[:, 1:].numel())


def llama(model_dir: Path, gguf_type: str, windows: torch.Tensor, work: Path) -> float:
    """Perplexity of llama.cpp on our GGUF export of type ``gguf_type``, the same windows. (Its weights
    in plain buffers: the AMX kernels of a llama-cpp-python built for this CPU die of SIGILL here, see
    generate.py; the numbers are the format's either way.)"""
    import llama_cpp

    use_plain_llama_buffers()

    path = work / f"model-{gguf_type}.gguf"
    gpt2("export", "--format", "gguf", "--model", model_dir, "--type", gguf_type, "--out", path,
         "--overwrite")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1],
                          n_threads=2, logits_all=True, verbose=False)
    total = 0.0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row[:-1])
        logits = torch.from_numpy(np.array(llm.scores[: len(row) - 1], dtype=np.float32))
        total += F.cross_entropy(logits, torch.tensor(row[1:]), reduction="sum").item()
    return math.exp(total / windows[:, 1:].numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a trained model to measure (default: train the demo's)")
    parser.add_argument("--data", type=Path, help="prepared data whose validation split is the held-out "
                        "text (default: the demo's Shakespeare; needed with --model)")
    parser.add_argument("--steps", type=int, default=800, help="training steps of the demo model")
    parser.add_argument("--windows", type=int, default=40, help="held-out windows of the model's context")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs (CI)")
    args = parser.parse_args()
    if args.model and not args.data:
        parser.error("--model needs --data (prepared data with a validation split)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = (args.model, args.data) if args.model else trained_model(work, 8 if args.smoke
                                                                               else args.steps, args.smoke)
        context = load_for_inference(model, device="cpu").config.n_positions
        windows = held_out_windows(data, context, 2 if args.smoke else args.windows)
        print(f"held-out perplexity, {windows[:, 1:].numel():,} tokens in {len(windows)} windows of "
              f"{context}")
        engines = {"ours": lambda p: ours(model, p, windows)}
        if importlib.util.find_spec("llama_cpp") is not None:
            engines["llama.cpp"] = lambda p: llama(model, GGUF_TYPES[p], windows, work)
        report(engines)


def report(engines: dict) -> None:
    print(f"{'precision':<10}" + "".join(f"{name:>14}{'vs fp32':>10}" for name in engines))
    base = {}
    for precision in PRECISIONS:
        cells = []
        for name, measure in engines.items():
            value = measure(precision)
            base.setdefault(name, value)
            cells.append(f"{value:>14.4f}{100 * (value / base[name] - 1):>+9.2f}%")
        print(f"{precision:<10}" + "".join(cells), flush=True)
    print("vs fp32: the change in perplexity from the same engine's fp32 (llama.cpp: F32, BF16, Q8_0, Q4_0)")


if __name__ == "__main__":
    main()
