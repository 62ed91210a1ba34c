"""The HTTP API, shaped like OpenAI's so that its clients work unchanged.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events ending
with ``data: [DONE]`` when ``stream`` is true), ``GET /v1/models``, vLLM's ``POST /tokenize`` and
``POST /detokenize``, ``GET /health`` (with the engine's counters), ``GET /metrics`` (Prometheus'
text format, ``_Metrics``) and the playground page at ``/``.
Errors are OpenAI's JSON, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for
anything the client can fix; a 500 says only that the server failed, with an id that finds its
traceback in the log, and keeps the connection open.

What is public when an API key is set: ``/health`` answers ``{"status": "ok"}`` to anyone (for load
balancers) and its model name and counters only with the key; ``/`` is the playground page, which
holds nothing secret (the model's name and window; the key is typed into it by its user). Everything
under /v1, and /tokenize, /detokenize and /metrics, need the key (/metrics not with
``public_metrics``). Requests whose ``Host`` header names a host not in ``allowed_hosts`` are refused
(400), so a web page cannot reach a server on 127.0.0.1 by DNS rebinding.

A graceful shutdown (``Shutdown``, begun by ``gpt2 serve`` on SIGTERM or SIGINT): every new request,
on a new connection or a kept-alive one, /health too (so that load balancers stop sending any), gets
503 (``server_shutting_down``, the connection closed after it); the requests running get until the
drain's deadline to finish, then each unfinished choice ends with finish_reason "abort" (vLLM's name
for a request the server ended; OpenAI's API has none): a whole reply returns what was generated, a
stream sends that last chunk, then ``data: [DONE]``.

The work a request asks for is bounded before any is done: its sequences (prompts x ``n``) against
the queue, each prompt's length in characters against what ``max_prompt_tokens`` can hold; prompts are
encoded and sequences built in a worker thread, never on the event loop.

OpenAI's sampling parameters are honoured (``temperature``, ``top_p``, ``n``, ``stop``, ``seed``,
``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``logprobs``...), and beyond them, as in
vLLM, ``top_k`` (0 = off), ``min_p`` (0 = off) and ``repetition_penalty`` (CTRL's, 1 = off).
Structured output (``gpt2.serving.structured``): OpenAI's ``response_format`` (``json_object``,
``json_schema``) or vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``) hold every choice to
a grammar; a format that cannot be used (an invalid or unsatisfiable schema) is a 400.
``max_tokens`` is capped so that prompt + completion fit the context window; a completion's
``max_tokens`` may be 0 with ``echo`` (the prompt scored, nothing generated, as OpenAI's legacy API
and vLLM take it). The token that ends a completion (``<|endoftext|>``) has its logprob
entry, text "", so that ``echo`` + ``logprobs`` give len(prompt) + completion_tokens entries. Chat
renders the messages with the model's chat template when there is one (``gpt2.tokenizer.chat_template``, as
transformers and vLLM do: any order of roles the template takes, then its generation prompt; a reply
ends at the end-of-turn token or a ``stop`` string, and loses the one space the template leaves after
its prompt). A base model without one becomes a chat partner through the plain transcript of
``gpt2.generation.prompts`` (system messages replace its header line; each reply is one line). In both, the oldest
turns are dropped when the messages do not fit.

The module, top to bottom: the request bodies (strict pydantic models); errors in OpenAI's shape
(``APIError``, the exception handlers) and ``Guard``, the middleware that checks the API key and the
body size before a body is read; ``Shutdown`` and its middleware ``Draining``; ``create_app``, whose
routes are thin: FastAPI parses the body, ``_Service`` (the model name, context window, prompt limit,
tokenizer and engine) checks it, builds its ``SequenceRequest``s and submits them, and ``_answer``
replies, whole or streamed; ``_Metrics`` holds the app's Prometheus metrics, in a registry of its own.
Last the replies, one class per kind of response: ``_CompletionReply`` and ``_ChatReply`` over
``_Reply``, which holds what they share (the id, the usage, the loop over the job's steps);
``_event_stream`` sends the chunks as server-sent events.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import math
import re
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from importlib import resources
from typing import Any, ClassVar, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2.generation.prompts import CHAT_HEADER, CHAT_STOPS, Chat, Transcript, fit_messages
from gpt2.generation.sampling import GenerationConfig, encode_prompt
from gpt2.serving.engine import Engine, Job, QueueFull, SequenceRequest, Step
from gpt2.serving.structured import FormatError, ResponseFormat, StructuredOutputs, grammar_of
from gpt2.tokenizer.bpe import bytes_to_unicode
from gpt2.tokenizer.chat_template import ChatTemplate
from gpt2.util.errors import UserError

MAX_N = 16  # choices per prompt
MAX_STOPS = 4
KEYED_PATHS = ("/tokenize", "/detokenize")  # beside /v1/... and /metrics, the routes that need the API key
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the Host headers served by default ("*": any)
_TOKEN_ID = re.compile(r"[0-9]{1,9}")  # a logit_bias key (str.isdigit also takes "²")
log = logging.getLogger("gpt2.serving")

Entry = tuple[int, float | None, dict[int, float] | None]  # a token, its logprob, the top logprobs


# ----------------------------------------------------------------------------------------------------
# Request bodies (strict: "5" is not a number, 1 is not a boolean)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="an extension: sample among the k likeliest (0 = all)")
    min_p: float | None = Field(None, ge=0, le=1, description="an extension: drop p < min_p x the top p")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOPS)
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = Field(None, gt=0, description="an extension: CTRL's penalty (1 = off)")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(None, description="an extension: vLLM's")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", dict: "an object"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]  # a string, or OpenAI's content parts (text ones only here)

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One clear error for content of another type (not one per type of the union)."""
        try:
            return handler(value)
        except ValidationError:
            got = _JSON_TYPES.get(type(value), "a list of something other than objects")
            raise PydanticCustomError("content_type", "must be a string or a list of {'type': 'text', "
                                      "'text': ...} parts, got {got}", {"got": got}) from None

    @property
    def text(self) -> str:
        """The message's text: its content, or its text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        kinds = [part.get("type") for part in self.content]
        texts = [part.get("text") for part in self.content]
        if any(kind != "text" for kind in kinds) or not all(isinstance(t, str) for t in texts):
            other = next((k for k in kinds if k != "text"), "text without a 'text' string")
            raise APIError(400, f"messages: a content part of type {other!r}; this model reads only "
                           "{'type': 'text', 'text': ...} parts", param="messages", code="invalid_value")
        return "\n".join(texts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a ``prompt``, or chat ``messages`` rendered as /v1/chat/completions
    renders them (none dropped). ``add_special_tokens`` is taken for vLLM's sake: GPT-2's tokenizer
    adds none either way."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize body: the ids to turn into text."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                        code="invalid_json")
    param = where[0] if where else None
    if len(errors) > 1 and len({e["loc"][:2] for e in errors}) == 1:  # every type of a union refused it
        takes = ", ".join(dict.fromkeys(str(e["loc"][2]) for e in errors if len(e["loc"]) > 2))
        got = type(first.get("input")).__name__
        return APIError(400, f"{param}: got a value of type {got}, expected one of: {takes}", param=param,
                        code="invalid_type")
    return APIError(400, f"{'.'.join(where) or 'body'}: {first['msg']}", param=param, code="invalid_value")


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def user_error(_: Request, exc: UserError) -> JSONResponse:
        return APIError(400, str(exc), code="invalid_value").response()

    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        return APIError(exc.status_code, message, code=_HTTP_CODES.get(exc.status_code)).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _failure(exc: BaseException) -> APIError:
    """The 500 for ``exc``: its traceback goes to the log under an id, the client gets only the id."""
    error_id = uuid.uuid4().hex[:12]
    log.error("request failed (error id %s)", error_id, exc_info=exc)
    return APIError(500, f"the server failed (error id {error_id}; the server's log has the details)",
                    type="server_error", code="internal_error")


def _has_key(api_key: str | None, headers: dict[bytes, bytes]) -> bool:
    """Whether the request may use /v1: no key is set, or it sends ``Authorization: Bearer <key>``."""
    given = headers.get(b"authorization", b"")
    return api_key is None or secrets.compare_digest(given, f"Bearer {api_key}".encode())


def _host_name(header: bytes) -> str:
    """The host of a Host header, without its port ("[::1]:8000" -> "[::1]")."""
    host = header.decode("latin-1").strip().lower()
    return host.partition("]")[0] + "]" if host.startswith("[") else host.partition(":")[0]


class Guard:
    """ASGI middleware, checked before a body is read: the Host header (400 unless allowed), the API
    key on /v1, ``KEYED_PATHS`` and /metrics (unless ``public_metrics``; 401 without it) and the body
    size limit (413 over it); and, around everything, an unexpected exception answered as a 500 that
    keeps the connection usable. Every response is counted in ``metrics`` as its status line goes out."""

    def __init__(self, app: ASGIApp, api_key: str | None, limit: int, hosts: Sequence[str],
                 metrics: _Metrics | None = None, public_metrics: bool = False) -> None:
        self.app, self.api_key, self.limit = app, api_key, limit
        self.hosts = None if "*" in hosts else {h.lower() for h in hosts}
        self.metrics, self.public_metrics = metrics, public_metrics

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])
        host = _host_name(headers.get(b"host", b""))
        if self.hosts is not None and host not in self.hosts:
            return APIError(400, f"the Host header {host!r} is not a host this server answers to; start "
                            f"it with --allowed-hosts {host or '*'} to serve it", code="invalid_host")
        path = scope["path"]
        keyed = (path.startswith("/v1/") or path in KEYED_PATHS
                 or (path == "/metrics" and not self.public_metrics))
        if keyed and not _has_key(self.api_key, headers):
            return APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer "
                            "<key>'", code="invalid_api_key")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return APIError(413, f"the request body is over the limit of {self.limit} bytes "
                            "(--max-body-bytes)", code="request_too_large")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.metrics is not None:
                    self.metrics.answered(scope["path"], message["status"])
            await send(message)

        error = self._refusal(scope)
        if error is not None:
            return await error.response()(scope, receive, sending)
        try:
            await self._limited(scope, receive, sending)
        except Exception as e:
            if started:  # too late for a status line: the server closes the connection
                raise
            await _failure(e).response()(scope, receive, sending)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, with the body cut off at the limit."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # a chunked body that declared no length
                raise HTTPException(413, f"the request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class Shutdown:
    """A graceful shutdown, begun by ``drain`` (``gpt2 serve`` calls it on SIGTERM or SIGINT): from
    then on every new request is answered 503 (``Draining``, the middleware that also counts the
    requests being answered); those already running get until the deadline to finish, then the
    engine cuts the rest (``Engine.cut``: each choice ends with finish_reason "abort", a stream with
    that last chunk and ``[DONE]``)."""

    POLL_S = 0.05  # how often the drain looks at the requests running
    FLUSH_S = 5.0  # after the cut, how long the cut replies may take to go out

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.draining = False
        self.running = 0  # requests being answered (their responses not sent whole yet)
        self.deadline = math.inf  # time.monotonic() when the running requests are cut

    async def drain(self, seconds: float) -> None:
        """Refuse new requests, wait up to ``seconds`` for the running ones to finish, then cut them
        and wait (at most ``FLUSH_S``) for their replies to go out."""
        self.draining = True
        self.cut_in(seconds)
        while self.running and time.monotonic() < self.deadline:
            await asyncio.sleep(self.POLL_S)
        if not self.running:
            return
        log.warning("shutting down: cutting the %d requests still running", self.running)
        self.engine.cut()
        flushed = time.monotonic() + self.FLUSH_S
        while self.running and time.monotonic() < flushed:
            await asyncio.sleep(self.POLL_S)

    def cut_in(self, seconds: float) -> None:
        """Cut the running requests ``seconds`` from now, if that is sooner than planned (0: at once)."""
        self.deadline = min(self.deadline, time.monotonic() + seconds)


class Draining:
    """ASGI middleware of a ``Shutdown``: counts the requests being answered and, once the shutdown
    drains, answers every new one 503 with ``Connection: close`` (a keep-alive client moves on too)."""

    def __init__(self, app: ASGIApp, shutdown: Shutdown) -> None:
        self.app, self.shutdown = app, shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.shutdown.draining:
            response = APIError(503, "the server is shutting down and takes no new requests; send it to "
                                "another server or retry later", type="server_error",
                                code="server_shutting_down").response()
            response.headers["Connection"] = "close"
            return await response(scope, receive, send)
        self.shutdown.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.shutdown.running -= 1


# ----------------------------------------------------------------------------------------------------
# The application: thin routes over one _Service


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
) -> FastAPI:
    """The API serving ``engine``'s model as ``model_name``; the engine runs while the app does.

    ``api_key``: requests to /v1 need ``Authorization: Bearer <api_key>`` (see the module's docstring
    for what stays public); so does /metrics unless ``public_metrics``. ``max_prompt_tokens``: the
    longest prompt taken (default: the context window less one token for the answer).
    ``allowed_hosts``: the Host headers answered ("*": any).
    ``chat_template``: the template chat requests are rendered with (default: the tokenizer's own;
    the plain transcript when it has none).
    """
    if max_body_bytes < 1:
        raise UserError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
    if chat_template is None and getattr(engine.tokenizer, "chat_template", None) is not None:
        chat_template = ChatTemplate.of(engine.tokenizer)
    service = _Service(engine, model_name, max_prompt_tokens, chat_template)
    app = FastAPI(title="gpt2", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = _Metrics(engine)
    shutdown = Shutdown(engine)
    app.add_middleware(Draining, shutdown=shutdown)  # inside Guard, which counts its 503s
    app.add_middleware(Guard, api_key=api_key, limit=max_body_bytes, hosts=allowed_hosts, metrics=metrics,
                       public_metrics=public_metrics)
    _install_error_handlers(app)
    app.state.engine, app.state.metrics, app.state.shutdown = engine, metrics, shutdown
    page = _playground(model_name, service.window, chat_template is not None)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if not _has_key(api_key, dict(request.scope["headers"])):
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
        return await _answer(reply, body, request, metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        reply = await asyncio.to_thread(service.chat, body, asyncio.get_running_loop())
        return await _answer(reply, body, request, metrics)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return page

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.scrape(), media_type=CONTENT_TYPE_LATEST)

    _add_tokenizer_routes(app, service)
    metrics.routes = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    return app


def _add_tokenizer_routes(app: FastAPI, service: _Service) -> None:
    """vLLM's ``POST /tokenize`` and ``POST /detokenize``."""

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await asyncio.to_thread(service.tokenize, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        return await asyncio.to_thread(service.detokenize, body)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Runs the app's engine while the app runs."""
    app.state.engine.start()
    yield
    app.state.engine.stop()


def _playground(model_name: str, window: int, templated: bool) -> str:
    """The playground page for this model."""
    page = resources.files("gpt2.serving").joinpath("playground.html").read_text(encoding="utf-8")
    chat = ("the model's chat template" if templated else
            "a plain transcript (this model has no chat template), a reply one line")
    return (page.replace("{{MODEL}}", html.escape(model_name)).replace("{{WINDOW}}", str(window))
            .replace("{{CHAT_FORMAT}}", chat))


async def _answer(reply: _Reply, body: _Sampling, request: Request, metrics: _Metrics) -> Any:
    """``reply`` streamed as server-sent events when the body asks for it, else whole; its usage
    counted in ``metrics`` once its last choice is done (before the stream's ``[DONE]``)."""
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def counted() -> AsyncIterator[dict[str, Any]]:
            try:
                async for chunk in reply.chunks(include_usage):
                    yield chunk
            finally:
                metrics.used(reply.prompt_tokens, reply.completion_tokens)

        return _event_stream(counted())
    try:
        return await reply.whole(request.is_disconnected)
    finally:
        metrics.used(reply.prompt_tokens, reply.completion_tokens)


# Histogram buckets (seconds), from a small model on a GPU to GPT-2 XL on a loaded CPU.
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _Metrics:
    """The app's Prometheus metrics, in a ``CollectorRegistry`` of its own (apps in one process do
    not share them), named as vLLM's are with the prefix ``gpt2_`` (an underscore: Prometheus keeps
    colons for recording rules). The requests by route and status (``answered``, from ``Guard``) and
    the tokens the replies' usage reports (``used``) are counted here; the latencies are the engine's
    own timings (``Engine.observers``); the engine's state is read at scrape time (``_EngineCollector``)."""

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
        for name, text, value in counters:
            yield CounterMetricFamily(f"gpt2_{name}", text, value=value)


class _Service:
    """The model behind the routes: checks a request against it, turns the request into the engine's
    ``SequenceRequest``s, submits them and gives back the job's reply. Its ``complete`` and ``chat``
    run in a worker thread, their jobs reporting to the event loop ``loop``; so do ``tokenize`` and
    ``detokenize``, which answer at once."""

    def __init__(self, engine: Engine, model_name: str, max_prompt_tokens: int | None,
                 template: ChatTemplate | None = None) -> None:
        self.engine, self.model_name, self.tokenizer = engine, model_name, engine.tokenizer
        self.template = template
        self.window = engine.window
        if max_prompt_tokens is not None and not 1 <= max_prompt_tokens < self.window:
            raise UserError(f"max_prompt_tokens must be in 1..{self.window - 1} (the context window "
                            f"less one), got {max_prompt_tokens}")
        self.max_prompt = max_prompt_tokens or self.window - 1
        # A token holds at most this many characters: a longer string is refused before encoding.
        longest = max(len(self.tokenizer.decode_bytes([t])) for t in range(self.tokenizer.n_vocab))
        self.max_prompt_chars = self.max_prompt * longest

    def complete(self, body: CompletionRequest, loop: asyncio.AbstractEventLoop) -> _CompletionReply:
        """A completion request, checked and submitted: the reply to its job."""
        self.check_model(body)
        scoring = body.max_tokens == 0  # the prompt's logprobs only: one token drawn, not answered
        if scoring and not body.echo:
            raise APIError(400, "max_tokens: 0 is taken only with echo true (the prompt scored, nothing "
                           "generated); ask for at least 1 token", param="max_tokens", code="invalid_value")
        given = _prompt_list(body.prompt)
        self.check_count(len(given) * body.n)
        prompts = [self.checked_prompt(p if isinstance(p, list) else self.encoded(p, "prompt"), "prompt")
                   for p in given]
        requests = self.sequences(body, prompts, 1 if scoring else body.max_tokens, _stops(body.stop),
                                  body.logprobs, prompt_logprobs=body.echo and body.logprobs is not None)
        return _CompletionReply(self.submit(requests, loop), self.tokenizer, self.model_name,
                                sum(map(len, prompts)), echo=body.echo, generates=not scoring)

    def chat(self, body: ChatRequest, loop: asyncio.AbstractEventLoop) -> _ChatReply:
        """A chat completion request, checked and submitted: the reply to its job."""
        self.check_model(body)
        self.check_count(body.n)
        max_new = body.max_completion_tokens or body.max_tokens
        budget = min(self.max_prompt, self.window - (max_new or 1))
        self.check_chars(body.messages[-1].text, "messages")
        if budget < 1:
            raise APIError(400, f"max_tokens leaves no room for the messages in the context window "
                           f"({budget})", param="max_tokens")
        if self.template is None:
            text = _chat_prompt(body.messages, self.tokenizer, budget, self.max_prompt_chars)
            ids, stops = encode_prompt(self.tokenizer, text), (*CHAT_STOPS, *_stops(body.stop))
        else:
            ids = _templated_prompt(self.template, body.messages, self.tokenizer, budget,
                                    self.max_prompt_chars)
            stops = _stops(body.stop)
        prompt = self.checked_prompt(ids, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        requests = self.sequences(body, [prompt], max_new, stops, top)
        return _ChatReply(self.submit(requests, loop), self.tokenizer, self.model_name, len(prompt),
                          one_space=self.template is not None)

    def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize: the ids of the prompt (special tokens in it are special, as in
        transformers; "" has none) or of the rendered messages, their count and the window."""
        self.check_model(body)
        if (body.prompt is None) == (body.messages is None):
            given = ("both prompt and messages: give one" if body.prompt is not None else
                     "neither prompt nor messages: give prompt (a string) or messages (chat messages)")
            raise APIError(400, f"the body has {given}", param="prompt", code="invalid_value")
        if body.prompt is not None:
            ids = self.tokenizer.encode(body.prompt, allowed_special=frozenset(self.tokenizer.special_tokens))
        elif self.template is None:
            text = _chat_prompt(body.messages or [], self.tokenizer, sys.maxsize, sys.maxsize)
            ids = encode_prompt(self.tokenizer, text)
        else:
            given = [{"role": m.role, "content": m.text} for m in body.messages or []]
            try:
                text, _ = self.template.render(given, self.tokenizer,
                                               add_generation_prompt=body.add_generation_prompt)
            except UserError as e:
                raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
            ids = self.tokenizer.encode(text, allowed_special=frozenset(self.tokenizer.special_tokens))
        strs = _token_strs(self.tokenizer, ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.window, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: DetokenizeRequest) -> dict[str, str]:
        """vLLM's /detokenize: the text of the ids (special tokens as their text)."""
        self.check_model(body)
        return {"prompt": self.tokenizer.decode(self.check_ids(body.tokens, "tokens"))}

    def check_count(self, sequences: int) -> None:
        """400 for more sequences (prompts x n) than the queue can ever take."""
        if sequences > self.engine.max_queue:
            raise APIError(400, f"the request asks for {sequences} sequences (prompts x n), more than "
                           f"this server ever queues ({self.engine.max_queue}); send fewer prompts or "
                           "a smaller n", param="n", code="too_many_sequences")

    def check_chars(self, text: str, param: str) -> None:
        """400 when ``text`` has too many characters to fit the prompt limit, whatever its tokens."""
        if len(text) > self.max_prompt_chars:
            raise APIError(400, f"the prompt is {len(text)} characters long, over this server's limit "
                           f"of {self.max_prompt} tokens (context window {self.window}); shorten it",
                           param=param, code="context_length_exceeded")

    def encoded(self, text: str, param: str) -> list[int]:
        """``text``'s ids, once its length in characters can fit the limit."""
        self.check_chars(text, param)
        return encode_prompt(self.tokenizer, text)

    def check_model(self, body: _Sampling | TokenizeRequest | DetokenizeRequest) -> None:
        """404 unless the body names no model or this one."""
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist here; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    def checked_prompt(self, ids: list[int], param: str) -> list[int]:
        """``ids``, once they are known to fit the prompt limit and the vocabulary."""
        if len(ids) > self.max_prompt:
            raise APIError(400, f"the prompt is {len(ids)} tokens long, over this server's limit of "
                           f"{self.max_prompt} (context window {self.window}); shorten it", param=param,
                           code="context_length_exceeded")
        return self.check_ids(ids, param)

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        """``ids``, once they are known to be in the vocabulary."""
        n_vocab = self.tokenizer.n_vocab
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is not in the vocabulary (0..{n_vocab - 1})",
                           param=param, code="invalid_value")
        return ids

    def sequences(self, body: _Sampling, prompts: list[list[int]], max_new: int | None,
                  stops: tuple[str, ...], logprobs: int | None,
                  prompt_logprobs: bool = False) -> list[SequenceRequest]:
        """``body.n`` sequences per prompt (the i-th seeded ``seed + i``), each ending by the window."""
        bias = _logit_bias(body.logit_bias or {}, self.tokenizer.n_vocab)
        try:
            grammar = grammar_of(body.response_format, body.structured_outputs, self.tokenizer)
        except FormatError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        out = []
        for ids in prompts:
            max_new_tokens = min(max_new or self.window, self.window - len(ids))
            out += [SequenceRequest(ids, self._config(body, i, max_new_tokens, stops, bias), logprobs,
                                    prompt_logprobs, grammar) for i in range(body.n)]
        return out

    def _config(self, body: _Sampling, i: int, max_new_tokens: int, stops: tuple[str, ...],
                bias: dict[int, float]) -> GenerationConfig:
        """The body's sampling parameters as the i-th sequence's config (OpenAI's defaults filled in)."""
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k or None, top_p=body.top_p, min_p=body.min_p,
            stop_token_ids=(self.tokenizer.eot_token,),
            stop_strings=stops, seed=None if body.seed is None else body.seed + i,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0, logit_bias=bias,
        )

    def submit(self, requests: list[SequenceRequest], loop: asyncio.AbstractEventLoop) -> Job:
        """The engine's job for ``requests``; 429 when its queue is full."""
        try:
            return self.engine.submit(requests, loop)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error",
                           code="queue_full") from None


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """A completion's ``prompt`` as a list of prompts (strings or token ids); 400 if there is none."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: give a string, a list of strings or a list of token ids",
                       param="prompt")
    return prompt


def _logit_bias(given: dict[str, float], n_vocab: int) -> dict[int, float]:
    """OpenAI's ``logit_bias`` ({"token id": bias in [-100, 100]}) with integer keys, checked."""
    bias = {}
    for key, value in given.items():
        if not _TOKEN_ID.fullmatch(key) or int(key) >= n_vocab:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0..{n_vocab - 1})",
                           param="logit_bias", code="invalid_value")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: the bias of token {key} is {value}, outside [-100, 100]",
                           param="logit_bias", code="invalid_value")
        bias[int(key)] = value
    return bias


def _token_strs(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id's token as transformers' ``convert_ids_to_tokens`` spells it (as vLLM's
    ``return_token_strs`` does): bytes by GPT-2's printable alphabet ("Ġ" a space), specials as text."""
    table, specials = bytes_to_unicode(), {i: text for text, i in tokenizer.special_tokens.items()}
    return [specials[t] if t in specials else "".join(table[b] for b in tokenizer.decode_bytes([t]))
            for t in ids]


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _chat_prompt(messages: list[ChatMessage], tokenizer: Any, budget: int, max_chars: int) -> str:
    """The transcript of ``gpt2.generation.prompts.Chat`` for ``messages`` (system messages first, then user and
    assistant turns in turn, ending with the user's). Of the earlier turns, only the latest that hold
    at most ``max_chars`` characters can fit; the others are dropped before any is encoded."""
    system = [m.text.strip() for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[-1].role != "user" or any(
        m.role != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)
    ):
        raise APIError(400, "messages: after any system messages, user and assistant messages must "
                       "alternate, starting and ending with a user message", param="messages")
    header = "\n".join(system) + "\n\n" if system else CHAT_HEADER
    pairs = [(turns[i].text.strip(), turns[i + 1].text.strip()) for i in range(0, len(turns) - 1, 2)]
    chars = 0
    for first in range(len(pairs) - 1, -1, -1):
        chars += len(pairs[first][0]) + len(pairs[first][1])
        if chars > max_chars:
            pairs = pairs[first + 1 :]
            break
    return Chat(Transcript(header), turns=pairs).prompt(turns[-1].text, tokenizer, budget)


def _templated_prompt(template: ChatTemplate, messages: list[ChatMessage], tokenizer: Any, budget: int,
                      max_chars: int) -> list[int]:
    """The ids of ``messages`` rendered by ``template`` with its generation prompt, the oldest turns
    dropped until they fit ``budget`` (``gpt2.generation.prompts.fit_messages``); only the latest messages that
    hold at most ``max_chars`` characters (system messages aside) can fit, the others are dropped
    before any is rendered. A template that fails to render them is the request's 400."""
    given = [{"role": m.role, "content": m.text} for m in messages]
    chars, keep = 0, [True] * len(given)
    for i in range(len(given) - 2, -1, -1):
        if given[i]["role"] != "system":
            chars += len(given[i]["content"])
            keep[i] = chars <= max_chars
    try:
        kept = fit_messages(template, [m for m, k in zip(given, keep, strict=True) if k], tokenizer, budget)
        return template.prompt_ids(kept, tokenizer)
    except UserError as e:
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None


# ----------------------------------------------------------------------------------------------------
# Replies in OpenAI's shape: one class per kind of response


def _event_stream(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as e:  # the status line is sent already: report it in the stream
            yield f"data: {json.dumps(_failure(e).payload())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})



class _Reply:
    """What both kinds of reply share: the id, the usage and the loop over the job's steps, whole
    (``whole``) or streamed (``chunks``). A kind says how its choices look (``_choice`` whole,
    ``_chunk_choice`` streamed) and how its logprobs do (``_logprobs``). ``generates`` False: the
    steps are drawn but not answered (nothing generated; the choices end as "length"). A choice the
    engine cuts (``Engine.cut``, at a shutdown's deadline) ends with a step that holds no token and
    finish_reason "abort"."""

    prefix: ClassVar[str]  # of the id
    object: ClassVar[str]  # of the whole response
    chunk_object: ClassVar[str]  # of each streamed chunk

    def __init__(self, job: Job, tokenizer: Any, model: str, prompt_tokens: int) -> None:
        self.job, self.tokenizer, self.prompt_tokens = job, tokenizer, prompt_tokens
        self.head = {"id": f"{self.prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        self.completion_tokens = 0
        self.generates = True

    def usage(self) -> dict[str, int]:
        """Token counts; the n choices of a prompt share it, so it counts once (as OpenAI's do)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def whole(self, is_disconnected: Callable[[], Any]) -> dict[str, Any]:
        """The whole response, once every choice is finished."""
        n = len(self.job.requests)
        texts: list[list[str]] = [[] for _ in range(n)]
        entries: list[list[Entry]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        async for index, step in self.job.steps(is_disconnected):
            self.completion_tokens += self._counts(step)
            texts[index].append(self._text(index, step))
            entries[index] += self._entries(index, step)
            finish[index] = self._finish(step)
        choices = [self._choice(i, "".join(texts[i]), entries[i], finish[i]) for i in range(n)]
        return {**self.head, "object": self.object, "choices": choices, "usage": self.usage()}

    async def chunks(self, include_usage: bool = False) -> AsyncIterator[dict[str, Any]]:
        """The streamed response: the kind's opening chunks, a chunk per step of each choice, then
        the usage if asked for."""
        for choice in self._opening():
            yield self._chunk([choice])
        async for index, step in self.job.steps():
            self.completion_tokens += self._counts(step)
            for choice in self._step_choices(index, step):
                yield self._chunk([choice])
        if include_usage:
            yield {**self._chunk([]), "usage": self.usage()}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.head, "object": self.chunk_object, "choices": choices}

    def _opening(self) -> list[dict[str, Any]]:
        """The choices streamed before the first step."""
        return []

    def _step_choices(self, index: int, step: Step) -> Iterator[dict[str, Any]]:
        """The choices streamed for a step: one, unless it adds nothing."""
        entries, text, finish = self._entries(index, step), self._text(index, step), self._finish(step)
        if text or finish or entries:
            yield self._chunk_choice(index, text, entries, finish)

    def _counts(self, step: Step) -> int:
        """1 if the step is a generated token (not the scoring pass's, not the "abort" of a cut), else 0."""
        return int(self.generates and step.token is not None)

    def _finish(self, step: Step) -> str | None:
        """The finish reason the step gives its choice."""
        if not self.generates and step.finish_reason != "abort":
            return "length"
        return step.finish_reason

    def _text(self, index: int, step: Step) -> str:
        return step.text if self.generates else ""

    def _entries(self, index: int, step: Step) -> list[Entry]:
        """The step's logprob entries: its token's, the end-of-text token's too (its text is "")."""
        return [(step.token, step.logprob, step.top_logprobs)] if self._counts(step) else []

    def _ends_turn(self, index: int, step: Step) -> bool:
        """Whether the step's token is the stop token that ended its choice (not part of the text)."""
        return step.finish_reason == "stop" and step.token in self.job.requests[index].config.stop_token_ids

    def logprobs(self, index: int, entries: list[Entry]) -> Any:
        """The logprobs of choice ``index`` in the kind's shape; None where they were not asked for."""
        if self.job.requests[index].logprobs is None:
            return None
        return self._logprobs(index, entries)

    def _logprobs(self, index: int, entries: list[Entry]) -> dict[str, Any]:
        raise NotImplementedError

    def _choice(self, index: int, text: str, entries: list[Entry], finish: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk_choice(
        self, index: int, text: str, entries: list[Entry], finish: str | None
    ) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionReply(_Reply):
    """OpenAI's text completion: choices of ``text``, logprobs with text offsets, and the prompt
    before the text when ``echo``."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, job: Job, tokenizer: Any, model: str, prompt_tokens: int, *, echo: bool,
                 generates: bool = True) -> None:
        super().__init__(job, tokenizer, model, prompt_tokens)
        self.echo, self.generates = echo, generates
        self.offsets = [0] * len(job.requests)  # text written so far per choice, for text_offset
        self.echoed: set[int] = set()  # the choices whose echo is streamed

    def _echo(self, index: int) -> tuple[str, list[Entry]]:
        """The text and logprob entries that come before the new tokens: the echoed prompt."""
        if not self.echo:
            return "", []
        prompt = self.job.requests[index].prompt
        logprobs = self.job.prompt_logprobs.get(index, [(None, None)] * len(prompt))
        entries = [(t, lp, top) for t, (lp, top) in zip(prompt, logprobs, strict=True)]
        return self.tokenizer.decode(prompt), entries

    def _choice(self, index: int, text: str, entries: list[Entry], finish: str | None) -> dict[str, Any]:
        start, start_entries = self._echo(index)  # after the steps: the prompt's logprobs are known
        return self._chunk_choice(index, start + text, start_entries + entries, finish)

    def _chunk_choice(
        self, index: int, text: str, entries: list[Entry], finish: str | None
    ) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": self.logprobs(index, entries),
                "finish_reason": finish}

    def _step_choices(self, index: int, step: Step) -> Iterator[dict[str, Any]]:
        """The echo comes before a choice's first step."""
        if self.echo and index not in self.echoed:
            self.echoed.add(index)
            yield self._chunk_choice(index, *self._echo(index), None)
        yield from super()._step_choices(index, step)

    def _logprobs(self, index: int, entries: list[Entry]) -> dict[str, Any]:
        """OpenAI's legacy logprobs; the end-of-text token is named "<|endoftext|>" as OpenAI's were
        (its offset is where the text ends)."""
        name = self.tokenizer.decode
        tokens = [name([t]) for t, _, _ in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(token)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {name([b]): v for b, v in top.items()}
                                 for _, _, top in entries],
                "text_offset": offsets}


class _ChatReply(_Reply):
    """OpenAI's chat completion: an assistant ``message`` per choice (streamed as ``delta``s, the first
    naming the role), the reply's leading spaces dropped (only the first with ``one_space``: a chat
    template's reply may start with more), logprobs as ``content`` items."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, job: Job, tokenizer: Any, model: str, prompt_tokens: int, *,
                 one_space: bool = False) -> None:
        super().__init__(job, tokenizer, model, prompt_tokens)
        self.replied = [False] * len(job.requests)  # whether a choice's reply has begun
        self.one_space = one_space

    def _text(self, index: int, step: Step) -> str:
        if self.replied[index]:
            return step.text
        # The model writes "Assistant: reply": the reply starts after the space.
        text = step.text.removeprefix(" ") if self.one_space else step.text.lstrip()
        self.replied[index] = bool(step.text if self.one_space else text)
        return text

    def _entries(self, index: int, step: Step) -> list[Entry]:
        """As OpenAI's chat logprobs, the tokens of the content only: not the stop token."""
        return [] if self._ends_turn(index, step) else super()._entries(index, step)

    def _choice(self, index: int, text: str, entries: list[Entry], finish: str | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs(index, entries), "finish_reason": finish}

    def _chunk_choice(self, index: int, text: str, entries: list[Entry], finish: str | None,
                      first: bool = False) -> dict[str, Any]:
        delta: dict[str, str] = {"role": "assistant", "content": text} if first else {"content": text}
        if finish is not None and not text:
            delta = {}
        return {"index": index, "delta": delta, "logprobs": self.logprobs(index, entries),
                "finish_reason": finish}

    def _opening(self) -> list[dict[str, Any]]:
        """A chunk per choice naming the role."""
        return [self._chunk_choice(i, "", [], None, first=True) for i in range(len(self.job.requests))]

    def _logprobs(self, index: int, entries: list[Entry]) -> dict[str, Any]:
        def item(t: int, lp: float | None) -> dict[str, Any]:
            return {"token": self.tokenizer.decode([t]), "logprob": lp,
                    "bytes": list(self.tokenizer.decode_bytes([t]))}

        return {"content": [{**item(t, lp), "top_logprobs": [item(b, v) for b, v in (top or {}).items()]}
                            for t, lp, top in entries]}
