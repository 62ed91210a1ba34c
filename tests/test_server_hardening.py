"""The server cannot be stalled or knocked over: work bounded before it starts, every option range
checked, 500s that keep the connection and hide internals, the Host header checked, and a fuzz test
(no body sent to a real server on 127.0.0.1 ever gets a 5xx, and every error is OpenAI's shape).
"""

from __future__ import annotations

import http.client
import json
import math
import random
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import (
    BYTES,
    SAFETY_S,
    assert_one_line_error,
    endless_model,
    random_model,
    run_cli,
    saved_model_dir,
    serving,
)

from gpt2 import GPT2
from gpt2.generation.config import GenerationConfig
from gpt2.serving import Engine
from gpt2.util.errors import UserError

pytest.importorskip("uvicorn")

KEY = "secret-key"
# The longest a /health request may take while a huge one is refused: a stall, not a slow answer on a
# busy machine (about 0.1 s on a quiet one).
STALL_S = 10.0


@pytest.fixture(scope="module")
def model() -> GPT2:
    return endless_model(96)


@pytest.fixture(scope="module")
def server(model: GPT2) -> Iterator[str]:
    with serving(model, max_queue=256) as (url, _):
        yield url


def request(url: str, method: str, path: str, body: bytes | str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """One request over a new http.client connection: the status and the JSON answer."""
    connection = http.client.HTTPConnection(*_address(url), timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json",
                                                              **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def assert_error_shape(payload: object) -> None:
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}, payload
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024


# ----------------------------------------------------------------------------------------------------
# One request cannot stall or exhaust the server


def test_a_huge_request_is_refused_at_once_while_health_answers(server) -> None:
    body = json.dumps({"prompt": ["a"] * 200_000, "max_tokens": 1, "n": 16})
    assert 900_000 < len(body) < 1 << 20
    answer: list[tuple[int, dict]] = []
    peak = [rss_bytes()]
    done = threading.Event()

    def sample_memory() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample_memory)
    sender = threading.Thread(target=lambda: answer.append(request(server, "POST", "/v1/completions", body)))
    before = rss_bytes()
    sampler.start()
    sender.start()
    health_times: list[float] = []
    while not health_times or (sender.is_alive() and len(health_times) < 50):
        start = time.monotonic()
        status, _ = request(server, "GET", "/health")
        health_times.append(time.monotonic() - start)
        assert status == 200
    sender.join(timeout=SAFETY_S)
    done.set()
    sampler.join()
    status, payload = answer[0]
    assert status == 400 and payload["error"]["code"] == "too_many_sequences", payload
    assert "3200000 sequences" in payload["error"]["message"] and "256" in payload["error"]["message"]
    assert max(health_times) < STALL_S, health_times
    assert peak[0] - before < 300 << 20, (before, peak[0])


def test_a_request_that_can_never_fit_the_queue_is_400_not_429(server) -> None:
    status, payload = request(server, "POST", "/v1/completions",
                              json.dumps({"prompt": ["hi"] * 1000, "max_tokens": 1, "n": 16}))
    assert status == 400 and "(prompts x n)" in payload["error"]["message"], payload
    status, payload = request(server, "POST", "/v1/completions",
                              json.dumps({"prompt": ["hi"] * 16, "max_tokens": 1, "n": 16}))
    assert status == 200 and len(payload["choices"]) == 256


def test_a_prompt_too_long_in_characters_is_refused_before_encoding(server) -> None:
    status, payload = request(server, "POST", "/v1/completions", json.dumps({"prompt": "x" * 500_000}))
    assert status == 400 and payload["error"]["code"] == "context_length_exceeded"
    assert "500000 characters" in payload["error"]["message"]
    messages = [{"role": "user", "content": "y" * 500_000}]
    status, payload = request(server, "POST", "/v1/chat/completions", json.dumps({"messages": messages}))
    assert status == 400 and "500000 characters" in payload["error"]["message"]


# ----------------------------------------------------------------------------------------------------
# Every option has a checked range


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ('"temperature": Infinity', "temperature"),
        ('"repetition_penalty": Infinity', "repetition_penalty"),
        ('"top_p": NaN', "top_p"),
        ('"logit_bias": {"5": Infinity}', "logit_bias"),
        ('"seed": 1180591620717411303424', "seed must be an integer in [-2**63, 2**64)"),
        ('"seed": -9223372036854775809', "seed"),
        ('"logit_bias": {"\\u00b2": 1}', "is not a token id"),
        ('"logit_bias": {"' + "9" * 5000 + '": 1}', "is not a token id"),
    ],
)
def test_out_of_range_settings_are_400(server, path, extra, words) -> None:
    start = '"messages": [{"role": "user", "content": "hi"}]'
    if path == "/v1/completions":
        start = '"prompt": "hi"'
    status, payload = request(server, "POST", path, "{" + start + ', "max_tokens": 2, ' + extra + "}")
    assert status == 400, payload
    assert_error_shape(payload)
    assert words in payload["error"]["message"], payload


@pytest.mark.parametrize(
    "settings",
    [{"temperature": math.inf}, {"top_p": math.nan}, {"min_p": -math.inf}, {"repetition_penalty": math.inf},
     {"logit_bias": {3: math.nan}}, {"seed": 2**64}, {"seed": -(2**63) - 1}],
)
def test_generation_config_refuses_non_finite_values_and_wide_seeds(settings) -> None:
    with pytest.raises(UserError):
        GenerationConfig(**settings)
    assert GenerationConfig(seed=2**64 - 1).seed == 2**64 - 1 and GenerationConfig(seed=-(2**63)).seed


@pytest.mark.parametrize(("option", "value"), [("--temperature", "inf"), ("--top-p", "nan"),
                                               ("--seed", str(2**70))])
def test_generate_refuses_non_finite_options_and_wide_seeds(capsys, tmp_path_factory, option, value) -> None:
    directory = saved_model_dir(random_model(n_positions=16, tokenizer=BYTES), tmp_path_factory)
    code, _, err = run_cli(capsys, "generate", "--model", directory, "--prompt", "a", option, value)
    assert_one_line_error(code, err, option.removeprefix("--").replace("-", "_"))


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--port", "99999"], ("--port", "0..65535")),
        (["--max-queue", "0"], ("--max-queue", "positive")),
        (["--max-body-bytes", "-1"], ("--max-body-bytes", "positive")),
        (["--max-prompt-tokens", "0"], ("--max-prompt-tokens", "positive")),
        (["--allowed-hosts", ","], ("--allowed-hosts",)),
        (["--max-prompt-tokens", "5000"], ("max_prompt_tokens", "1..95")),
        (["--max-batch-size", "100000000"], ("GiB",)),
    ],
)
def test_serve_refuses_out_of_range_options(capsys, tmp_path_factory, model, argv, words) -> None:
    directory = saved_model_dir(model, tmp_path_factory)
    code, _, err = run_cli(capsys, "serve", "--model", directory, *argv)
    assert_one_line_error(code, err, *words)


def test_engine_refuses_an_empty_queue(model) -> None:
    with pytest.raises(UserError, match="max_queue must be at least 1"):
        Engine(model, model.tokenizer, max_queue=0)


# ----------------------------------------------------------------------------------------------------
# 500s, the API key and the Host header


def test_a_500_keeps_the_connection_and_names_only_an_error_id(caplog) -> None:
    broken = random_model(n_positions=16, tokenizer=BYTES).eval()
    broken.transformer.wte.weight.data = broken.transformer.wte.weight.data[:10].clone()  # ids >= 10 fail
    with serving(broken) as (url, _):
        connection = http.client.HTTPConnection(*_address(url), timeout=60)
        connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "a", "max_tokens": 2}),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = json.loads(response.read())
        assert response.status == 500 and payload["error"]["type"] == "server_error"
        assert_error_shape(payload)
        assert "error id" in payload["error"]["message"] and "index" not in payload["error"]["message"]
        error_id = payload["error"]["message"].split("error id ")[1].split(";")[0]
        assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
        connection.request("GET", "/health")  # the same keep-alive connection
        assert connection.getresponse().status == 200
        connection.close()


def test_health_is_public_but_shows_counters_only_with_the_key(model) -> None:
    with serving(model, api_key=KEY) as (url, _):
        assert request(url, "GET", "/health") == (200, {"status": "ok"})
        status, payload = request(url, "GET", "/health", headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200 and payload["model"] == "tiny" and "requests" in payload


def test_only_allowed_hosts_are_answered(model) -> None:
    with serving(model) as (url, _):
        port = _address(url)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            assert request(url, "GET", "/health", headers={"Host": host})[0] == 200
        status, payload = request(url, "GET", "/v1/models", headers={"Host": f"evil.example:{port}"})
        assert status == 400 and "--allowed-hosts evil.example" in payload["error"]["message"]
        assert_error_shape(payload)
    with serving(model, allowed_hosts=["*"]) as (url, _):
        assert request(url, "GET", "/v1/models", headers={"Host": "evil.example"})[0] == 200


# ----------------------------------------------------------------------------------------------------
# Fuzzing


def _fuzz_value(rng: random.Random, depth: int = 0) -> object:
    """A random JSON value, often hostile."""
    choices = [
        lambda: rng.choice([0, -1, 1, 2**31, 2**64, 2**70, -(2**70), 10**30]),
        lambda: rng.choice([0.0, -0.5, 1e308, -1e308, 1e-320, 0.7, math.inf, -math.inf, math.nan]),
        lambda: rng.choice(["", "a", "²", "\u0000", "😀" * 3, "<|endoftext|>", "9" * 50, " "]),
        lambda: rng.choice([True, False, None]),
        lambda: [_fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))] if depth < 3 else [],
        lambda: {rng.choice(["", "²", "5", "-1", "x", "😀"]): _fuzz_value(rng, depth + 1)
                 for _ in range(rng.randrange(3))} if depth < 3 else {},
    ]
    return rng.choice(choices)()


FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "n", "stream", "stop", "seed", "frequency_penalty", "presence_penalty", "logit_bias",
          "repetition_penalty", "logprobs", "top_logprobs", "echo", "model", "stream_options"]


def _fuzz_body(rng: random.Random, chat: bool) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:
        depth = rng.choice([10, 1000, 100_000])
        return ("[" * depth + "]" * depth).encode()
    body: dict[str, object] = (
        {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    )
    body["max_tokens"] = 2
    for _ in range(rng.randrange(1, 5)):
        body[rng.choice(FIELDS)] = _fuzz_value(rng)
    if kind == 2:
        body["messages"] = rng.choice([[], [{"role": "bot"}], [{"role": "user", "content": [{"type": 1}]}],
                                       [{"role": "assistant", "content": "x"}], "hi"])
    if kind == 3:
        body["n"], body["max_tokens"] = rng.choice([(16, 10**9), (10**9, 1), (-1, -1)])
    return json.dumps(body).encode()


def test_fuzzed_bodies_never_get_a_5xx(server) -> None:
    rng = random.Random(1234)
    start = time.process_time()  # of the client and the server in its thread: what the bodies cost
    connection = http.client.HTTPConnection(*_address(server), timeout=30)
    statuses: dict[int, int] = {}
    for i in range(300):
        chat = i % 2 == 1
        body = _fuzz_body(rng, chat)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        statuses[response.status] = statuses.get(response.status, 0) + 1
        assert response.status < 500, (body[:300], raw[:300])
        if response.status >= 400:
            assert_error_shape(json.loads(raw))
        if response.getheader("connection") == "close":
            connection.close()
            connection = http.client.HTTPConnection(*_address(server), timeout=30)
    connection.close()
    assert statuses.get(200, 0) > 10 and sum(v for k, v in statuses.items() if k >= 400) > 100, statuses
    assert time.process_time() - start < 60  # CPU seconds (about 1 s); a body that hangs times out
