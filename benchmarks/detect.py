"""Detection quality: our detector's score (Fast-DetectGPT's sampling discrepancy per token) against the
baselines a user would otherwise reach for, on the same texts in the same run: mean log-likelihood
(Solaiman et al. 2019), mean log-rank, and GLTR's share of top-10 tokens (Gehrmann et al. 2019).

People's text: held-out passages (the demo's validation shard). The model's text: its continuations
of each passage's first 20 tokens, sampled four ways (top-k 40 as in the paper, top-p 0.9,
temperature 0.7, and plain temperature 1, which no likelihood statistic can catch). Prints the AUROC
of each statistic per way, the ratio of ours to the best baseline, the rates at the calibrated
threshold (at most 1% of people's passages called generated), and scoring speed.

Needs a trained model and its held-out tokens, e.g. from ``make demo``:

    .venv/bin/python benchmarks/detect.py [--model runs/shakespeare] [--val data/shakespeare/val_000000.bin]
"""

from __future__ import annotations

import argparse
import time

import torch

from gpt2.data.shards import read_shard
from gpt2.evaluation.detection import STATISTICS, Detector, split_passages
from gpt2.generation.sampling import GenerationConfig
from gpt2.inference.load import load_for_inference

WAYS = {
    "top-k 40": GenerationConfig(top_k=40, seed=1),
    "top-p 0.9": GenerationConfig(top_p=0.9, seed=1),
    "temperature 0.7": GenerationConfig(temperature=0.7, seed=1),
    "temperature 1": GenerationConfig(seed=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/shakespeare")
    parser.add_argument("--val", default="data/shakespeare/val_000000.bin", help="held-out tokens (a shard)")
    parser.add_argument("--passages", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=200, help="tokens per passage")
    args = parser.parse_args()

    model = load_for_inference(args.model, device="cpu")
    detector = Detector(model, model.tokenizer)
    passages = split_passages(read_shard(args.val).tolist(), args.tokens, args.passages)
    print(f"{args.model} ({model.num_parameters() / 1e6:.1f}M parameters); {len(passages)} held-out passages "
          f"of {args.tokens} tokens against the model's continuations of their first 20 tokens\n")
    names = list(STATISTICS)
    print(f"{'sampling':<16}" + "".join(f"{n:>16}" for n in names) + f"{'ours/best':>11}{'FPR':>7}{'TPR':>7}")
    scored, seconds = 0, 0.0
    for way, sampling in WAYS.items():
        start = time.perf_counter()
        c = detector.calibrate(passages, sampling=sampling)
        seconds += time.perf_counter() - start
        scored += 2 * len(passages) * args.tokens
        best = max(c.auroc[n] for n in names[1:])
        print(f"{way:<16}" + "".join(f"{c.auroc[n]:>16.3f}" for n in names)
              + f"{c.auroc['score'] / best:>10.2f}x{c.false_positive_rate:>7.1%}{c.true_positive_rate:>7.1%}")
    print(f"\nAUROC: 1 = perfect, 0.5 = chance. FPR/TPR: people's / the model's passages called generated at "
          f"the calibrated threshold. {scored / seconds:,.0f} tokens/s scored and sampled, "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
