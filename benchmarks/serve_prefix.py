"""Shared prefixes: time to first token for requests that share a long prompt prefix, with the
engine's prefix cache off and on, measured in the same run.

32 requests share a 600-token prefix (a system prompt, few-shot examples, a document asked several
questions) and differ in a 20-token suffix; 124M shape, random weights, GPT-2's 50,257-token
vocabulary, fp32 on the CPU, the model loaded as ``gpt2 serve`` loads it. Two arrival patterns:
"one by one" (each request sent when the previous one has finished) and "all at once" (the 32
together, 16 decoded at a time as ``gpt2 serve`` does by default). Reported per pattern and setting:
the median and p90 time to first token (from the submission to the engine), the prompt positions the
model read, those found in the cache, and whether the greedy tokens equal those without the cache.
Target: the cache gives >= 3x lower median time to first token.

    python benchmarks/serve_prefix.py [--requests 32] [--prefix 600] [--suffix 20] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from gpt2 import GPT2, GPT2Config, Tokenizer
from gpt2.generation.sampling import GenerationConfig
from gpt2.inference.load import load_for_inference
from gpt2.serving.engine import PREFIX_CACHE_TOKENS, Engine, SequenceRequest

PATTERNS = ("one by one", "all at once")


async def first_tokens(engine: Engine, prompts: list[list[int]], new_tokens: int, together: bool
                       ) -> tuple[list[float], list[list[int]]]:
    """Each prompt's time to first token (s) and greedy tokens, sent one by one or all together."""
    greedy = GenerationConfig(max_new_tokens=new_tokens, temperature=0)

    async def one(prompt: list[int]) -> tuple[float, list[int]]:
        sent, first, tokens = time.perf_counter(), None, []
        async for _, step in engine.submit([SequenceRequest(prompt, greedy)]).steps():
            first = first or time.perf_counter() - sent
            tokens.append(step.token)
        assert first is not None
        return first, tokens

    if together:
        results = await asyncio.gather(*(one(p) for p in prompts))
    else:
        results = [await one(p) for p in prompts]
    return [r[0] for r in results], [r[1] for r in results]


def measure(model: GPT2, tokenizer: Tokenizer, prompts: list[list[int]], args: argparse.Namespace,
            cache_tokens: int, together: bool) -> dict[str, object]:
    """One pattern with one prefix-cache budget, on a fresh engine warmed up by an unrelated prompt."""
    engine = Engine(model, tokenizer, max_batch_size=args.batch, prefix_cache_tokens=cache_tokens)
    engine.start()
    try:
        asyncio.run(first_tokens(engine, [[1, 2, 3]], 2, together=False))
        read, reused = engine.stats.prompt_tokens, engine.stats.prefix_cache_hits
        ttft, tokens = asyncio.run(first_tokens(engine, prompts, args.new_tokens, together))
    finally:
        engine.stop()
    return {"ttft": ttft, "tokens": tokens, "read": engine.stats.prompt_tokens - read,
            "reused": engine.stats.prefix_cache_hits - reused}


def row(cells: list[str]) -> str:
    """A line of the table: the first cell to the left, the others to the right."""
    return f"{cells[0]:<12}" + "".join(f"{c:>16}" for c in cells[1:])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2", help="model shape (default gpt2, the 124M)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=600, help="tokens all the prompts share")
    parser.add_argument("--suffix", type=int, default=20, help="tokens of each prompt's own")
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens generated per request")
    parser.add_argument("--batch", type=int, default=16, help="sequences decoded together (--max-batch-size)")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 8 requests, short prompts (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.requests, args.prefix, args.suffix = "tiny", 8, 100, 10
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    config = GPT2Config.from_preset(args.preset, vocab_size=50257)
    model = load_for_inference(GPT2(config), device="cpu")
    tokenizer = Tokenizer(  # some bytes for every id of the model: only the ids matter here
        {bytes([i % 256]) * (1 + i // 256): i for i in range(config.vocab_size - 1)},
        {"<|endoftext|>": config.vocab_size - 1},
    )
    words = torch.randint(0, config.vocab_size - 1, (args.prefix + args.requests * args.suffix,)).tolist()
    prefix = words[: args.prefix]
    prompts = [prefix + words[args.prefix + i * args.suffix :][: args.suffix] for i in range(args.requests)]
    print(f"{args.preset}, fp32, {torch.get_num_threads()} threads: {args.requests} requests sharing a "
          f"{args.prefix}-token prefix, each with a {args.suffix}-token suffix of its own, "
          f"{args.new_tokens} new tokens (greedy), batch {args.batch}\n")
    header = ["arrival", "prefix cache", "median TTFT ms", "p90 TTFT ms", "positions read", "reused",
              "same tokens"]
    print(row(header))
    medians: dict[tuple[str, int], float] = {}
    for pattern in PATTERNS:
        baseline: list[list[int]] = []
        for budget in (0, PREFIX_CACHE_TOKENS):
            r = measure(model, tokenizer, prompts, args, budget, together=pattern == "all at once")
            ttft = sorted(r["ttft"])  # type: ignore[arg-type]
            medians[pattern, budget] = statistics.median(ttft)
            baseline = baseline or r["tokens"]  # type: ignore[assignment]
            cells = [pattern, f"{budget:,}" if budget else "off", f"{medians[pattern, budget] * 1e3:,.0f}",
                     f"{ttft[int(0.9 * (len(ttft) - 1))] * 1e3:,.0f}", f"{r['read']:,}", f"{r['reused']:,}",
                     "yes" if r["tokens"] == baseline else "NO"]
            print(row(cells))
    print("\ntarget: >= 3x lower median time to first token with the prefix cache")
    for pattern in PATTERNS:
        ratio = medians[pattern, 0] / medians[pattern, PREFIX_CACHE_TOKENS]
        print(f"  {pattern}: {ratio:.1f}x lower ({'met' if ratio >= 3 else 'NOT met'})")


if __name__ == "__main__":
    main()
