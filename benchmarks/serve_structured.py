"""Structured output's cost per token: the server's engine decoding free text, a JSON schema and a
regex, measured in the same run.

Four sequences decode together (temperature 1, seeded, 64 new tokens each, GPT-2's tokenizer and its
50,257-token vocabulary, the 124M shape with random weights, fp32 on the CPU), through
``gpt2.serving.Engine`` as ``gpt2 serve`` runs it. The schema and the regex leave the strings unbounded,
so that a random model's replies rarely end before 64 tokens. Reported per format: the tokens made,
the wall time per token (the best of ``--repeats`` runs, the formats taking turns) and its ratio to
free text; and the time of
the masks alone (llguidance's batched bitmask for the four rows, unpacked into the boolean mask the
engine applies), per token, replaying the drawn tokens. The target: constrained decoding within 10%
of free text's time per token at this size.

    python benchmarks/serve_structured.py [--preset gpt2] [--new 64] [--repeats 3] [--smoke]

``--smoke``: the tiny preset, 8 new tokens, one run; seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import torch

from gpt2 import GPT2, GPT2Config, Tokenizer
from gpt2.generation.sampling import GenerationConfig
from gpt2.inference.load import load_for_inference
from gpt2.serving.engine import Engine, SequenceRequest
from gpt2.serving.structured import Grammar, StructuredOutputs, allowed_tokens, grammar_of, json_grammar

SHARED = Path(os.environ.get("GPT2_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ROWS = 4
PROMPT = "Here is the user's record as JSON:"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
REGEX = r"[A-Z][a-z]+( [a-z]+)*, [a-z ]+\."


async def decode(engine: Engine, requests: list[SequenceRequest]) -> list[list[int]]:
    """Every sequence's tokens, once all of them finished."""
    tokens: list[list[int]] = [[] for _ in requests]
    async for index, step in engine.submit(requests).steps():
        tokens[index].append(step.token)
    return tokens


def run(
    engine: Engine, prompt: list[int], new: int, grammar: Grammar | None
) -> tuple[float, list[list[int]]]:
    """Seconds to decode ``ROWS`` sequences held to ``grammar`` (None: free text), and their tokens."""
    requests = [SequenceRequest(prompt, GenerationConfig(max_new_tokens=new, temperature=1.0, seed=seed,
                                                         stop_token_ids=(engine.tokenizer.eot_token,)),
                                grammar=grammar) for seed in range(ROWS)]
    start = time.perf_counter()
    tokens = asyncio.run(decode(engine, requests))
    return time.perf_counter() - start, tokens


def mask_seconds(grammar: Grammar, tokens: list[list[int]], vocab_size: int) -> float:
    """The time of the masks alone for ``tokens`` (the rows' drawn tokens), rows together as in the
    engine: replayed on new constraints, each step's mask computed and its token taken."""
    constraints = [grammar.constraint() for _ in tokens]
    total = 0.0
    for step in range(max(map(len, tokens))):
        live = [(c, row[step]) for c, row in zip(constraints, tokens, strict=True)
                if step < len(row) and not c.done]
        if not live:
            break
        start = time.perf_counter()
        allowed_tokens([c for c, _ in live], vocab_size, torch.device("cpu"))
        total += time.perf_counter() - start
        for c, token in live:
            if token != grammar.tokenizer.eos_token:
                c.advance(token)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="runs per format; the best is reported")
    parser.add_argument("--ranks", type=Path, default=SHARED / "gpt2.tiktoken", help="GPT-2's ranks file")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset, 8 new tokens, one run")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.new, args.repeats = "tiny", 8, 1
    if not args.ranks.is_file():
        sys.exit(f"{args.ranks} is missing: set GPT2_SHARED_DATA to the directory holding gpt2.tiktoken")
    tokenizer = Tokenizer.from_file(args.ranks)
    torch.manual_seed(0)
    config = GPT2Config.from_preset(args.preset)
    model = load_for_inference(GPT2(config), device="cpu")
    engine = Engine(model, tokenizer, max_batch_size=ROWS)
    prompt = tokenizer.encode(PROMPT)
    formats = {"text": None, "json_schema": json_grammar(SCHEMA, tokenizer, "schema"),  # compiled now
               "regex": grammar_of(None, StructuredOutputs(regex=REGEX), tokenizer)}

    print(f"{args.preset}, fp32, {torch.get_num_threads()} threads, vocabulary {config.vocab_size}: {ROWS} "
          f"sequences x {args.new} new tokens, best of {args.repeats}\n")
    print(f"{'format':<14}{'tokens':>8}{'ms/token':>11}{'vs text':>10}{'mask ms/token':>16}")
    engine.start()
    try:
        run(engine, prompt, 4, None)  # warm up
        runs: dict[str, list[tuple[float, list[list[int]]]]] = {name: [] for name in formats}
        for _ in range(args.repeats):  # the formats in turn, so that the machine's drift hits them alike
            for name, grammar in formats.items():
                runs[name].append(run(engine, prompt, args.new, grammar))
        text_ms = None
        for name, grammar in formats.items():
            seconds, tokens = min(runs[name], key=lambda result: result[0])
            made = sum(map(len, tokens))
            ms = seconds * 1e3 / made
            text_ms = text_ms or ms
            mask = "-"
            if grammar is not None:
                mask = f"{mask_seconds(grammar, tokens, config.vocab_size) * 1e3 / made:.3f}"
            print(f"{name:<14}{made:>8}{ms:>11.2f}{ms / text_ms:>9.2f}x{mask:>16}")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
