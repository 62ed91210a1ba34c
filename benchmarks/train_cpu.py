"""Training speed on the CPU: our trainer beside transformers' GPT2LMHeadModel, measured in the same run.

Both train the demo's model (preset ``tiny``: 4 layers, 256 wide, context 256, a 4,096-token vocabulary
trained on Shakespeare) on the same shards, batch (8 x 256 tokens per step) and optimiser (AdamW,
lr 1e-3, betas 0.9/0.95, weight decay 0.1 on matrices, gradient clipping at 1.0). Ours is the real
``gpt2 train`` loop (data loading, autocast in the precision it picks for this CPU, logging); theirs
is the plain loop a transformers user writes, in float32 as transformers trains on a CPU by default,
and again under the same bfloat16 autocast as ours. Rates exclude the first steps (warm-up).

Target: ours >= 1.3x transformers (default precision) on this project's 2-core CPU.

    python benchmarks/train_cpu.py [--steps 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
import transformers

from gpt2.data.loader import ShardLoader
from gpt2.data.prepare import Corpus, prepare
from gpt2.data.shards import find_shards
from gpt2.training.config import load_config
from gpt2.training.metrics import read_metrics
from gpt2.training.trainer import autocast_dtype, train

PRESET, SEQ, BATCH, VOCAB = "tiny", 256, 8, 4096
OPTIMISER = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}


def ours(data: Path, run: Path, steps: int, warmup: int) -> float:
    """Tokens/s of `gpt2 train` between the end of step ``warmup`` and the last step."""
    train(load_config(data=str(data), out=str(run), preset=PRESET, seq_len=SEQ, micro_batch=BATCH,
                      max_steps=steps, lr=OPTIMISER["lr"], warmup_steps=0, min_lr_ratio=1.0,
                      eval_interval=0, eval_tokens=SEQ * BATCH, checkpoint_interval=0, sample_tokens=0,
                      log_interval=0))
    records = [r for r in read_metrics(run) if "loss" in r]
    first, last = records[warmup - 1], records[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed"] - first["elapsed"])


def theirs(data: Path, steps: int, warmup: int, dtype: torch.dtype) -> float:
    """Tokens/s of transformers' GPT2LMHeadModel in a plain training loop over the same batches."""
    torch.manual_seed(1337)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=256, n_layer=4, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    model = transformers.GPT2LMHeadModel(config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": OPTIMISER["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=OPTIMISER["lr"], betas=OPTIMISER["betas"])
    loader = ShardLoader(find_shards(data, "train"), BATCH, SEQ, seed=1337)
    autocast = (torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    start = 0.0
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        x = loader.next_batch().inputs
        with autocast:
            loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (steps - warmup) * BATCH * SEQ / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the rate")
    args = parser.parse_args()
    dtype = autocast_dtype("auto", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(Corpus(["shakespeare"]), data, vocab_size=VOCAB, progress=False)
        rows = [
            ("transformers GPT2LMHeadModel, float32", theirs(data, args.steps, args.warmup, torch.float32)),
            (f"transformers GPT2LMHeadModel, {str(dtype).removeprefix('torch.')} autocast",
             theirs(data, args.steps, args.warmup, dtype) if dtype != torch.float32 else None),
            (f"ours (gpt2 train, {str(dtype).removeprefix('torch.')})",
             ours(data, Path(tmp) / "run", args.steps, args.warmup)),
        ]
    base = rows[0][1]
    print(f"\ntraining tokens/s, preset {PRESET}, vocabulary {VOCAB}, batch {BATCH} x {SEQ}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':<48} {'tokens/s':>10} {'vs transformers':>16}")
    for name, rate in rows:
        if rate is not None:
            print(f"{name:<48} {rate:>10,.0f} {rate / base:>15.2f}x")


if __name__ == "__main__":
    main()
