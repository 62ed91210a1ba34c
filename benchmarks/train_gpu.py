"""Training speed and memory on one GPU: the 124M model in bfloat16, our trainer beside transformers.

Both train GPT-2 124M (preset ``gpt2``, context 1024, vocabulary 50,257, dropout 0 as our presets) on
the same random-token shards and batches, 16 x 1024 tokens per step, with gradient clipping at 1.0 and
bfloat16 autocast. Theirs is transformers' GPT2LMHeadModel (SDPA attention) in the plain loop its users
write: AdamW (fused, lr 6e-4, betas 0.9/0.95, weight decay 0.1 on matrices) and the loss from
``labels=``, which materialises the batch's full logits (16 x 1024 x 50,257: 1.6 GB in bfloat16, 3.3 GB
again in float32) and their gradient. Ours is the real ``gpt2 train`` setup and loop (the final
checkpoint left out), whose loss computes the LM head and the cross-entropy a chunk of positions at a
time (``gpt2.loss``: the logits are never whole), with AdamW (fused, the same settings) and with
``--optimizer muon`` (torch.optim.Muon on the blocks' matrices at its default lr 0.02, AdamW on the
rest), each eager and with ``--compile``.

Per row: tokens/s (the first steps left out: warm-up, compilation), MFU against this GPU's measured
bfloat16 matmul peak (not the datasheet), and the peak GPU memory of the run
(``torch.cuda.max_memory_allocated``, reset between engines). Runs in about 2 minutes on an H200.
``--smoke`` runs the eager rows on the CPU instead (preset ``tiny`` with the 50,257 vocabulary,
4 x 128 tokens, 3 steps; no GPU needed, no MFU or GPU memory; the compiled rows left out, as
compiling takes minutes on a CPU), in about 30 s: the test's mode.
``benchmarks/train_memory.py`` reuses this script's two loops for the CPU's memory.

Target: ours >= 1.5x transformers' tokens/s.

    python benchmarks/train_gpu.py [--steps 40] [--warmup 10] [--micro-batch 16]
    python benchmarks/train_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from gpt2.config import GPT2_VOCAB_SIZE, GPT2Config
from gpt2.data.loader import ShardLoader
from gpt2.data.shards import find_shards, write_shard
from gpt2.training.config import load_config
from gpt2.training.metrics import read_metrics
from gpt2.training.trainer import (
    autocast_dtype,
    fit,
    flops_per_token,
    init_distributed,
    measure_matmul_flops,
    setup,
)

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

LR, SEED = 6e-4, 1337
OURS = [("adamw", False), ("adamw", True), ("muon", False), ("muon", True)]  # (optimizer, compile)


@dataclass
class Setting:
    """What one measurement trains: the model preset (with GPT-2's 50,257-token vocabulary), the batch,
    the steps (the first ``warmup`` left out of the rate), the device and the autocast dtype."""

    preset: str
    seq_len: int
    micro_batch: int
    steps: int
    warmup: int
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self) -> GPT2Config:
        return GPT2Config.from_preset(self.preset, vocab_size=GPT2_VOCAB_SIZE, dropout=0.0)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def write_random_shard(data: Path, s: Setting) -> None:
    """A training shard of uniformly random GPT-2 token ids, enough for every step's batch."""
    data.mkdir(parents=True, exist_ok=True)
    count = (s.steps + 1) * s.micro_batch * s.seq_len + 1
    tokens = np.random.default_rng(0).integers(0, GPT2_VOCAB_SIZE, count)
    write_shard(data / "random_train_000000.bin", tokens)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(data: Path, run: Path, s: Setting, optimizer: str = "adamw", compile: bool = False) -> float:
    """Tokens/s of `gpt2 train` (its ``setup`` and ``fit``, as ``gpt2.training.trainer.train`` runs them; the
    final checkpoint and plot left out) between the end of step ``warmup`` and the last step."""
    cfg = load_config(data=str(data), out=str(run), preset=s.preset, seq_len=s.seq_len, dropout=0.0,
                      micro_batch=s.micro_batch, max_steps=s.steps, lr=LR, warmup_steps=0, min_lr_ratio=1.0,
                      eval_interval=0, checkpoint_interval=0, sample_tokens=0, log_interval=0,
                      optimizer=optimizer, compile=compile, device=str(s.device), dtype=s.dtype_name,
                      seed=SEED)
    state = setup(cfg, init_distributed(cfg.device))
    try:
        fit(state)
    finally:
        if state.metrics:
            state.metrics.close()
    records = [r for r in read_metrics(run) if "loss" in r]
    first, last = records[s.warmup - 1], records[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed"] - first["elapsed"])


def transformers_model(config: GPT2Config) -> GPT2LMHeadModel:
    """transformers' GPT2LMHeadModel of ``config``'s shape (SDPA attention, dropout 0, tied head).
    transformers is imported here only: a process measuring ours never loads it."""
    import transformers

    theirs = transformers.GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions,
                                     n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1,
                                     attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(theirs)


def theirs(data: Path, s: Setting) -> float:
    """Tokens/s of transformers' GPT2LMHeadModel in the plain AdamW loop over our batches (the same
    seed: the same order), under the same autocast as ours."""
    torch.manual_seed(SEED)
    if s.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as ours
    model = transformers_model(s.config).to(s.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), fused=s.device.type == "cuda")
    loader = ShardLoader(find_shards(data, "train"), s.micro_batch, s.seq_len, seed=SEED)
    autocast = (torch.autocast(s.device.type, dtype=s.dtype) if s.dtype != torch.float32
                else contextlib.nullcontext())
    start = 0.0
    for step in range(s.steps):
        if step == s.warmup:
            _synchronize(s.device)
            start = time.perf_counter()
        x = loader.next_batch().inputs.to(s.device, non_blocking=True)
        with autocast:
            loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # as our loop, which reads every step's loss
    _synchronize(s.device)
    return (s.steps - s.warmup) * s.micro_batch * s.seq_len / (time.perf_counter() - start)


def with_peak_memory(device: torch.device, measure: Callable[[], float]) -> tuple[float, float | None]:
    """``measure()`` and the peak GPU memory (MB) it allocated, counted from a clean slate (None off
    CUDA: see benchmarks/train_memory.py for the CPU's)."""
    gc.collect()
    if device.type != "cuda":
        return measure(), None
    torch._dynamo.reset()  # compiled graphs of an earlier engine would keep its tensors
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    rate = measure()
    return rate, torch.cuda.max_memory_allocated(device) / 2**20


def ours_name(optimizer: str, compile: bool) -> str:
    return f"ours {optimizer} ({'--compile' if compile else 'eager'}, chunked loss)"


def measure_all(data: Path, runs: Path, s: Setting, compiled: bool) -> list[tuple[str, float, float | None]]:
    """(name, tokens/s, peak MB) of transformers, then ours with each optimiser, eager and compiled."""
    rows = [("transformers GPT2LMHeadModel (SDPA, eager, full logits)",
             *with_peak_memory(s.device, partial(theirs, data, s)))]
    for optimizer, compile in OURS:
        if compile and not compiled:
            continue
        run = runs / f"{optimizer}-{'compiled' if compile else 'eager'}"
        rows.append((ours_name(optimizer, compile),
                     *with_peak_memory(s.device, partial(ours, data, run, s, optimizer, compile))))
    return rows


def print_table(s: Setting, rows: list[tuple[str, float, float | None]], peak: float | None) -> None:
    per_token = flops_per_token(s.config, s.seq_len)
    where = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "CPU (--smoke)"
    matmul = f"; measured bf16 matmul peak {peak / 1e12:,.0f} TFLOP/s" if peak else ""
    print(f"\n{where}: preset {s.preset}, vocabulary {GPT2_VOCAB_SIZE:,}, {s.dtype_name} autocast, batch "
          f"{s.micro_batch} x {s.seq_len}, {s.steps - s.warmup} steps timed after {s.warmup}{matmul}")
    print(f"ours: the LM head's loss a chunk of positions at a time (gpt2.loss), the full logits never held; "
          f"transformers: labels=, the full {s.micro_batch} x {s.seq_len} x {GPT2_VOCAB_SIZE:,} logits "
          "and their gradient materialised")
    base_rate, base_peak = rows[0][1], rows[0][2]
    print(f"{'engine':<56}  {'tokens/s':>10}  {'MFU':>6}  {'peak MB':>8}  {'vs transformers':>15}  "
          f"{'memory vs transformers':>22}")
    for name, rate, peak_mb in rows:
        mfu = f"{rate * per_token / peak:.1%}" if peak else "-"
        memory = f"{peak_mb:,.0f}" if peak_mb is not None else "-"
        ratio = f"{peak_mb / base_peak:.2f}x" if peak_mb is not None and base_peak else "-"
        print(f"{name:<56}  {rate:>10,.0f}  {mfu:>6}  {memory:>8}  {rate / base_rate:>14.2f}x  {ratio:>22}")
    best = max(rate for _, rate, _ in rows[1:]) / base_rate
    print(f"target: ours >= 1.5x transformers' tokens/s: best ours {best:.2f}x "
          f"({'met' if best >= 1.5 else 'not met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rate")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences of 1024 tokens per step")
    parser.add_argument("--smoke", action="store_true", help="the eager rows on the CPU, tiny shape, 3 steps")
    args = parser.parse_args()
    if args.smoke:
        cpu = torch.device("cpu")
        s = Setting("tiny", 128, 4, 3, 1, cpu, autocast_dtype("auto", cpu))
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark needs one (see benchmarks/train_cpu.py, or --smoke)")
    else:
        s = Setting("gpt2", 1024, args.micro_batch, args.steps, args.warmup, torch.device("cuda"),
                    torch.bfloat16)
    peak = measure_matmul_flops(s.device, s.dtype) if s.device.type == "cuda" else None
    with tempfile.TemporaryDirectory() as tmp:
        write_random_shard(Path(tmp) / "data", s)
        rows = measure_all(Path(tmp) / "data", Path(tmp), s, compiled=not args.smoke)
    print_table(s, rows, peak)
    if args.smoke:
        print("(--smoke leaves out the --compile rows: compiling takes minutes on a CPU)")


if __name__ == "__main__":
    main()
