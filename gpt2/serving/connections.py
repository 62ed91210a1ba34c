"""What slow and idle clients may hold: uvicorn's HTTP/1.1 protocol (h11) with a deadline for a
request's head and a cap on open connections, so that no client holds the server by being slow.

uvicorn closes a kept-alive connection idle for ``timeout_keep_alive`` seconds, but none whose client
is still sending a request's head: a client that sends its headers a byte at a time (slowloris) holds
its connection, and a file descriptor, for as long as it likes, and a thousand such take every
descriptor, /health included. Under ``Limits``:

- a request's head must be whole ``header_timeout`` seconds after its connection opened, or after the
  previous response on it ended; else the connection is closed;
- at most ``max_connections`` are open. A new one over the cap closes the oldest connection that is
  waiting for a request's head (idle or slow: its client has sent no whole request), so that a client
  that sends its request at once, as a load balancer's health check does, is answered however many
  slow ones there are. Only when every connection is running a request is there none to close: then
  up to ``HEALTH_RESERVE`` more are taken that answer /health alone (anything else a 503), and past
  those a new connection gets a 503 at once;
- ``allow_descriptors`` raises the process's limit on open files to what the cap needs, so that the
  cap, not the system, is what turns connections away: the connections, the reserve, and twice
  ``BACKLOG`` (a connection is accepted before it can make room, and the one it closes holds its file
  until the next turn of the event loop; asyncio accepts up to ``BACKLOG`` at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gpt2.serving.errors import APIError
from gpt2.util.errors import UserError

HEALTH_RESERVE = 16  # connections beyond the cap that answer /health alone, once all are running requests
BACKLOG = 1024  # connections the system queues before they are accepted; accepted at most this many at once
SPARE_DESCRIPTORS = 256  # open files beside the connections: the model's, libraries', the listening socket


@dataclass(frozen=True)
class Limits:
    """How long a client may take (seconds) and how many connections may be open at once; errors name
    them as ``gpt2 serve``'s options do."""

    header_timeout: float = 10.0  # from a connection's start, or its last response, to a request's head
    timeout_keep_alive: float = 5.0  # an idle kept-alive connection is closed after this (uvicorn's)
    max_connections: int = 1000

    def __post_init__(self) -> None:
        for name in ("header_timeout", "timeout_keep_alive"):
            value = getattr(self, name)
            if not 0 < value < 86_400:  # NaN too
                raise UserError(f"--{name.replace('_', '-')} must be more than 0 and less than a day "
                                f"(seconds), got {value}")
        if self.max_connections < 1:
            raise UserError(f"--max-connections must be at least 1, got {self.max_connections}")


def protocol(limits: Limits) -> type[H11Protocol]:
    """uvicorn's h11 protocol under ``limits``, for ``uvicorn.Config(http=...)``: a class of its own
    for each server, which tracks that server's connections."""
    return type("LimitedH11Protocol", (LimitedProtocol,), {"limits": limits, "live": {}, "waiting": {}})


def _too_many() -> APIError:
    return APIError(503, "the server has too many connections open (--max-connections) and every one is "
                    "running a request; retry later", type="server_error", code="too_many_connections")


class LimitedProtocol(H11Protocol):
    """uvicorn's ``H11Protocol`` with the deadline for a request's head and the connection cap of the
    module docstring. ``live``: the connections open and not being closed by it; ``waiting``: those of
    them waiting for a request's head, the longest waiting first (dicts, for their order)."""

    limits: ClassVar[Limits]
    live: ClassVar[dict[LimitedProtocol, None]]
    waiting: ClassVar[dict[LimitedProtocol, None]]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_deadline: asyncio.TimerHandle | None = None
        over = len(self.live) + 1 - self.limits.max_connections
        for other in list(itertools.islice(self.waiting, max(over, 0))):  # the longest waiting make room
            other.close()
            over -= 1
        if over > HEALTH_RESERVE:
            self.refuse()
            return
        if over > 0:
            self.app = HealthOnly(self.app)
        self.live[self] = None
        self.await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.forget()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self in self.waiting and self.conn.their_state is not h11.IDLE:  # a request's head is whole
            self.waiting.pop(self, None)
            self.cancel_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        pipelined = self.conn.their_state is not h11.IDLE  # the next request's head is here already
        if self in self.live and not self.transport.is_closing() and not pipelined:
            self.await_head()

    def await_head(self) -> None:
        """Wait for a request's head, for ``header_timeout`` seconds at most, among the connections
        that make room for new ones."""
        self.waiting.pop(self, None)
        self.waiting[self] = None  # the last in line
        self.cancel_deadline()
        self.head_deadline = self.loop.call_later(self.limits.header_timeout, self.close)

    def cancel_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def forget(self) -> None:
        self.live.pop(self, None)
        self.waiting.pop(self, None)
        self.cancel_deadline()

    def close(self) -> None:
        """Close a connection that is waiting for a request's head (no response is due)."""
        self.forget()
        if not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def refuse(self) -> None:
        """Answer 503 before any request is read, and close (every connection is running one)."""
        body = json.dumps(_too_many().payload()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.close()


class HealthOnly:
    """The app of a connection beyond the cap: /health as the app answers it, anything else a 503
    that closes the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        response = _too_many().response()
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def allow_descriptors(limits: Limits) -> None:
    """Raise this process's soft limit on open files to what ``limits`` needs (within its hard limit),
    so that the cap, not the system, turns connections away; a ``UserError`` when the hard limit is
    lower. Nothing to do where there are no such limits (Windows)."""
    if sys.platform == "win32":
        return
    import resource

    needed = limits.max_connections + HEALTH_RESERVE + 2 * BACKLOG + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise UserError(f"--max-connections {limits.max_connections} needs {needed} open files, more than "
                        f"this process may open ({hard}, ulimit -Hn); lower --max-connections or raise "
                        "the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def uvicorn_options(limits: Limits) -> dict[str, Any]:
    """The ``uvicorn.Config`` options that apply ``limits``."""
    return {"http": protocol(limits), "timeout_keep_alive": limits.timeout_keep_alive, "backlog": BACKLOG}
