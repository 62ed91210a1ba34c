"""Serving under load: 32 concurrent clients × 8 requests each against `gpt2 serve` on loopback, with
continuous batching and with ``--no-batching`` (one sequence at a time), measured in the same run.

Each client sends its requests one after another (non-streaming completions, 64 new tokens, sampled
with a seed). Reported per mode: failed requests (must be 0), completion tokens per second over the
whole run, and the p50 and p99 request latency; then the ratio of the two throughputs.
Target: no errors, batching >= 3x the tokens/s of one-at-a-time.

The model is the `tiny` preset (4 layers, 256 wide, random weights) with GPT-2's tokenizer (the
shared gpt2.tiktoken; byte-level when it is absent), or ``--model`` for any checkpoint.

    python benchmarks/serve_load.py [--clients 32] [--requests 8] [--max-tokens 64] [--model M]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt2 import GPT2, GPT2Config, Tokenizer

PROMPTS = [
    "The history of the city begins",
    "In a small village by the sea, there lived",
    "Scientists announced on Tuesday that",
    "To make a good cup of tea, first",
    "The quarterly report shows",
    "Once upon a time",
]
SHARED_RANKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2.tiktoken"


def build_model(directory: Path) -> str:
    """Save a random `tiny` model with a tokenizer in ``directory``; returns what tokenizer it has."""
    ranks = Path(os.environ.get("GPT2_SHARED_DATA", SHARED_RANKS.parent)) / "gpt2.tiktoken"
    if ranks.is_file():
        tokenizer, name = Tokenizer.from_file(ranks), "GPT-2 BPE"
    else:
        tokenizer, name = Tokenizer({bytes([i]): i for i in range(256)}), "byte-level"
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("tiny", vocab_size=tokenizer.n_vocab))
    model.tokenizer = tokenizer
    model.save_pretrained(directory)
    return name


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    server: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(
    port: int, method: str, path: str, body: dict | None = None, timeout: float = 600
) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body)
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def run_load(model: str, extra: list[str], args: argparse.Namespace) -> Load:
    """Start `gpt2 serve` with ``extra`` options, send the load, stop it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gpt2", "serve", "--model", model, "--device", "cpu", "--port", str(port),
         "--model-name", "bench", *extra],
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if request(port, "GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start (exit status {server.poll()})")
            time.sleep(0.2)
        load = Load()
        lock = threading.Lock()

        def client(c: int) -> None:
            for r in range(args.requests):
                body = {"model": "bench", "prompt": PROMPTS[(c + r) % len(PROMPTS)],
                        "max_tokens": args.max_tokens, "temperature": 1.0, "seed": c * 1000 + r}
                start = time.perf_counter()
                try:
                    status, reply = request(port, "POST", "/v1/completions", body)
                    error = None if status == 200 else f"{status}: {reply}"
                except OSError as e:
                    status, reply, error = 0, {}, repr(e)
                elapsed = time.perf_counter() - start
                with lock:
                    if error is None:
                        load.latencies.append(elapsed)
                        load.tokens += reply["usage"]["completion_tokens"]
                    else:
                        load.errors.append(error)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load.wall_s = time.perf_counter() - start
        load.server = request(port, "GET", "/health")[1]
        return load
    finally:
        server.terminate()
        server.wait(timeout=30)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--requests", type=int, default=8, help="requests per client (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="slots when batching (default 32)")
    parser.add_argument("--model", help="a checkpoint to serve (default: a random tiny model)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        what = model
        if model is None:
            model = tmp
            what = f"random tiny preset, {build_model(Path(tmp))} tokenizer"
        print(f"model: {what}; {args.clients} clients x {args.requests} requests x {args.max_tokens} tokens; "
              f"torch threads {torch.get_num_threads()}", flush=True)
        results = {}
        for name, extra in (("batching", ["--max-batch-size", str(args.max_batch_size)]),
                            ("no-batching", ["--no-batching"])):
            results[name] = load = run_load(model, extra, args)
            print(f"  {name}: {load.wall_s:.1f} s, server counters {load.server}", flush=True)

    print()
    print(f"| {'mode':<12} | requests | errors | tokens | wall s | tokens/s | p50 latency s "
          "| p99 latency s |")
    print(f"|{'-' * 14}|----------|--------|--------|--------|----------|---------------|---------------|")
    for name, load in results.items():
        n = len(load.latencies) + len(load.errors)
        print(f"| {name:<12} | {n:>8} | {len(load.errors):>6} | {load.tokens:>6} | {load.wall_s:>6.1f} | "
              f"{load.tokens / load.wall_s:>8.1f} | {percentile(load.latencies, 50):>13.2f} | "
              f"{percentile(load.latencies, 99):>13.2f} |")
    ratio = (results["batching"].tokens / results["batching"].wall_s) / (
        results["no-batching"].tokens / results["no-batching"].wall_s)
    errors = sum(len(r.errors) for r in results.values())
    print(f"\nbatching / no-batching tokens/s: {ratio:.2f}x (target >= 3x); errors: {errors} (target 0)")
    for name, load in results.items():
        for error in load.errors[:3]:
            print(f"  {name} error: {error}")


if __name__ == "__main__":
    main()
