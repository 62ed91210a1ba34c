"""``gpt2 serve``: an OpenAI-compatible HTTP server with continuous batching and a browser playground."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from gpt2.cli.chat import add_chat_template_argument, chat_template
from gpt2.cli.options import add_model_arguments, load_model_and_tokenizer
from gpt2.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        description="Serve a model with OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models), "
        "vLLM's /tokenize and /detokenize, /health, Prometheus metrics at /metrics, and a playground page "
        "at / . Concurrent requests are decoded together (continuous batching), and prompts are read in "
        "chunks between their steps (chunked prefill). Chat requests are rendered with the model's chat "
        "template (its tokenizer's, or --chat-template's) and a reply ends at the end-of-turn token; a "
        "base model without one continues a plain transcript, a reply one line. Binds to 127.0.0.1 "
        "unless --host says otherwise.",
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
    p.add_argument("--max-prompt-tokens", type=int, metavar="N",
                   help="refuse longer prompts (default: the context window less one)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                   help="refuse request bodies over N bytes with 413 (default 1 MiB)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the server stack is only needed here

    from gpt2.serving import Engine, create_app

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_batch_size", "max_queue", "prefill_chunk", "max_prompt_tokens", "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    hosts = _allowed_hosts(args.host, args.allowed_hosts)
    model, tokenizer = load_model_and_tokenizer(args)
    template = chat_template(args, tokenizer)
    batch = 1 if args.no_batching else args.max_batch_size
    engine = Engine(model, tokenizer, max_batch_size=batch, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk)
    name = args.model_name or args.model.rstrip("/\\").replace("\\", "/").split("/")[-1]
    app = create_app(engine, model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     max_prompt_tokens=args.max_prompt_tokens, allowed_hosts=hosts,
                     chat_template=template, public_metrics=args.public_metrics)
    if args.api_key is None and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    chat = "its chat template" if template is not None else "the plain transcript (no chat template)"
    print(f"serving {name!r} on http://{args.host}:{args.port}/ (batch {batch}), chat in {chat}",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _allowed_hosts(host: str, given: str | None) -> list[str]:
    """The Host headers to answer: ``given`` (comma-separated), else the loopback names and ``host``."""
    from gpt2.serving.app import LOCAL_HOSTS

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
