"""Evaluation throughput: our sliding-window perplexity against transformers' GPT2LMHeadModel (the
transformers perplexity guide's loop), same weights, same windows, same machine, one run.

    .venv/bin/python benchmarks/eval.py [--preset gpt2] [--windows 4] [--stride 1024] [--device cpu]

Prints tokens/s for both, the ratio (ours / transformers), and both perplexities (they must agree).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch

from gpt2 import GPT2, GPT2Config, Tokenizer
from gpt2.config import PRESETS
from gpt2.evaluation import Scorer
from gpt2.inference.load import load_for_inference


def transformers_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The transformers perplexity guide's loop, one window per forward pass."""
    seq_len, nll, count, prev_end = ids.size(1), 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        x = ids[:, begin:end].to(model.device)
        labels = x.clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.inference_mode():
            loss = model(x, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss.item() * scored, count + scored, end
        if end == seq_len:
            break
    return math.exp(nll / count), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2", choices=list(PRESETS),
                        help="model shape (random weights)")
    parser.add_argument("--windows", type=int, default=4, help="number of context-sized windows of tokens")
    parser.add_argument("--stride", type=int,
                        help="stride in tokens (default: the context, disjoint windows)")
    parser.add_argument("--batch-size", type=int, default=1, help="our windows per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best one counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    from transformers import GPT2LMHeadModel

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    config = GPT2Config.from_preset(args.preset)
    ours = load_for_inference(GPT2(config), precision=args.precision, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = GPT2LMHeadModel.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
    # any ids below the vocabulary size will do; the byte tokenizer only serves the byte counts
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)}, {"<|endoftext|>": config.vocab_size - 1})
    n = config.n_positions * args.windows
    ids = torch.randint(0, 256, (1, n))
    stride = args.stride or config.n_positions
    scorer = Scorer(ours, tokenizer, batch_size=args.batch_size)

    def run_ours() -> float:
        return scorer.perplexity([ids[0].tolist()], stride=stride).perplexity

    def run_theirs() -> float:
        return transformers_perplexity(theirs, ids, config.n_positions, stride)[0]

    print(f"{args.preset} ({ours.num_parameters() / 1e6:.0f}M parameters, random weights) on {args.device}, "
          f"{args.precision}, {torch.get_num_threads()} threads; {n:,} tokens, context {config.n_positions}, "
          f"stride {stride}, our batch size {args.batch_size}")
    for warm_up in (run_theirs, run_ours):
        warm_up()
    best = {"transformers": math.inf, "ours": math.inf}
    perplexity = {}
    for _ in range(args.repeats):  # alternate the two, keep each one's best time: load noise only slows
        for name, run in (("transformers", run_theirs), ("ours", run_ours)):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            perplexity[name] = run()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - started)
    speeds = {name: n / seconds for name, seconds in best.items()}
    for name in best:
        print(f"{name:<13} {speeds[name]:>10,.0f} tokens/s   (best of {args.repeats}: {best[name]:.2f} s, "
              f"perplexity {perplexity[name]:.4f})")
    print(f"ratio ours / transformers: {speeds['ours'] / speeds['transformers']:.2f}x")


if __name__ == "__main__":
    main()
