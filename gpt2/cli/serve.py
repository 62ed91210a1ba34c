"""``gpt2 serve``: an OpenAI-compatible HTTP server with continuous batching and a browser playground."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from gpt2.cli.chat import add_chat_template_argument, chat_template
from gpt2.cli.options import (
    add_draft_arguments,
    add_model_arguments,
    check_draft_options,
    load_draft,
    load_model_and_tokenizer,
)
from gpt2.util.errors import UserError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gpt2.api import GPT2
    from gpt2.interpretability.sae import SAE
    from gpt2.serving.connections import Limits
    from gpt2.serving.middleware import Shutdown

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CLOSE_S = 5  # after the drain, how long uvicorn waits for connections to close before it drops them


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        description="Serve a model with OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models), "
        "vLLM's /tokenize and /detokenize, /health, Prometheus metrics at /metrics, and a playground page "
        "at / . Concurrent requests are decoded together (continuous batching), and prompts are read in "
        "chunks between their steps (chunked prefill). Chat requests are rendered with the model's chat "
        "template (its tokenizer's, or --chat-template's) and a reply ends at the end-of-turn token; a "
        "base model without one continues a plain transcript, a reply one line. POST /inspect (and the "
        "playground's inside view) looks inside the model at a prompt: attention patterns, the logit "
        "lens, and with --sae an SAE's features. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    add_model_arguments(p)
    add_chat_template_argument(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("GPT2_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1, /tokenize, /detokenize and /metrics "
                   "requests (default: $GPT2_API_KEY; none: no key needed). /health stays public but shows "
                   "its counters only with the key; / (the playground page) holds nothing secret")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics (Prometheus' text format: requests, latencies, queue, KV cache, "
                   "tokens) without the --api-key, for a scraper that sends none")
    p.add_argument("--allowed-hosts", metavar="HOSTS",
                   help="comma-separated Host headers to answer, others get 400 (guards against DNS "
                   "rebinding; default: localhost, 127.0.0.1, [::1] and --host; '*': any)")
    p.add_argument("--model-name", metavar="NAME",
                   help="the model id clients ask for (default: the last part of --model)")
    p.add_argument("--max-batch-size", type=int, default=16, metavar="N",
                   help="sequences decoded together (default 16); each is a slot of the KV cache, "
                   "preallocated for the whole context window")
    p.add_argument("--no-batching", action="store_true",
                   help="serve one sequence at a time (the same as --max-batch-size 1), for comparison")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="sequences that may wait for a slot; more are refused with 429 (default 256)")
    p.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                   help="read prompts N positions per step beside the other sequences' decoding, so a "
                   "long prompt does not stall them (default 256)")
    p.add_argument("--prefix-cache-tokens", type=int, default=4096, metavar="N",
                   help="keep the keys and values of recent prompts, up to N positions (least recently "
                   "used go first), and reuse them for later prompts that start the same way (a system "
                   "prompt, few-shot examples, a document asked several questions); 0 turns it off "
                   "(default 4096; memory: N x 2 x layers x width x the dtype's bytes)")
    add_draft_arguments(p, server=True)
    p.add_argument("--sae", metavar="DIR",
                   help="a sparse autoencoder in SAELens's format (cfg.json + sae_weights.safetensors) "
                   "for this model: /inspect and the playground's inside view list each token's most "
                   "active features (an SAE of another width or hook is refused in one line)")
    p.add_argument("--max-prompt-tokens", type=int, metavar="N",
                   help="refuse longer prompts (default: the context window less one)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                   help="refuse request bodies over N bytes with 413 (default 1 MiB)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="close a connection whose request's head (its line and headers) is not whole S "
                   "seconds after it opened, or after its previous response (default 10); a client that "
                   "sends its headers a byte at a time holds nothing longer")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="S",
                   help="close a kept-alive connection idle for S seconds (default 5)")
    p.add_argument("--max-connections", type=int, default=1000, metavar="N",
                   help="connections open at once (default 1000): over it a new connection closes the one "
                   "that has waited longest for a request's head; when every one is running a request, "
                   "a few more answer /health alone and others get 503. The limit on open files is raised "
                   "to fit it")
    p.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                   help="on SIGTERM or SIGINT, answer new requests 503 and give the running ones S "
                   "seconds to finish (default 30; 0: none); those still running are then cut, ending "
                   "with finish_reason \"abort\", and the server exits with status 0. A second signal "
                   "cuts at once")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from gpt2.serving import Engine, create_app
    from gpt2.serving.connections import Limits, allow_descriptors

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_batch_size", "max_queue", "prefill_chunk", "max_prompt_tokens", "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.prefix_cache_tokens < 0:
        raise UserError(f"--prefix-cache-tokens must be 0 (off) or more, got {args.prefix_cache_tokens}")
    if not args.drain_seconds >= 0:  # NaN too
        raise UserError(f"--drain-seconds must be 0 or more, got {args.drain_seconds}")
    hosts = _allowed_hosts(args.host, args.allowed_hosts)
    limits = Limits(header_timeout=args.header_timeout, timeout_keep_alive=args.timeout_keep_alive,
                    max_connections=args.max_connections)
    allow_descriptors(limits)
    check_draft_options(args)
    model, tokenizer = load_model_and_tokenizer(args)
    template = chat_template(args, tokenizer)
    draft = load_draft(args, model)  # a draft model: loaded as the model is, checked against it
    sae = _load_sae(args.sae, model) if args.sae is not None else None
    batch = 1 if args.no_batching else args.max_batch_size
    engine = Engine(model, tokenizer, max_batch_size=batch, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, prefix_cache_tokens=args.prefix_cache_tokens,
                    draft=draft)
    name = args.model_name or args.model.rstrip("/\\").replace("\\", "/").split("/")[-1]
    app = create_app(engine, model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     max_prompt_tokens=args.max_prompt_tokens, allowed_hosts=hosts,
                     chat_template=template, public_metrics=args.public_metrics, sae=sae)
    if args.api_key is None and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    chat = "its chat template" if template is not None else "the plain transcript (no chat template)"
    drafting = "" if draft is None else f", drafts by {args.draft} ({draft.tokens} tokens a step)"
    print(f"serving {name!r} on http://{args.host}:{args.port}/ (batch {batch}), chat in {chat}{drafting}",
          file=sys.stderr)
    _serve(app, args.host, args.port, args.drain_seconds, limits)
    return 0


def _load_sae(directory: str, model: GPT2) -> SAE:
    """The SAE in ``directory``, on the model's device (``create_app`` checks that it fits the model)."""
    from gpt2.interpretability.sae import SAE

    return SAE.load(directory, device=model.device)


def _serve(app: FastAPI, host: str, port: int, drain_seconds: float, limits: Limits) -> None:
    """Serve ``app`` under ``limits`` (``gpt2.serving.connections``) until a signal of
    ``SHUTDOWN_SIGNALS``, then drain it (``_DrainingServer``)."""
    from gpt2.serving.connections import uvicorn_options

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=CLOSE_S, **uvicorn_options(limits))
    _DrainingServer(config, app.state.shutdown, drain_seconds).run()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, stopped by the app's graceful shutdown (``gpt2.serving.middleware.Shutdown``):
    the first SIGTERM or SIGINT drains the app (new requests 503, the running ones given
    ``drain_seconds``, then cut), a second one cuts at once; uvicorn's own shutdown follows. The signal
    is not raised again once the server has stopped, as uvicorn's handling does, so a drained server
    exits with 0."""

    def __init__(self, config: uvicorn.Config, shutdown: Shutdown, drain_seconds: float) -> None:
        super().__init__(config)
        self.graceful, self.drain_seconds = shutdown, drain_seconds
        self.draining: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Handlers for ``SHUTDOWN_SIGNALS`` that call ``signalled`` on the event loop, in place of
        uvicorn's while the server runs (``signal.signal``: ``loop.add_signal_handler`` is POSIX only)."""
        loop = asyncio.get_running_loop()

        def handler(sig: int, _: FrameType | None) -> None:
            loop.call_soon_threadsafe(self.signalled, sig)

        previous = {sig: signal.signal(sig, handler) for sig in SHUTDOWN_SIGNALS}
        try:
            yield
        finally:
            for sig, before in previous.items():
                signal.signal(sig, before)

    def signalled(self, sig: int) -> None:
        """Begin the drain, or cut it short if it has begun."""
        if self.draining is not None:
            print(f"{signal.Signals(sig).name} again: cutting the running requests", file=sys.stderr)
            self.graceful.cut_in(0)
            return
        print(f"{signal.Signals(sig).name}: shutting down; new requests get 503, the running ones have "
              f"{self.drain_seconds:g} s to finish (a second signal cuts them at once)", file=sys.stderr)
        self.draining = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        """Drain the app, then have uvicorn stop (it closes the connections, busy ones within ``CLOSE_S``)."""
        await self.graceful.drain(self.drain_seconds)
        self.should_exit = True


def _allowed_hosts(host: str, given: str | None) -> list[str]:
    """The Host headers to answer: ``given`` (comma-separated), else the loopback names and ``host``."""
    from gpt2.serving.middleware import LOCAL_HOSTS

    if given is not None:
        hosts = [h.strip() for h in given.split(",") if h.strip()]
        if not hosts:
            raise UserError("--allowed-hosts names no host; give e.g. 'example.com,127.0.0.1' or '*'")
        return hosts
    return [*LOCAL_HOSTS, f"[{host}]" if ":" in host else host]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
