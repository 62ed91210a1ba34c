"""Instruction tuning on the CPU: a base model, full fine-tuning and LoRA, measured in the same run.

The instructions are ``benchmarks/instructions.py``'s: eight kinds with exact answers, the training
and held-out splits sharing no item. The base model has the demo's shape (preset ``tiny``, a
4,096-token vocabulary) and is trained here (or ``--base DIR``) on Shakespeare plus plain-text drills
of the same skills (``Q: ... / A: ...``, never a held-out item): like a pretrained GPT-2 it has
skills, but has never seen the chat template or an instruction to follow in it. Each model answers
the held-out instructions greedily after GPT-2's chat template; the score is exact match. Fine-tuning
is the real ``gpt2 prepare`` and ``gpt2 train`` (each run its own process, whose peak memory is
measured), and the adapter is loaded with ``--adapter`` as a user would. Memory and speed of LoRA
against full fine-tuning are measured again on the 124M shape with GPT-2's own 50,257-token
vocabulary (random weights: speed and memory do not depend on them).

Targets: fine-tuned >= base + 50 points on held-out instructions; LoRA within 10 points of full
fine-tuning, with <= 2% of the parameters trainable and a lower peak memory.

    python benchmarks/finetune_chat.py [--base DIR] [--steps 400] [--work DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from gpt2 import GPT2, GPT2Config, Tokenizer
from gpt2.generation.config import GenerationConfig
from gpt2.generation.sampling import generate_text
from gpt2.inference.load import load_for_inference
from gpt2.tokenizer.chat_template import GPT2_CHAT_TEMPLATE, ChatTemplate
from gpt2.training.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from instructions import DRILL_TEMPLATE, drills, write_sets

SHARED = Path(os.environ.get("GPT2_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SEQ = 128  # tokens per packed window of examples
CHILD = r"""
import re, sys
from gpt2.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1])
sys.exit(code)
"""  # gpt2 ARGS in this process, then its high-water mark (KB) written to the file argv[1]
LORA = ["--lora-rank", 5, "--lora-alpha", 20, "--lora-targets", "c_attn,c_proj,c_fc", "--weight-decay", 0]
QUIET = ["--dropout", 0, "--eval-interval", 0, "--sample-tokens", 0, "--checkpoint-interval", 0,
         "--log-interval", 0, "--overwrite"]


@dataclass
class Run:
    """A fine-tuning run: where it is, its process's peak memory, seconds per step, trainable weights."""

    directory: Path
    peak_mb: float
    step_s: float
    trainable: int


def gpt2(*args: object) -> float:
    """Run ``gpt2 ARGS`` in its own process (output hidden unless it fails); its peak memory in MB,
    the process's own high-water mark (VmHWM: its ru_maxrss would start at this one's peak, which
    Linux keeps across exec)."""
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile("r") as peak:
        command = [sys.executable, "-c", CHILD, peak.name, *map(str, args)]
        if subprocess.run(command, stdout=log, stderr=log).returncode:
            log.seek(0)
            sys.exit(f"gpt2 {' '.join(map(str, args))} failed:\n{log.read().decode()[-3000:]}")
        return int(peak.read()) / 1024  # KB


def base_model(work: Path, held_out: list[dict], steps: int, drill_steps: int, smoke: bool) -> Path:
    """The demo's shape, pretrained for ``steps`` on Shakespeare, then taught the skills for
    ``drill_steps`` on drills in a question-and-answer format (never the chat template, never a
    held-out item)."""
    shakespeare, pretrained = work / "shakespeare", work / "pretrained"
    vocab = 512 if smoke else 4096
    gpt2("prepare", "shakespeare", "--vocab-size", vocab, "--out", shakespeare, "--overwrite")
    gpt2("train", "--data", shakespeare, "--out", pretrained, "--preset", "nano" if smoke else "tiny",
         "--max-steps", steps, "--micro-batch", 8, "--lr", 2e-3, "--warmup-steps", 50, *QUIET)
    corpus, template = work / "drills.jsonl", work / "drill_template.jinja"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in drills(200 if smoke else 6000, held_out)))
    template.write_text(DRILL_TEMPLATE)
    data, base = work / "drills", work / "base"
    gpt2("prepare", corpus, "--tokenizer", pretrained, "--chat-template", template, "--out", data,
         "--seq-len", SEQ, "--overwrite")
    gpt2("train", "--init-from", pretrained, "--data", data, "--out", base, "--max-steps", drill_steps,
         "--micro-batch", 16, "--lr", 2e-3, "--warmup-steps", 30, *QUIET)
    return base


def fine_tune(base: Path, data: Path, out: Path, steps: int, lr: float, *options: object) -> Run:
    """``gpt2 train --init-from base`` on the chat shards (16 windows per step unless ``options`` say
    otherwise); what it cost."""
    peak = gpt2("train", "--init-from", base, "--data", data, "--out", out, "--max-steps", steps, "--lr", lr,
                "--warmup-steps", max(1, steps // 20), "--micro-batch", 16, *QUIET, *options)
    elapsed = [r["elapsed"] for r in read_metrics(out) if "loss" in r]
    step_s = statistics.median(b - a for a, b in itertools.pairwise(elapsed[1:]))  # not the first step
    return Run(out, peak, step_s, _trainable(out))


def _trainable(run: Path) -> int:
    """Parameters the run trained: the adapter's, or the whole model's."""
    checkpoint = run / (run / "latest").read_text().strip()
    adapter = checkpoint / "adapter_model.safetensors"
    if adapter.is_file():
        with safe_open(adapter, "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    return GPT2.from_pretrained(checkpoint).num_parameters()


def accuracy(model: GPT2, tokenizer: Tokenizer, held_out: list[dict], batch: int = 25) -> dict[str, float]:
    """Exact-match accuracy (%) on ``held_out``, per kind and overall: greedy replies after GPT-2's
    chat template."""
    template = ChatTemplate(GPT2_CHAT_TEMPLATE)
    config = GenerationConfig.from_preset("greedy", max_new_tokens=16)
    prompts = [template.render([{"role": "user", "content": question(e)}], tokenizer,
                               add_generation_prompt=True)[0] for e in held_out]
    replies = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            replies += generate_text(model, tokenizer, prompts[i : i + batch], config)
    right: dict[str, list[bool]] = defaultdict(list)
    for e, reply in zip(held_out, replies, strict=True):
        for kind in (e["kind"], "all"):
            right[kind].append(reply.strip() == e["output"])
    return {kind: 100 * sum(r) / len(r) for kind, r in right.items()}


def question(example: dict) -> str:
    return example["instruction"] + (f"\n\n{example['input']}" if example["input"] else "")


def shape_124m(work: Path, train_file: Path, smoke: bool) -> dict[str, Run]:
    """Full fine-tuning and LoRA of the 124M shape (GPT-2's vocabulary, random weights), a few steps."""
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64) if smoke else GPT2Config()
    base = work / "base_124m"
    model = GPT2(config, tokenizer=Tokenizer.from_file(SHARED / "gpt2.tiktoken"))
    model.save_pretrained(base)
    del model
    data = work / "chat_124m"
    gpt2("prepare", train_file, "--tokenizer", base, "--out", data, "--seq-len", 256, "--overwrite")
    steps, options = 6, ["--seq-len", 256, "--micro-batch", 4]
    return {"full": fine_tune(base, data, work / "full_124m", steps, 1e-4, *options),
            "lora": fine_tune(base, data, work / "lora_124m", steps, 1e-3, *options, *LORA)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="a base model to start from (default: train one here)")
    parser.add_argument("--base-steps", type=int, default=800, help="pretraining steps of the base (8 x 256)")
    parser.add_argument("--drill-steps", type=int, default=1200, help="steps of the base on the drills")
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps (16 windows of 128 tokens)")
    parser.add_argument("--work", type=Path, help="directory for the runs (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs (CI)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report(args.work or Path(tmp), args)


def report(work: Path, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    n_train, n_held_out, steps = (200, 16, 4) if args.smoke else (4000, 200, args.steps)
    train_file, held_out = write_sets(work / "instructions", n_train, n_held_out)
    steps_of_base = (8, 4) if args.smoke else (args.base_steps, args.drill_steps)
    base = args.base or base_model(work, held_out, *steps_of_base, args.smoke)
    data, template = work / "chat", work / "gpt2_template.jinja"
    template.write_text(GPT2_CHAT_TEMPLATE)
    gpt2("prepare", train_file, "--tokenizer", base, "--chat-template", template, "--out", data,
         "--seq-len", SEQ, "--val-fraction", 0.02, "--overwrite")
    runs = {"full": fine_tune(base, data, work / "full", steps, 2e-3),
            "lora": fine_tune(base, data, work / "lora", steps, 1e-2, *LORA)}
    models = {"base": load_for_inference(base), "full": load_for_inference(runs["full"].directory),
              "lora": load_for_inference(base, adapter=runs["lora"].directory)}
    scores = {name: accuracy(model, model.tokenizer, held_out) for name, model in models.items()}
    big = shape_124m(work, train_file, args.smoke)
    print_table(scores, {"tiny": runs, "124M": big}, models["base"].num_parameters())
    print(f"({time.perf_counter() - started:.0f} s in all: {len(held_out)} held-out instructions, {steps} "
          "fine-tuning steps)")


def print_table(scores: dict[str, dict[str, float]], shapes: dict[str, dict[str, Run]], tiny: int) -> None:
    kinds = [*(k for k in scores["base"] if k != "all"), "all"]
    print("held-out exact match (%)  " + " ".join(f"{k:>11}" for k in kinds))
    for name, score in scores.items():
        print(f"  {name:<23} " + " ".join(f"{score[k]:>11.1f}" for k in kinds))
    print(f"fine-tuned - base: {scores['full']['all'] - scores['base']['all']:+.1f} points (target >= +50); "
          f"LoRA - full: {scores['lora']['all'] - scores['full']['all']:+.1f} points (target >= -10)")
    print(f"{'shape':<6} {'method':<6} {'trainable':>12} {'share':>7} {'peak MB':>9} {'s/step':>7}")
    for shape, runs in shapes.items():
        total = tiny if shape == "tiny" else runs["full"].trainable
        for method, run in runs.items():
            print(f"{shape:<6} {method:<6} {run.trainable:>12,} {100 * run.trainable / total:>6.2f}% "
                  f"{run.peak_mb:>9,.0f} {run.step_s:>7.3f}")
        lora, full = runs["lora"], runs["full"]
        print(f"{shape:<6} LoRA / full: peak memory {lora.peak_mb / full.peak_mb:.2f}x, step time "
              f"{lora.step_s / full.step_s:.2f}x")


if __name__ == "__main__":
    main()
