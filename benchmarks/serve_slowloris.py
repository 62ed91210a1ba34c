"""Slow clients against `gpt2 serve`: /health's latency while a slowloris flood holds connections.

A `gpt2 serve` process (a random `tiny` model, as benchmarks/serve_load.py builds it) runs with
``--max-connections`` and ``--header-timeout``. A flood process of its own opens ``--connections``
connections to it (default 1,500, more than the cap), each sending a request's head a byte every
``--interval`` seconds and never finishing it, and opens a connection again whenever the server closes
one, after ``--reconnect-delay`` seconds (default 0: at once, the worst case: the cap is met over and
over, thousands of times a second). Meanwhile this process asks for /health every
0.1 s, each time on a new connection (as a load balancer does), and counts the server's open files.

Reported: /health's latency (median, p99, max) and failures before the flood and during it, the flood's
connections (open at once, opened in all, closed by the server: made room for newer ones, or timed
out) and the most files the server had open. The target: /health answers every time, in under a
second, while the server's open files stay within the cap.

    python benchmarks/serve_slowloris.py [--connections 1500] [--seconds 20] [--interval 1]
        [--max-connections 1000] [--header-timeout 10] [--smoke]

``--smoke``: 200 connections against a cap of 100, a 3-second flood, reconnecting after 0.5 s (the
test's machine may be busy: the flood is kept from taking more of it than the cap needs); for the test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

PROBE_EVERY_S = 0.1
PROBE_TIMEOUT_S = 10.0
SAFETY_S = 120.0  # the longest the flood may take to open its connections: a safety net
HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "  # a head that is never finished


def flood(port: int, connections: int, interval: float, delay: float, ready: Queue, stop: Event) -> None:
    """The flood process: ``connections`` slow clients until ``stop``; puts "open" on ``ready`` once
    each has connected, then ("done", most open at once, opened in all, closed by the server)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else
                                                    min(wanted, hard), hard))
    asyncio.run(_flood(port, connections, interval, delay, ready, stop))


async def _flood(port: int, connections: int, interval: float, delay: float, ready: Queue,
                 stop: Event) -> None:
    counts = {"open": 0, "most": 0, "opened": 0, "closed": 0, "clients": 0}

    async def slow_client() -> None:
        first = True
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(interval)  # the attacker's pace while the server refuses
                continue
            counts["open"] += 1
            counts["opened"] += 1
            counts["most"] = max(counts["most"], counts["open"])
            if first:
                first, counts["clients"] = False, counts["clients"] + 1
                if counts["clients"] == connections:
                    ready.put("open")
            closed = await _trickle(reader, writer, interval, stop)
            counts["closed"] += closed
            counts["open"] -= 1
            if closed and delay:
                await asyncio.sleep(delay)  # the attacker's pace

    await asyncio.gather(*(slow_client() for _ in range(connections)))
    ready.put(("done", counts["most"], counts["opened"], counts["closed"]))


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, interval: float,
                   stop: Event) -> int:
    """Send ``HEAD``, then a byte every ``interval`` seconds, until ``stop`` (0) or the server closes
    the connection (1)."""
    try:
        writer.write(HEAD)
        while not stop.is_set():
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(1024), interval)
                return 1  # the server closed it (or answered, which ends it as well)
            writer.write(b"a")
        return 0
    except OSError:
        return 1
    finally:
        writer.close()


def probe(port: int, pid: int, seconds: float) -> tuple[list[float], int, int]:
    """/health every ``PROBE_EVERY_S`` for ``seconds``, each on a new connection: the latencies of
    those answered 200, how many were not, and the most files process ``pid`` had open."""
    latencies, failed, files = [], 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        files = max(files, len(os.listdir(f"/proc/{pid}/fd")))
        start = time.perf_counter()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_S)
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            connection.close()
            ok = response.status == 200
        except OSError:
            ok = False
        if ok:
            latencies.append(time.perf_counter() - start)
        failed += not ok
        time.sleep(PROBE_EVERY_S)  # the load balancer's pace
    return latencies, failed, files


def row(phase: str, latencies: list[float], failed: int) -> str:
    ms = sorted(x * 1e3 for x in latencies) or [float("nan")]
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return (f"{phase:<8}{len(latencies) + failed:>8}{failed:>8}{statistics.median(ms):>10.1f}{p99:>10.1f}"
            f"{ms[-1]:>10.1f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1500, help="slow connections (default 1500)")
    parser.add_argument("--seconds", type=float, default=20.0, help="the flood's length (default 20)")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between a slow connection's bytes (default 1)")
    parser.add_argument("--reconnect-delay", type=float, default=0.0,
                        help="seconds before a connection the server closed is opened again (default 0)")
    parser.add_argument("--max-connections", type=int, default=1000, help="the server's cap (default 1000)")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="the server's deadline for a request's head (default 10)")
    parser.add_argument("--smoke", action="store_true", help="200 connections, a cap of 100, 3 seconds")
    args = parser.parse_args()
    if args.smoke:
        args.connections, args.max_connections, args.seconds, args.interval = 200, 100, 3.0, 0.5
        args.reconnect_delay = 0.5
    return args


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_load import build_model, server

    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as model:
        build_model(Path(model))
        extra = ["--max-connections", str(args.max_connections), "--header-timeout", str(args.header_timeout)]
        with server(model, extra) as (process, port):
            print(f"{args.connections} slow connections (a byte every {args.interval:g} s, reopened "
                  f"{args.reconnect_delay:g} s after the server closes one) against gpt2 serve "
                  f"{' '.join(extra)}, for {args.seconds:g} s\n")
            idle = probe(port, process.pid, 2.0)
            ready, stop = context.Queue(), context.Event()
            flooder = context.Process(target=flood, args=(port, args.connections, args.interval,
                                                          args.reconnect_delay, ready, stop))
            flooder.start()
            try:
                ready.get(timeout=SAFETY_S)
                flooded = probe(port, process.pid, args.seconds)
            finally:
                stop.set()
            _, open_at_once, opened, closed = ready.get(timeout=SAFETY_S)
            flooder.join(timeout=SAFETY_S)
    print(f"{'phase':<8}{'probes':>8}{'failed':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    print(row("idle", *idle[:2]))
    print(row("flood", *flooded[:2]))
    print(f"\nflood connections: {open_at_once} open at once, {opened} opened in all, {closed} closed by "
          f"the server")
    print(f"server's open files: at most {idle[2]} before the flood, {flooded[2]} during it "
          f"(--max-connections {args.max_connections})")


if __name__ == "__main__":
    main()
