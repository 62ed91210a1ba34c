"""The app's Prometheus metrics (``GET /metrics``, in Prometheus' text format), named as vLLM's are:
requests by route and status, tokens, the engine's latencies and, read at scrape time, its load. A
registry per app, so that apps in one process (the tests') keep their counts apart.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gpt2.serving.engine import Engine

# Histogram buckets (seconds), from a small model on a GPU to GPT-2 XL on a loaded CPU.
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """The app's Prometheus metrics, in a ``CollectorRegistry`` of its own (apps in one process do
    not share them), named as vLLM's are with the prefix ``gpt2_`` (an underscore: Prometheus keeps
    colons for recording rules). The requests by route and status (``answered``, from ``Guard``) and
    the tokens the replies' usage reports (``used``) are counted here; the latencies are the engine's
    own timings (``Engine.observers``); the engine's state is read at scrape time (``_EngineCollector``),
    speculative decoding's counters too when the engine drafts."""

    def __init__(self, engine: Engine) -> None:
        self.registry = registry = CollectorRegistry()
        self.routes: frozenset[str] = frozenset()  # the app's paths; any other is counted as "other"
        self.requests = Counter("gpt2_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=registry)
        self.prompt_tokens = Counter("gpt2_prompt_tokens", "prompt tokens of the completions, as their "
                                     "usage reports them", registry=registry)
        self.generation_tokens = Counter("gpt2_generation_tokens", "tokens generated, as the "
                                         "completions' usage reports them", registry=registry)
        self.timings = {
            "time_to_first_token": Histogram(
                "gpt2_time_to_first_token_seconds", "a request's first token, from its submission to "
                "the engine", registry=registry, buckets=FIRST_TOKEN_BUCKETS),
            "inter_token_latency": Histogram(
                "gpt2_inter_token_latency_seconds", "each later token of a sequence, from its previous "
                "one", registry=registry, buckets=INTER_TOKEN_BUCKETS),
            "e2e_request_latency": Histogram(
                "gpt2_e2e_request_latency_seconds", "a request's last token, from its submission to the "
                "engine (requests that finish)", registry=registry, buckets=REQUEST_BUCKETS),
        }
        registry.register(_EngineCollector(engine))
        engine.observers.append(self.observe)

    def answered(self, path: str, status: int) -> None:
        """Count a response with ``status`` to ``path``."""
        route = path if path in self.routes else "other"  # unknown paths must not make new series
        self.requests.labels(route=route, status=str(status)).inc()

    def used(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Count a reply's usage."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def observe(self, kind: str, seconds: float) -> None:
        """One of the engine's timings (called in its worker thread; the metrics are thread-safe)."""
        self.timings[kind].observe(seconds)

    def scrape(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's state at scrape time: what ``Engine.load`` (and /health) reports."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        """Gauges of the engine's load and cache, counters of its work."""
        load, engine = self.engine.load(), self.engine
        gauges = [("num_requests_running", "sequences being generated (prompts being read included)",
                   load["running"]),
                  ("num_requests_waiting", "sequences waiting for a slot of the KV cache", load["waiting"]),
                  ("kv_cache_positions_in_use", "positions of the KV cache that hold a running "
                   "sequence's tokens", load["cache_positions"]),
                  ("kv_cache_positions", "positions of the KV cache (slots x context window)",
                   engine.max_batch_size * engine.window),
                  ("prefix_cache_positions_in_use", "positions of the prefix cache that hold a "
                   "prompt's keys and values", load["prefix_cache_positions"]),
                  ("prefix_cache_positions", "positions of the prefix cache (--prefix-cache-tokens)",
                   0 if engine.prefix_cache is None else engine.prefix_cache.max_tokens),
                  ("max_batch", "the most sequences decoded in one forward pass so far", load["max_batch"])]
        for name, text, value in gauges:
            yield GaugeMetricFamily(f"gpt2_{name}", text, value=value)
        counters = [("forward_passes", "forward passes of the model", load["forward_passes"]),
                    ("prefix_cache_queries", "prompt positions looked up in the prefix cache",
                     load["prefix_cache_queries"]),
                    ("prefix_cache_hits", "prompt positions found in the prefix cache, not read again",
                     load["prefix_cache_hits"]),
                    ("requests_rejected", "requests refused because the queue was full", load["rejected"]),
                    ("sequences_cancelled", "sequences dropped because their client went away",
                     load["cancelled"]),
                    ("engine_errors", "steps of the engine that failed", load["errors"])]
        if engine.draft is not None:  # vLLM's names for speculative decoding's counters
            counters += [("spec_decode_num_drafts", "drafts verified (a sequence's, per step)",
                          load["drafts"]),
                         ("spec_decode_num_draft_tokens", "tokens drafted", load["draft_tokens"]),
                         ("spec_decode_num_accepted_tokens", "drafted tokens that verification kept",
                          load["accepted_tokens"])]
        for name, text, value in counters:
            yield CounterMetricFamily(f"gpt2_{name}", text, value=value)
