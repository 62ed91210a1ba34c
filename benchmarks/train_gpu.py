"""Training speed on one GPU: the 124M model in bfloat16, our trainer beside transformers, in one run.

Both train GPT-2 124M (preset ``gpt2``, context 1024, vocabulary 50,257) on the same random-token
shards with 16 x 1024 tokens per step, AdamW (fused, lr 6e-4, betas 0.9/0.95, weight decay 0.1 on
matrices), gradient clipping at 1.0 and bfloat16 autocast. Ours is the real ``gpt2 train`` loop,
eager and with ``--compile``; theirs is transformers' GPT2LMHeadModel (SDPA attention) in the plain
loop its users write. MFU is against this GPU's measured bfloat16 matmul peak, not the datasheet.
Rates exclude the first steps (warm-up, compilation). Runs in about 3 minutes on an H100.

Target: ours >= 1.5x transformers.

    python benchmarks/train_gpu.py [--steps 40] [--warmup 10] [--micro-batch 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from gpt2.config import GPT2Config
from gpt2.data import ShardLoader
from gpt2.metrics import read_metrics
from gpt2.shards import find_shards, write_shard
from gpt2.train_config import load_config
from gpt2.training import flops_per_token, measure_matmul_flops, train

SEQ, LR = 1024, 6e-4


def ours(data: Path, run: Path, args: argparse.Namespace, compile: bool) -> float:
    """Tokens/s of `gpt2 train` between the end of step ``warmup`` and the last step."""
    train(load_config(data=str(data), out=str(run), preset="gpt2", seq_len=SEQ, micro_batch=args.micro_batch,
                      max_steps=args.steps, lr=LR, warmup_steps=0, min_lr_ratio=1.0, eval_interval=0,
                      checkpoint_interval=0, sample_tokens=0, log_interval=10, compile=compile,
                      device="cuda", dtype="bfloat16"))
    records = [r for r in read_metrics(run) if "loss" in r]
    first, last = records[args.warmup - 1], records[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed"] - first["elapsed"])


def theirs(data: Path, args: argparse.Namespace) -> float:
    """Tokens/s of transformers' GPT2LMHeadModel in a plain bfloat16-autocast loop, same batches."""
    torch.manual_seed(1337)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), fused=True)
    loader = ShardLoader(find_shards(data, "train"), args.micro_batch, SEQ, seed=1337)
    start = 0.0
    for step in range(args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        x = loader.next_batch().inputs
        x = x.cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # as our loop, which reads every step's loss
    torch.cuda.synchronize()
    return (args.steps - args.warmup) * args.micro_batch * SEQ / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rate")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences of 1024 tokens per step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark needs one (see benchmarks/train_cpu.py)")
    device = torch.device("cuda")
    peak = measure_matmul_flops(device, torch.bfloat16)
    per_token = flops_per_token(GPT2Config.from_preset("gpt2"), SEQ)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        tokens = np.random.default_rng(0).integers(0, 50257, (args.steps + 1) * args.micro_batch * SEQ + 1)
        write_shard(data / "random_train_000000.bin", tokens)
        rows = [("transformers GPT2LMHeadModel (SDPA, eager)", theirs(data, args))]
        torch.cuda.empty_cache()
        rows.append(("ours (gpt2 train, eager)", ours(data, Path(tmp) / "eager", args, compile=False)))
        torch.cuda.empty_cache()
        rows.append(("ours (gpt2 train --compile)", ours(data, Path(tmp) / "compiled", args, compile=True)))
    base = rows[0][1]
    print(f"\n{torch.cuda.get_device_name()}: GPT-2 124M, bfloat16 autocast, batch {args.micro_batch} x "
          f"{SEQ}; measured bf16 matmul peak {peak / 1e12:,.0f} TFLOP/s")
    print(f"{'':<44} {'tokens/s':>10} {'MFU':>7} {'vs transformers':>16}")
    for name, rate in rows:
        print(f"{name:<44} {rate:>10,.0f} {rate * per_token / peak:>7.1%} {rate / base:>15.2f}x")


if __name__ == "__main__":
    main()
