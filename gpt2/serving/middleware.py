"""The ASGI middleware around the routes: what is refused before a body is read, and the graceful
shutdown.

``Guard``: what is public when an API key is set. ``/health`` answers ``{"status": "ok"}`` to anyone
(for load balancers) and its model name and counters only with the key; ``/`` is the playground page,
which holds nothing secret (the model's name and window; the key is typed into it by its user).
Everything under /v1, and ``KEYED_PATHS`` and /metrics, need the key (/metrics not with
``public_metrics``). Requests whose ``Host`` header names a host not in the allowed hosts
(``LOCAL_HOSTS`` by default) are refused (400), so a web page cannot reach a server on 127.0.0.1 by
DNS rebinding. An unexpected exception is a 500 that keeps the connection open.

``Shutdown`` and its middleware ``Draining`` (begun by ``gpt2 serve`` on SIGTERM or SIGINT): every new
request, on a new connection or a kept-alive one, /health too (so that load balancers stop sending
any), gets 503 (``server_shutting_down``, the connection closed after it); the requests running get
until the drain's deadline to finish, then each unfinished choice ends with finish_reason "abort"
(vLLM's name for a request the server ended; OpenAI's API has none): a whole reply returns what was
generated, a stream sends that last chunk, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Sequence

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2.serving.engine import Engine
from gpt2.serving.errors import APIError, failure
from gpt2.serving.metrics import Metrics

# Beside /v1/... and /metrics, the routes that need the API key.
KEYED_PATHS = ("/tokenize", "/detokenize", "/inspect")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the Host headers served by default ("*": any)
log = logging.getLogger("gpt2.serving")


def has_key(api_key: str | None, headers: dict[bytes, bytes]) -> bool:
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
                 metrics: Metrics | None = None, public_metrics: bool = False) -> None:
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
        if keyed and not has_key(self.api_key, headers):
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
            await failure(e).response()(scope, receive, sending)

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
