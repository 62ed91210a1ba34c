"""The HTTP API, shaped like OpenAI's so that its clients work unchanged (as vLLM's server is, whose
split this package follows): ``create_app`` and its routes, thin over the modules beside it.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events ending
with ``data: [DONE]`` when ``stream`` is true), ``GET /v1/models``, vLLM's ``POST /tokenize`` and
``POST /detokenize``, this server's ``POST /inspect`` (a look inside the model at a prompt:
``inspection``), ``GET /health`` (with the engine's counters), ``GET /metrics`` (Prometheus' text
format) and the playground page at ``/``.

A route's body is parsed by FastAPI into a model of ``protocol``; ``service.Service`` checks it,
builds its ``SequenceRequest``s and submits them; ``replies.answer`` replies, whole or streamed.
Around the routes: ``middleware`` (the API key, the Host header, the body's size, the graceful
shutdown), ``errors`` (OpenAI's error JSON) and ``metrics`` (Prometheus').
"""

from __future__ import annotations

import asyncio
import contextlib
import html
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gpt2.serving.engine import Engine
from gpt2.serving.errors import install_error_handlers
from gpt2.serving.inspection import Inspector
from gpt2.serving.metrics import Metrics
from gpt2.serving.middleware import LOCAL_HOSTS, Draining, Guard, Shutdown, has_key
from gpt2.serving.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    InspectRequest,
    TokenizeRequest,
)
from gpt2.serving.replies import answer
from gpt2.serving.service import Service
from gpt2.tokenizer.chat_template import ChatTemplate
from gpt2.util.errors import UserError

if TYPE_CHECKING:
    from gpt2.interpretability.sae import SAE


def create_app(
    engine: Engine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    max_prompt_tokens: int | None = None,
    allowed_hosts: Sequence[str] = LOCAL_HOSTS,
    chat_template: ChatTemplate | None = None,
    public_metrics: bool = False,
    sae: SAE | None = None,
) -> FastAPI:
    """The API serving ``engine``'s model as ``model_name``; the engine runs while the app does.

    ``api_key``: requests to /v1 need ``Authorization: Bearer <api_key>`` (see ``gpt2.serving.middleware``
    for what stays public); so does /metrics unless ``public_metrics``. ``max_prompt_tokens``: the
    longest prompt taken (default: the context window less one token for the answer).
    ``allowed_hosts``: the Host headers answered ("*": any).
    ``chat_template``: the template chat requests are rendered with (default: the tokenizer's own;
    the plain transcript when it has none). ``sae``: an SAE whose top features /inspect lists per token
    (refused in one line when it does not fit the model).
    """
    if max_body_bytes < 1:
        raise UserError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
    if chat_template is None and getattr(engine.tokenizer, "chat_template", None) is not None:
        chat_template = ChatTemplate.of(engine.tokenizer)
    service = Service(engine, model_name, max_prompt_tokens, chat_template)
    inspector = Inspector(service, sae)
    app = FastAPI(title="gpt2", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine)
    shutdown = Shutdown(engine)
    app.add_middleware(Draining, shutdown=shutdown)  # inside Guard, which counts its 503s
    app.add_middleware(Guard, api_key=api_key, limit=max_body_bytes, hosts=allowed_hosts, metrics=metrics,
                       public_metrics=public_metrics)
    install_error_handlers(app)
    app.state.engine, app.state.metrics, app.state.shutdown = engine, metrics, shutdown
    page = _playground(model_name, service.window, chat_template is not None, inspector.page_config())

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if not has_key(api_key, dict(request.scope["headers"])):
            return {"status": "ok"}
        return {"status": "ok", "model": model_name, **engine.load()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "gpt2",
                "max_model_len": service.window, "chat_template": chat_template is not None}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        reply = await asyncio.to_thread(service.complete, body, asyncio.get_running_loop())
        return await answer(reply, body, request, metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        reply = await asyncio.to_thread(service.chat, body, asyncio.get_running_loop())
        return await answer(reply, body, request, metrics)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return page

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.scrape(), media_type=CONTENT_TYPE_LATEST)

    _add_tokenizer_routes(app, service)
    _add_inspect_route(app, inspector)
    metrics.routes = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    return app


def _add_tokenizer_routes(app: FastAPI, service: Service) -> None:
    """vLLM's ``POST /tokenize`` and ``POST /detokenize``."""

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await asyncio.to_thread(service.tokenize, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        return await asyncio.to_thread(service.detokenize, body)


def _add_inspect_route(app: FastAPI, inspector: Inspector) -> None:
    """``POST /inspect``: one inspection at a time, in a worker thread (``gpt2.serving.inspection``)."""

    @app.post("/inspect")
    async def inspect(body: InspectRequest) -> dict[str, Any]:
        async with inspector.lock:  # waiting here holds no worker thread
            return await asyncio.to_thread(inspector.inspect, body)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Runs the app's engine while the app runs."""
    app.state.engine.start()
    yield
    app.state.engine.stop()


def _playground(model_name: str, window: int, templated: bool, inside: str) -> str:
    """The playground page for this model; ``inside``: its inside view's settings (JSON)."""
    page = resources.files("gpt2.serving").joinpath("playground.html").read_text(encoding="utf-8")
    chat = ("the model's chat template" if templated else
            "a plain transcript (this model has no chat template), a reply one line")
    return (page.replace("{{INSIDE}}", inside).replace("{{MODEL}}", html.escape(model_name))
            .replace("{{WINDOW}}", str(window)).replace("{{CHAT_FORMAT}}", chat))

