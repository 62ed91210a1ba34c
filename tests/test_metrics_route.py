"""``GET /metrics``: Prometheus' text format (parsed by prometheus_client's own parser), counters that
move by exactly the requests sent and the usage their replies report, histograms that count each request
and token, gauges read from the engine at scrape time, one registry per app, and the API key.

A tiny random model over bytes that never ends a text by itself (``endless_model``) serves on 127.0.0.1
in a thread (``serving`` in conftest.py).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest
from conftest import SAFETY_S, Hold, endless_model, serving, serving_app, wait_for

from gpt2 import GPT2

openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

KEY = "metrics-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def model() -> GPT2:
    return endless_model(96)


@pytest.fixture(scope="module")
def server(model: GPT2) -> Iterator[str]:
    with serving(model, api_key=KEY) as (url, _):
        yield url


def request(url: str, method: str, path: str, body: object = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """The status, headers and text of one request (a JSON body when given)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    data = None if body is None else json.dumps(body)
    headers = {"Content-Type": "application/json", **(headers or {})}
    connection.request(method, path, body=data, headers=headers)
    response = connection.getresponse()
    status, got, text = response.status, dict(response.getheaders()), response.read().decode()
    connection.close()
    return status, got, text


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of /metrics, by sample name and labels, parsed by prometheus_client."""
    status, _, text = request(url, "GET", "/metrics", headers=AUTH if headers is None else headers)
    assert status == 200, text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_the_text_parses_into_every_metric_with_its_type(server) -> None:
    status, headers, text = request(server, "GET", "/metrics", headers=AUTH)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    types = {f.name: f.type for f in parser.text_string_to_metric_families(text)}
    expected = {
        "gpt2_requests": "counter", "gpt2_prompt_tokens": "counter", "gpt2_generation_tokens": "counter",
        "gpt2_time_to_first_token_seconds": "histogram", "gpt2_inter_token_latency_seconds": "histogram",
        "gpt2_e2e_request_latency_seconds": "histogram", "gpt2_num_requests_running": "gauge",
        "gpt2_num_requests_waiting": "gauge", "gpt2_kv_cache_positions_in_use": "gauge",
        "gpt2_kv_cache_positions": "gauge", "gpt2_forward_passes": "counter",
    }
    assert {name: types.get(name) for name in expected} == expected
    assert value(scrape(server), "gpt2_kv_cache_positions") == 8 * 96  # slots x window


def test_counters_and_histograms_move_by_exactly_the_requests_sent(server) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)
    before = scrape(server)
    usages, sequences = [], 0
    whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, n=2, temperature=0)
    usages.append(whole.usage)
    sequences += 2
    stream = client.completions.create(model="tiny", prompt="abc", max_tokens=4, stream=True,
                                       stream_options={"include_usage": True})
    usages += [chunk.usage for chunk in stream if chunk.usage is not None]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6)
    usages.append(chat.usage)
    chat_stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Yo"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True})
    usages += [chunk.usage for chunk in chat_stream if chunk.usage is not None]
    sequences += 3
    status, _, _ = request(server, "POST", "/v1/completions",
                           {"model": "tiny", "prompt": "x", "max_tokens": "five"}, AUTH)
    assert status == 400 and len(usages) == 4
    after = scrape(server)

    requests = "gpt2_requests_total"
    assert moved(before, after, requests, route="/v1/completions", status="200") == 2
    assert moved(before, after, requests, route="/v1/completions", status="400") == 1
    assert moved(before, after, requests, route="/v1/chat/completions", status="200") == 2
    assert moved(before, after, requests, route="/metrics", status="200") == 1  # the first scrape
    prompt, completion = sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)
    assert moved(before, after, "gpt2_prompt_tokens_total") == prompt
    assert moved(before, after, "gpt2_generation_tokens_total") == completion
    assert completion == 2 * 5 + 4 + chat.usage.completion_tokens + usages[-1].completion_tokens
    for name in ("gpt2_time_to_first_token_seconds", "gpt2_e2e_request_latency_seconds"):
        assert moved(before, after, f"{name}_count") == 4  # the four that generated; not the 400
        assert moved(before, after, f"{name}_sum") > 0
        assert moved(before, after, f"{name}_bucket", le="+Inf") == 4
    # every token of a sequence but its first comes some time after the one before it
    assert moved(before, after, "gpt2_inter_token_latency_seconds_count") == completion - sequences
    assert moved(before, after, "gpt2_forward_passes_total") > 0


def test_the_key_is_required_and_unknown_paths_are_one_series(server) -> None:
    before = scrape(server)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, _, text = request(server, "GET", "/metrics", headers=headers)
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    assert request(server, "GET", "/no/such/path", headers=AUTH)[0] == 404
    assert request(server, "GET", "/other/path", headers=AUTH)[0] == 404
    after = scrape(server)
    assert moved(before, after, "gpt2_requests_total", route="/metrics", status="401") == 2
    assert moved(before, after, "gpt2_requests_total", route="other", status="404") == 2
    assert not any(dict(labels).get("route", "").startswith("/no") for _, labels in after)


def test_public_metrics_gauges_and_a_registry_per_app(server, model) -> None:
    # a completion of the module's server of its own, so that the test does not need the others before it
    assert request(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, AUTH)[0] == 200
    with serving_app(model, api_key=KEY, public_metrics=True) as (url, app), Hold(model) as hold:
        engine = app.state.engine
        assert request(url, "GET", "/v1/models")[0] == 401  # the rest still needs the key
        fresh = scrape(url, headers={})  # no key needed
        assert value(fresh, "gpt2_requests_total", route="/v1/completions", status="200") == 0
        assert value(scrape(server), "gpt2_requests_total", route="/v1/completions", status="200") > 0
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=SAFETY_S)
        stream = client.completions.create(model="tiny", prompt="abcdef", max_tokens=80, stream=True)
        hold.wait()
        hold.allow(1)
        hold.wait()  # generating now: its first token out, held before its second
        busy = scrape(url, headers={})
        assert value(busy, "gpt2_num_requests_running") == 1
        assert value(busy, "gpt2_num_requests_waiting") == 0
        assert 6 <= value(busy, "gpt2_kv_cache_positions_in_use") <= 6 + 80
        stream.close()
        wait_for(lambda: app.state.shutdown.running == 0, "the stream's end (its job cancelled)")
        hold.release()
        wait_for(lambda: engine.load()["running"] == 0, "the slot to be freed")
        idle = scrape(url, headers={})
        assert value(idle, "gpt2_num_requests_running") == 0
        assert value(idle, "gpt2_kv_cache_positions_in_use") == 0
        assert value(idle, "gpt2_sequences_cancelled_total") == 1
