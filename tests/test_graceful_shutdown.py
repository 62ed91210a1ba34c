"""Graceful shutdown, with a real signal to a real ``gpt2 serve`` process: once it has the signal,
new requests get 503 in OpenAI's error shape (on new and kept-alive connections, /health too), the
running ones finish within ``--drain-seconds`` or are cut with finish_reason "abort" (a stream's last
event, then ``[DONE]``), and the process exits with status 0."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SAFETY_S,
    assert_one_line_error,
    endless_model,
    run_cli,
    saved_model_dir,
    serve_process,
    wait_for,
)

pytest.importorskip("uvicorn")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

WINDOW = 4096  # long enough for generations that outlast the checks made while they run
# A cut server exits at once (its cut replies flushed within 5 s, its connections closed within 5 s):
# well within this bound, on a loaded machine too, and well short of the 60 s drains it cuts short.
EXIT_S = 45


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_model_dir(endless_model(WINDOW), tmp_path_factory)


@contextlib.contextmanager
def serve(model_dir: Path, *options: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A ``gpt2 serve`` process on a free port (4 slots unless ``options`` say otherwise), once it
    answers; yields it and its port."""
    command = [sys.executable, "-m", "gpt2", "serve", "--model", model_dir, "--max-batch-size", "4", *options]
    process, port = serve_process(command)
    try:
        def up() -> bool:
            assert process.poll() is None, process.communicate()[1]
            with contextlib.suppress(OSError):
                return request(port, "GET", "/health")[0] == 200
            return False

        wait_for(up, "gpt2 serve to answer")
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def request(port: int, method: str, path: str, body: dict[str, Any] | None = None,
            connection: http.client.HTTPConnection | None = None) -> tuple[int, Any, dict[str, str]]:
    """One request (over ``connection`` if given, else a new one): the status, JSON and headers."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=SAFETY_S)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.getheaders()}
    finally:
        if connection is None:
            conn.close()


def stream(port: int, body: dict[str, Any]) -> list[str]:
    """The data of each server-sent event of a streamed completion, in order."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=SAFETY_S)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        return [line[len(b"data: "):].decode().strip() for line in response if line.startswith(b"data: ")]
    finally:
        conn.close()


class Unfinished:
    """A completion whose body is not all sent: the server asked for it (``100 Continue``: the request
    is counted among those being answered), and answers it once ``finish`` sends the rest. Until then
    a drain cannot end, whatever the time the test's checks take."""

    def __init__(self, port: int, body: dict[str, Any]) -> None:
        self.data = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SAFETY_S)
        self.sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(self.data)}\r\n"
                          "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):  # read no further: the answer comes after the body
            byte = self.sock.recv(1)
            assert byte, interim
            interim += byte
        assert interim.startswith(b"HTTP/1.1 100 "), interim

    def finish(self) -> tuple[int, Any]:
        """Send the rest of the body; the status and JSON of the answer."""
        try:
            self.sock.sendall(self.data)
            response = http.client.HTTPResponse(self.sock)
            response.begin()
            return response.status, json.loads(response.read())
        finally:
            self.sock.close()


def running(port: int, sequences: int, waiting: int = 0) -> None:
    """Wait until the engine has ``sequences`` sequences running and ``waiting`` waiting."""
    def busy() -> bool:
        load = request(port, "GET", "/health")[1]
        return load["running"] == sequences and load["waiting"] == waiting

    wait_for(busy, f"{sequences} sequences to run")


def assert_refused(status: int, payload: Any, headers: dict[str, str]) -> None:
    """A 503 in OpenAI's error shape that closes its connection."""
    assert status == 503
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["code"] == "server_shutting_down"
    assert "shutting down" in payload["error"]["message"]
    assert headers["connection"] == "close"


def finish_reason(events: list[str]) -> str:
    """The stream's last finish reason, once it is known to end with ``[DONE]``."""
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert all(r is None for r in reasons[:-1])
    return reasons[-1]


def start(pool: ThreadPoolExecutor, port: int, max_tokens: int) -> tuple[Future, Future]:
    """A streamed and a whole completion of ``max_tokens`` tokens, under way, in that order (the
    stream is running before the whole one is sent, so with one slot the whole one waits)."""
    body = {"prompt": "Hi", "max_tokens": max_tokens, "temperature": 1.0, "seed": 0}
    streamed = pool.submit(stream, port, body)
    wait_for(lambda: request(port, "GET", "/health")[1]["running"] >= 1, "the stream to run")
    return streamed, pool.submit(request, port, "POST", "/v1/completions", body)


@pytest.mark.parametrize("seconds", ["-1", "nan"])
def test_serve_refuses_a_drain_of_no_length(capsys: pytest.CaptureFixture, model_dir: Path,
                                            seconds: str) -> None:
    code, _, err = run_cli(capsys, "serve", "--model", model_dir, "--drain-seconds", seconds)
    assert_one_line_error(code, err, "--drain-seconds must be 0 or more")


def test_running_requests_finish_while_new_ones_get_503(model_dir: Path) -> None:
    with serve(model_dir, "--drain-seconds", "60") as (process, port), ThreadPoolExecutor(2) as pool:
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=SAFETY_S)
        assert request(port, "GET", "/v1/models", connection=kept)[0] == 200
        streamed, whole = start(pool, port, 2000)
        running(port, 2)
        unfinished = Unfinished(port, {"prompt": "Hi", "max_tokens": 3})  # the drain lasts until it ends
        os.kill(process.pid, signal.SIGTERM)
        wait_for(lambda: request(port, "GET", "/v1/models")[0] == 503, "the server to refuse requests")
        assert_refused(*request(port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}))
        assert_refused(*request(port, "GET", "/health"))
        # http.client does not reconnect: the kept-alive connection itself gets the 503, then closes
        assert_refused(*request(port, "GET", "/v1/models", connection=kept))
        assert kept.sock is None
        status, payload = unfinished.finish()  # sent before the signal, it is answered in full
        assert status == 200 and payload["choices"][0]["finish_reason"] == "length"
        assert payload["usage"]["completion_tokens"] == 3
        assert finish_reason(streamed.result()) == "length"
        status, payload, _ = whole.result()
        assert status == 200 and payload["choices"][0]["finish_reason"] == "length"
        assert payload["usage"]["completion_tokens"] == 2000
        assert process.wait(timeout=SAFETY_S) == 0
        assert "SIGTERM: shutting down" in process.communicate()[1]


def test_requests_still_running_at_the_deadline_are_cut(model_dir: Path) -> None:
    with serve(model_dir, "--drain-seconds", "1") as (process, port), ThreadPoolExecutor(2) as pool:
        streamed, whole = start(pool, port, WINDOW - 2)  # far longer than the drain
        running(port, 2)
        os.kill(process.pid, signal.SIGTERM)
        signalled = time.monotonic()
        events = streamed.result()
        assert time.monotonic() - signalled > 0.9  # not cut before the deadline
        assert finish_reason(events) == "abort"
        status, payload, _ = whole.result()
        assert status == 200 and payload["choices"][0]["finish_reason"] == "abort"
        assert 0 < payload["usage"]["completion_tokens"] < WINDOW - 2
        assert process.wait(timeout=SAFETY_S) == 0
        assert time.monotonic() - signalled < EXIT_S


def test_a_second_signal_cuts_at_once(model_dir: Path) -> None:
    with (serve(model_dir, "--drain-seconds", "60", "--max-batch-size", "1") as (process, port),
          ThreadPoolExecutor(2) as pool):
        streamed, whole = start(pool, port, WINDOW - 2)
        running(port, 1, waiting=1)  # the whole completion waits for the one slot
        os.kill(process.pid, signal.SIGTERM)
        wait_for(lambda: request(port, "GET", "/v1/models")[0] == 503, "the drain to begin")
        os.kill(process.pid, signal.SIGINT)
        signalled = time.monotonic()
        assert finish_reason(streamed.result()) == "abort"
        status, payload, _ = whole.result()
        assert status == 200 and payload["choices"][0] == {"index": 0, "text": "", "logprobs": None,
                                                           "finish_reason": "abort"}
        assert payload["usage"]["completion_tokens"] == 0
        assert process.wait(timeout=SAFETY_S) == 0
        assert time.monotonic() - signalled < EXIT_S  # not the 60 s of the drain
        assert "SIGINT again: cutting" in process.communicate()[1]
