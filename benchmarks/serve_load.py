"""Serving under load: 128 concurrent clients against `gpt2 serve` on loopback, with mixed prompt lengths,
half of them streaming; then the same clients with continuous batching and with ``--no-batching``.

Part 1, the load. Each of ``--clients`` clients (default 128, all started together) sends ``--requests``
completions (default 4) one after another, each of ``--max-tokens`` new tokens (default 64), sampled
with a seed. Its prompts are drawn per client (deterministically, from a seeded generator) from three
lengths: short (4-16 tokens), medium (32-96) and long (128 up to 384, or what the context window leaves
beside the new tokens), cut from one English passage by the server's own /tokenize and /detokenize.
Even-numbered clients stream (server-sent events with ``stream_options: {"include_usage": true}``),
odd-numbered ones do not. Measured on the client side, per kind of client and for all of them:
requests, errors (any status but 200, a stream without usage or ``[DONE]``, an error event, or a usage
that disagrees with the chunks streamed), completion tokens (from usage) and completion tokens per
second over the whole run; for streams the time to the first token (TTFT: the request sent to its first
content chunk arriving) and the inter-token latency (ITL: the gaps between a stream's later chunks);
for every request its latency (sent to the last byte). Non-streaming requests have no TTFT but their
latency. The server process's memory (VmRSS and VmHWM of /proc/PID/status) is read after the model is
loaded and one warm-up request served, and again after the load (and after part 2's batching load);
a thread polls /health meanwhile for the most sequences running and waiting at once (128 running: the
clients really were concurrent), and the CPU time of the server and of the clients is counted (they
share the machine's cores).

Part 2, the comparison: ``--compare-requests`` (default 1) requests per client, the same clients, on
the batching server of part 1 and on one started with ``--no-batching`` (one sequence at a time); TTFT
and ITL from the streams, latency from every request.
Target: 0 errors; batching >= 3x the tokens/s of one-at-a-time.

The server runs with ``--max-batch-size`` = ``--clients`` (default 128; the server's own default is
16) so that every client has a slot, and ``--max-queue 256`` (its default). The model is the `tiny`
preset (4 layers, 256 wide, 256 positions, random weights) with GPT-2's tokenizer (the shared
gpt2.tiktoken; byte-level when it is absent), or ``--model`` for any checkpoint. ``--smoke``: 8 clients,
2 requests of 8 tokens, for the test.

    python benchmarks/serve_load.py [--clients 128] [--requests 4] [--max-tokens 64] [--model M] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt2 import GPT2, GPT2Config, Tokenizer

PASSAGE = (
    "The history of the city begins with a small settlement on the bank of the river, where fishermen "
    "dried their nets and traders stopped on their way to the coast. Over the centuries the village grew "
    "into a market town, then into a port, and finally into the capital of a province. Its old quarter "
    "still keeps the narrow streets, the stone bridges and the covered markets of those times, while the "
    "new districts spread across the hills to the north. In a small village by the sea, there lived an old "
    "woman who kept bees and sold honey to the travellers who passed along the road. Every morning she "
    "walked down to the harbour to watch the boats come in, and every evening she wrote a letter to her "
    "son, who had gone to study in the city and never came back. Scientists announced on Tuesday that a "
    "new kind of battery, made from common salt and iron, could store energy from wind and solar farms "
    "for days at a time. The team said the cells were cheap to build, did not catch fire, and lost less "
    "than a tenth of their capacity after a thousand cycles of charging. To make a good cup of tea, first "
    "warm the pot with a little hot water, then add one spoonful of leaves for each person and one for "
    "the pot. Pour on water that has just come to the boil, cover it, and wait four or five minutes "
    "before you pour. The quarterly report shows that revenue rose by eight percent compared with the "
    "same period last year, driven mostly by sales abroad, while costs grew more slowly than expected. "
    "The board proposed a higher dividend and announced a plan to open three new factories by the end "
    "of the next year. Once upon a time, in a kingdom far away, a young shepherd found a golden key lying "
    "in the grass. He carried it for many years, trying it in every lock he met, until one winter night "
    "he came upon a door in the side of a mountain that no one had ever seen before."
)
LENGTHS = {"short": (4, 16), "medium": (32, 96), "long": (128, 384)}  # prompt tokens, inclusive
SHARED_RANKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2.tiktoken"
KINDS = ("streaming", "non-streaming")


def build_model(directory: Path) -> str:
    """Save a random `tiny` model with a tokenizer in ``directory``; returns what tokenizer it has."""
    ranks = Path(os.environ.get("GPT2_SHARED_DATA", SHARED_RANKS.parent)) / "gpt2.tiktoken"
    if ranks.is_file():
        tokenizer, name = Tokenizer.from_file(ranks), "GPT-2 BPE"
    else:
        tokenizer, name = Tokenizer({bytes([i]): i for i in range(256)}), "byte-level"
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("tiny", vocab_size=tokenizer.n_vocab), tokenizer=tokenizer)
    model.save_pretrained(directory)
    return name


@dataclass
class Result:
    """One request as its client saw it (times in seconds; ``ttft`` and ``gaps`` for streams only)."""

    kind: str
    latency: float = 0.0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


@dataclass
class Load:
    """A run of every client: its requests' results, its wall time and the server's busiest moment."""

    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0
    peak_running: int = 0
    peak_waiting: int = 0
    max_batch: int = 0  # the server's own count: the most sequences it decoded in one forward pass
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0


def free_port() -> int:
    """A loopback port free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(
    port: int, method: str, path: str, body: dict | None = None, timeout: float = 600
) -> tuple[int, dict]:
    """One JSON request on a new connection: the status and the decoded reply."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body)
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of process ``pid``, in MB (10^6 bytes)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024 / 1e6
    return values


def cpu_s(pid: int) -> float:
    """The user + system CPU time process ``pid`` has used, all its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server(model: str, extra: list[str]) -> Iterator[tuple[subprocess.Popen, int]]:
    """`gpt2 serve` on a free loopback port with ``extra`` options, once /health answers; (process, port).
    A port that another process takes between its choice and the server's bind: another port."""
    for _ in range(5):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "gpt2", "serve", "--model", model, "--device", "cpu", "--port", str(port),
             "--model-name", "bench", *extra],
        )
        up = started(process, port)
        if up or process.poll() is None or not taken(port):
            break
    try:
        if not up:
            raise SystemExit(f"the server did not start (exit status {process.poll()})")
        yield process, port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def started(process: subprocess.Popen, port: int) -> bool:
    """Whether ``process`` answers /health on ``port`` (within 120 s) before it ends."""
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if request(port, "GET", "/health", timeout=5)[0] == 200:
                return True
        time.sleep(0.2)
    return False


def taken(port: int) -> bool:
    """Whether another process holds ``port`` now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def plan_prompts(port: int, args: argparse.Namespace, requests: int, seed: int) -> list[list[str]]:
    """Each client's prompts: lengths drawn by ``random.Random(seed + client)``, cut from the passage's
    tokens at a drawn offset and turned back into text by the server."""
    status, reply = request(port, "POST", "/tokenize", {"model": "bench", "prompt": PASSAGE})
    assert status == 200, reply
    window = reply["max_model_len"]
    ids = reply["tokens"] * (1 + 2 * LENGTHS["long"][1] // len(reply["tokens"]))
    longest = min(LENGTHS["long"][1], window - args.max_tokens - 1)
    plans = []
    for client in range(args.clients):
        rng = random.Random(seed + client)
        prompts = []
        for _ in range(requests):
            low, high = LENGTHS[rng.choice(list(LENGTHS))]
            n = rng.randint(min(low, longest), min(high, longest))
            start = rng.randrange(len(ids) - n)
            body = {"model": "bench", "tokens": ids[start:start + n]}
            status, text = request(port, "POST", "/detokenize", body)
            assert status == 200, text
            prompts.append(text["prompt"])
        plans.append(prompts)
    return plans


def warm_up(port: int, max_tokens: int) -> None:
    """One request, before anything is measured."""
    warm = send(port, {"model": "bench", "prompt": PASSAGE[:40], "max_tokens": max_tokens, "stream": False})
    assert warm.error is None, warm.error


def send(port: int, body: dict) -> Result:
    """Send one completion request; a stream when ``body["stream"]``."""
    result = Result("streaming" if body["stream"] else "non-streaming")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    try:
        connection.request("POST", "/v1/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            result.error = f"{response.status}: {response.read()[:300]!r}"
        elif body["stream"]:
            read_stream(response, start, result)
        else:
            usage = json.loads(response.read())["usage"]
            result.tokens, result.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as e:
        result.error = repr(e)
    finally:
        result.latency = time.perf_counter() - start
        connection.close()
    return result


def read_stream(response: http.client.HTTPResponse, start: float, result: Result) -> None:
    """Read a stream of server-sent events into ``result``: its times as the lines arrive, then the
    events decoded; a stream broken in any way sets ``result.error``."""
    events: list[tuple[float, bytes]] = []
    while line := response.readline():
        if line.startswith(b"data: "):
            events.append((time.perf_counter(), line[6:].strip()))
    if not events or events[-1][1] != b"[DONE]":
        result.error = "the stream ended without [DONE]"
        return
    times, usage = [], None
    for t, data in events[:-1]:
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = f"error event: {chunk['error']}"
            return
        if chunk.get("choices"):
            times.append(t)
        usage = chunk.get("usage") or usage
    if usage is None or not times or usage["completion_tokens"] != len(times):
        result.error = f"usage {usage} against {len(times)} content chunks"
        return
    result.ttft = times[0] - start
    result.gaps = [b - a for a, b in itertools.pairwise(times)]
    result.tokens, result.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]


def run_clients(port: int, pid: int, plans: list[list[str]], max_tokens: int, seed: int) -> Load:
    """Every client in a thread of its own, all released together, each sending its prompts one after
    another (even-numbered clients streaming); a thread polls /health for the busiest moment. The CPU
    time of the server (process ``pid``) and of this process is counted over the run."""
    load, lock = Load(), threading.Lock()
    barrier, done = threading.Barrier(len(plans) + 1), threading.Event()

    def client(c: int) -> None:
        barrier.wait()
        for r, prompt in enumerate(plans[c]):
            body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                    "seed": seed + c * 1000 + r, "stream": c % 2 == 0}
            if body["stream"]:
                body["stream_options"] = {"include_usage": True}
            result = send(port, body)
            with lock:
                load.results.append(result)

    def monitor() -> None:
        while not done.wait(0.05):
            with contextlib.suppress(OSError, ValueError):
                health = request(port, "GET", "/health", timeout=10)[1]
                load.peak_running = max(load.peak_running, health.get("running", 0))
                load.peak_waiting = max(load.peak_waiting, health.get("waiting", 0))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(plans))]
    for t in threads:
        t.start()
    watcher = threading.Thread(target=monitor)
    watcher.start()
    barrier.wait()
    start, server_cpu, client_cpu = time.perf_counter(), cpu_s(pid), time.process_time()
    for t in threads:
        t.join()
    load.wall_s = time.perf_counter() - start
    load.server_cpu_s, load.client_cpu_s = cpu_s(pid) - server_cpu, time.process_time() - client_cpu
    done.set()
    watcher.join()
    load.max_batch = request(port, "GET", "/health")[1]["max_batch"]
    return load


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (inclusive method); nan for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def ms_pair(values: list[float]) -> tuple[str, str]:
    """p50 and p99 of ``values`` (seconds) in ms, or a dash each when there are none."""
    if not values:
        return "-", "-"
    return f"{percentile(values, 50) * 1000:,.1f}", f"{percentile(values, 99) * 1000:,.1f}"


COLUMNS = ["clients", "requests", "errors", "tokens", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
           "ITL p99 ms", "latency p50 ms", "latency p99 ms"]


def table_row(name: str, results: list[Result], wall_s: float) -> list[str]:
    """The cells of one row: ``results`` over the run's ``wall_s``."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    return [name, f"{len(results):,}", str(len(results) - len(ok)), f"{tokens:,}", f"{tokens / wall_s:,.1f}",
            *ms_pair(ttft), *ms_pair(gaps), *ms_pair([r.latency for r in ok])]


def print_table(rows: list[list[str]], header: list[str]) -> None:
    """``rows`` under ``header``, the first column left-aligned, the rest right-aligned, two spaces apart."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        cells = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
        print("  ".join(cells).rstrip())


def print_load(load: Load, memory: dict[str, dict[str, float]]) -> None:
    """Part 1's tables: the load per kind of client and for all, then the server's memory."""
    rows = [table_row(kind, [r for r in load.results if r.kind == kind], load.wall_s) for kind in KINDS]
    rows.append(table_row("all", load.results, load.wall_s))
    rows[2][5:9] = ["-"] * 4  # TTFT and ITL are the streams' alone, in their own row
    print_table(rows, ["clients", *COLUMNS[1:]])
    prompts = [r.prompt_tokens for r in load.results if r.error is None]
    print(f"\nwall {load.wall_s:.1f} s; prompt tokens {min(prompts, default=0)}-{max(prompts, default=0)} "
          f"(mean {statistics.fmean(prompts) if prompts else 0:.0f}); server's most at once: "
          f"{load.peak_running} running, {load.peak_waiting} waiting (polled); most decoded together: "
          f"{load.max_batch}")
    print(f"CPU time over the run: the server {load.server_cpu_s:.1f} s, the clients (this process) "
          f"{load.client_cpu_s:.1f} s, of {os.cpu_count()} cores x {load.wall_s:.1f} s\n")
    print_table([[when, f"{m['VmRSS']:,.1f}", f"{m['VmHWM']:,.1f}"] for when, m in memory.items()],
                ["server memory", "VmRSS MB", "VmHWM MB"])
    print()
    for error in [r.error for r in load.results if r.error][:5]:
        print(f"  error: {error}")


def parse_args() -> argparse.Namespace:
    """The command line; ``--smoke`` sets the small sizes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=128, help="concurrent clients (default 128)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    parser.add_argument("--compare-requests", type=int, default=1,
                        help="requests per client in part 2, batching vs --no-batching (default 1; 0: skip)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--max-batch-size", type=int, help="the server's slots (default: --clients)")
    parser.add_argument("--max-queue", type=int, default=256, help="the server's queue (default 256)")
    parser.add_argument("--model", help="a checkpoint to serve (default: a random tiny model)")
    parser.add_argument("--smoke", action="store_true", help="8 clients x 2 requests x 8 tokens (the test)")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.requests, args.max_tokens = 8, 2, 8
    args.max_batch_size = args.max_batch_size or args.clients
    return args


def compare(model: str, process: subprocess.Popen, port: int, args: argparse.Namespace) -> int:
    """Part 2: the same clients' prompts on the batching server ``process`` at ``port`` and on a
    --no-batching one (after a warm-up request of its own); returns the failed requests."""

    def measure(at: int, pid: int) -> Load:
        plans = plan_prompts(at, args, args.compare_requests, 10_000)
        warm_up(at, args.max_tokens)
        return run_clients(at, pid, plans, args.max_tokens, 1)

    loads = {"batching": measure(port, process.pid)}
    memory = memory_mb(process.pid)
    with server(model, ["--no-batching", "--max-queue", str(args.max_queue)]) as (single, other):
        loads["no-batching"] = measure(other, single.pid)
    for name, load in loads.items():
        print(f"  {name}: {load.wall_s:.1f} s; CPU time: the server {load.server_cpu_s:.1f} s, the clients "
              f"{load.client_cpu_s:.1f} s", flush=True)
    print(f"  the batching server's memory after it: VmRSS {memory['VmRSS']:,.1f} MB, "
          f"VmHWM {memory['VmHWM']:,.1f} MB")
    rows = {name: table_row(name, load.results, load.wall_s) for name, load in loads.items()}
    print()
    print_table(list(rows.values()), ["mode", *COLUMNS[1:]])
    ratio = float(rows["batching"][4].replace(",", "")) / float(rows["no-batching"][4].replace(",", ""))
    errors = sum(int(row[2]) for row in rows.values())
    print(f"\nbatching / no-batching tokens/s: {ratio:.2f}x (target >= 3x); errors: {errors} (target 0)")
    return errors


def main() -> None:
    """Build the model, run part 1 and part 2, print the tables; exit status 1 if any request failed."""
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, what = args.model, args.model
        if model is None:
            model, what = tmp, f"random tiny preset, {build_model(Path(tmp))} tokenizer"
        settings = ["--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue)]
        print(f"model: {what}; {args.clients} clients (half streaming) x {args.requests} requests x "
              f"{args.max_tokens} tokens; client torch threads {torch.get_num_threads()}, "
              f"loadavg {Path('/proc/loadavg').read_text().split()[0]}", flush=True)
        print(f"server: gpt2 serve --device cpu {' '.join(settings)} (prefill chunk: its default)",
              flush=True)
        with server(model, settings) as (process, port):
            plans = plan_prompts(port, args, args.requests, 0)
            warm_up(port, args.max_tokens)
            memory = {"before": memory_mb(process.pid)}
            load = run_clients(port, process.pid, plans, args.max_tokens, 0)
            memory["after"] = memory_mb(process.pid)
            print(f"\npart 1: {args.clients} clients x {args.requests} requests, mixed prompt lengths\n")
            print_load(load, memory)
            errors = sum(r.error is not None for r in load.results)
            if args.compare_requests:
                print(f"part 2: {args.clients} clients x {args.compare_requests} request(s), "
                      "batching vs one sequence at a time", flush=True)
                errors += compare(model, process, port, args)
    print(f"\nerrors in part 1: {sum(r.error is not None for r in load.results)} (target 0); loadavg at "
          f"the end {Path('/proc/loadavg').read_text().split()[0]}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
