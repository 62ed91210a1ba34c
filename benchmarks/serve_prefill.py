"""Chunked prefill: how long running streams stall when a long prompt arrives, reading the prompt
whole (as a server without chunked prefill does) and in chunks, measured in the same run.

Four sequences decode (greedy, 124M shape, random weights, fp32 on the CPU); once each has made 20
tokens a 1,000-token prompt arrives. Reported per setting: the longest and the median gap between two
tokens of the running sequences, and the long prompt's time to its first token.

    python benchmarks/serve_prefill.py [--preset gpt2] [--prompt 1000] [--chunks 128 256]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time

import torch

from gpt2 import GPT2, GPT2Config, Tokenizer
from gpt2.generation.sampling import GenerationConfig
from gpt2.inference.load import load_for_inference
from gpt2.serving.engine import Engine, Job, SequenceRequest

RUNNING, NEW = 4, 160


async def measure(engine: Engine, prompt: list[int]) -> tuple[list[float], float]:
    """Gaps (s) between tokens of the running sequences around the long prompt's arrival, and its
    time to first token."""
    arrivals: dict[int, list[float]] = {i: [] for i in range(RUNNING)}

    async def follow(job: Job) -> None:
        async for index, _ in job.steps():
            arrivals[index].append(time.perf_counter())

    greedy = GenerationConfig(max_new_tokens=NEW, temperature=0)
    running = engine.submit([SequenceRequest([i + 1] * 8, greedy) for i in range(RUNNING)])
    following = asyncio.create_task(follow(running))
    while min(len(a) for a in arrivals.values()) < 20:
        if following.done():
            following.result()  # raises what went wrong
        await asyncio.sleep(0.001)
    sent = time.perf_counter()
    long = engine.submit([SequenceRequest(prompt, GenerationConfig(max_new_tokens=1, temperature=0))])
    async for _ in long.steps():
        first = time.perf_counter() - sent
    await following
    gaps = [b - a for times in arrivals.values() for a, b in itertools.pairwise(times) if b > sent - 0.5]
    return gaps, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--prompt", type=int, default=1000, help="tokens of the long prompt")
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256])
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config.from_preset(args.preset)
    model = load_for_inference(GPT2(config), device="cpu")
    tokenizer = Tokenizer(  # some bytes for every id of the model: only the ids matter here
        {bytes([i % 256]) * (1 + i // 256): i for i in range(config.vocab_size - 1)},
        {"<|endoftext|>": config.vocab_size - 1},
    )
    prompt = torch.randint(0, 256, (args.prompt,)).tolist()

    print(f"{args.preset}, fp32, {torch.get_num_threads()} threads: {RUNNING} sequences decoding when a "
          f"{args.prompt}-token prompt arrives\n")
    print(f"{'prefill':<20}{'longest gap ms':>16}{'median gap ms':>15}{'long prompt TTFT s':>20}")
    longest = {}
    for chunk in [config.n_positions, *args.chunks]:
        engine = Engine(model, tokenizer, max_batch_size=RUNNING + 1, prefill_chunk=chunk)
        engine.start()
        try:
            gaps, first = asyncio.run(measure(engine, prompt))
        finally:
            engine.stop()
        name = "whole prompt" if chunk == config.n_positions else f"chunks of {chunk}"
        longest[chunk] = max(gaps)
        print(f"{name:<20}{max(gaps) * 1e3:>16.0f}{statistics.median(gaps) * 1e3:>15.0f}{first:>20.2f}")
    for chunk in args.chunks:
        ratio = longest[config.n_positions] / longest[chunk]
        print(f"longest stall, whole / chunks of {chunk}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
