"""Speculative decoding in the server: greedy replies identical to a server without drafts, for
concurrent requests mixing drafted and plain ones (streamed or not, prompts of different lengths, stop
strings, penalties, log-probabilities, n, chat and structured output) decoded together; the usage and
metrics that report the drafts; every bad input a clear 400 or a one-line error of ``gpt2 serve``.

A tiny random model over bytes serves in a thread (``serving`` in conftest.py), once plainly and once
with prompt lookup drafting; its end-of-text logit is far down, so every length is known
(``endless_model``), and, random, it repeats itself a lot, so that lookup drafts are often right.
Concurrency is made deterministic by holding the engine (``Hold``) until every request is queued.
"""

from __future__ import annotations

import http.client
import re
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from conftest import (
    BYTES,
    SAFETY_S,
    Hold,
    assert_one_line_error,
    assert_openai_error,
    endless_model,
    post,
    random_model,
    run_cli,
    serve_process,
    serving,
    wait_for,
)

from gpt2 import GPT2
from gpt2.config import GPT2Config
from gpt2.generation.config import GenerationConfig
from gpt2.generation.sampling import generate_text
from gpt2.generation.speculative import PromptLookup
from gpt2.serving import Engine
from gpt2.serving.batch_cache import BatchCache

openai = pytest.importorskip("openai")

WINDOW = 96
DRAFT_TOKENS = 6


@pytest.fixture(scope="module")
def model() -> GPT2:
    return endless_model(WINDOW)


@pytest.fixture(scope="module")
def plain(model: GPT2) -> Iterator[tuple[str, Engine]]:
    with serving(model, max_batch_size=20) as s:
        yield s


@pytest.fixture(scope="module")
def spec(model: GPT2) -> Iterator[tuple[str, Engine]]:
    with serving(model, max_batch_size=20, draft=PromptLookup(DRAFT_TOKENS)) as s:
        yield s


def client_of(server: tuple[str, Engine]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=SAFETY_S)


def greedy(model: GPT2, prompt: str, n: int) -> str:
    return generate_text(model, BYTES, prompt, GenerationConfig(temperature=0, max_new_tokens=n))[0]


# ----------------------------------------------------------------------------------------------------
# Greedy replies are the plain server's


def cases(model: GPT2) -> list[dict[str, Any]]:
    """16 requests (17 sequences): completions and chats, whole and streamed, drafted (the server's
    number, or fewer) and plain (``draft_tokens`` 0), of prompts from 1 to 66 bytes that repeat
    themselves (their starts all differ: read together, none waits for another's prefix); stop strings
    taken from the middle of the greedy text, so that they end a reply mid-draft; penalties,
    log-probabilities, n = 2 and a regex."""
    words = ["ab ", "the cat ", "to be or not ", "la la ", "one two three ", "hello ", "abc abd ", "xyz"]
    out: list[dict[str, Any]] = []
    for i in range(16):
        word = words[i % len(words)]
        prompt = f"{i}:" + (word * 12)[: 4 + (i * 17) % 60]
        out.append({"prompt": prompt, "max_tokens": 30, "temperature": 0})
    out[14]["prompt"] = "x"
    out[1]["stream"] = out[3]["stream"] = out[6]["stream"] = out[12]["stream"] = True
    out[2]["draft_tokens"] = out[10]["draft_tokens"] = 0  # plain, beside the drafted ones
    out[3]["draft_tokens"] = 2
    for i in (1, 3, 4):  # a stop string from the middle of the greedy reply
        text = greedy(model, out[i]["prompt"], 30)
        out[i]["stop"] = [text[12:14]]
    out[5]["frequency_penalty"] = 0.7
    out[6]["repetition_penalty"] = 1.3
    out[7]["logprobs"] = 2
    out[8]["n"] = 2
    for i in (9, 10):  # the plain transcript (this model has no chat template) takes most of the window
        out[i].update(chat=True, prompt=f"{i}: hello hello", max_tokens=20)
    out[13]["prompt"] = "13:" + "la la la " * 7  # 66 bytes: 30 more fill the window
    out[11]["structured_outputs"] = {"regex": "(ab |abc )+abd"}
    out[12]["presence_penalty"] = 0.5
    out[15]["logit_bias"] = {str(ord("a")): 3.0}
    return out


def ask(client: openai.OpenAI, case: dict[str, Any], drafts: bool) -> list[tuple[str, str | None, Any]]:
    """Each choice's text, finish reason and log-probabilities."""
    case = dict(case)
    chat, stream = case.pop("chat", False), case.pop("stream", False)
    extra = {k: case.pop(k) for k in ("draft_tokens", "structured_outputs", "repetition_penalty")
             if k in case}
    if not drafts:
        extra.pop("draft_tokens", None)
    if chat:
        prompt = case.pop("prompt")
        system = prompt.split(":")[0]  # the requests' own, so that their transcripts start apart
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        reply = client.chat.completions.create(model="tiny", messages=messages, stream=stream,
                                               extra_body=extra, **case)
    else:
        reply = client.completions.create(model="tiny", stream=stream, extra_body=extra, **case)
    if not stream:
        return [((c.message.content if chat else c.text), c.finish_reason,
                 None if c.logprobs is None else c.logprobs.token_logprobs) for c in reply.choices]
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for chunk in reply:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + ((c.delta.content or "") if chat else c.text)
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return [(texts[i], finish[i], None) for i in sorted(texts)]


def test_greedy_replies_are_the_plain_server_s(model, plain, spec) -> None:
    requests = cases(model)
    with ThreadPoolExecutor(len(requests)) as pool:
        expected = list(pool.map(lambda case: ask(client_of(plain), case, False), requests))
    _, engine = spec
    before = dict(engine.load())
    client = client_of(spec)
    # All 16 join the engine's batch together: it is held at the first one's prompt until the others wait.
    with ThreadPoolExecutor(len(requests)) as pool, Hold(model) as hold:
        first = pool.submit(ask, client, requests[0], True)
        hold.wait()
        rest = [pool.submit(ask, client, case, True) for case in requests[1:]]
        wait_for(lambda: engine.load()["waiting"] == 16, "the other requests (16 sequences) to be queued")
        hold.release()
        got = [first.result(SAFETY_S)] + [f.result(SAFETY_S) for f in rest]
    after = engine.load()
    for case, mine, theirs in zip(requests, got, expected, strict=True):
        for (text, finish, logprobs), (text0, finish0, logprobs0) in zip(mine, theirs, strict=True):
            assert (text, finish) == (text0, finish0), case
            if logprobs0 is not None:
                assert logprobs == pytest.approx(logprobs0, abs=1e-4)
    assert [got[i][0][1] for i in (1, 3, 4)] == ["stop"] * 3  # stopped by the stop strings
    assert re.fullmatch("(ab |abc )+abd", got[11][0][0])
    assert greedy(model, "x", 30) == got[14][0][0]
    assert after["max_batch"] == 17
    drafted = after["draft_tokens"] - before["draft_tokens"]
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    assert 0 < accepted < drafted


def test_streaming_with_drafts_is_the_reply_without(spec) -> None:
    client = client_of(spec)
    for chat in (False, True):
        prompt = "one two one two one"
        case = {"prompt": prompt, "max_tokens": 20 if chat else 40, "temperature": 0, "chat": chat}
        (streamed,) = ask(client, {**case, "stream": True}, True)
        (whole,) = ask(client, {**case, "draft_tokens": 0}, True)
        assert streamed[:2] == whole[:2]


# ----------------------------------------------------------------------------------------------------
# Usage and metrics


def spec_counters(url: str) -> dict[str, float]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return {name: float(value) for name, value in re.findall(r"^(gpt2_spec_decode_\w+) (\S+)$", text, re.M)}


def test_usage_and_metrics_report_the_drafts(plain, spec) -> None:
    client = client_of(spec)
    settings = {"model": "tiny", "prompt": "la la la la la la", "max_tokens": 40, "temperature": 0}
    before, passes = spec_counters(spec[0]), spec[1].load()["forward_passes"]
    whole = client.completions.create(**settings)
    after, passes = spec_counters(spec[0]), spec[1].load()["forward_passes"] - passes
    assert passes < 40, f"{passes} forward passes for 40 tokens: the drafts saved none"
    details = whole.usage.completion_tokens_details
    accepted, rejected = details.accepted_prediction_tokens, details.rejected_prediction_tokens
    assert accepted > 0 and rejected >= 0 and whole.usage.completion_tokens == 40
    assert after["gpt2_spec_decode_num_accepted_tokens_total"] - \
        before["gpt2_spec_decode_num_accepted_tokens_total"] == accepted
    assert after["gpt2_spec_decode_num_draft_tokens_total"] - \
        before["gpt2_spec_decode_num_draft_tokens_total"] == accepted + rejected
    assert after["gpt2_spec_decode_num_drafts_total"] > before["gpt2_spec_decode_num_drafts_total"]
    usage = {"include_usage": True}
    streamed = list(client.completions.create(**settings, stream=True, stream_options=usage))
    assert streamed[-1].usage.completion_tokens_details == details  # the same drafts, step by step
    off = client.completions.create(**settings, extra_body={"draft_tokens": 0})
    assert off.usage.completion_tokens_details is None and off.choices[0].text == whole.choices[0].text
    assert client_of(plain).completions.create(**settings).usage.completion_tokens_details is None
    assert spec_counters(plain[0]) == {}  # a server that does not draft has no such counters


# ----------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(("value", "words"), [
    (DRAFT_TOKENS + 1, [f"--draft-tokens {DRAFT_TOKENS}", "draft_tokens"]),
    (-1, ["draft_tokens", "greater than or equal to 0"]),
    (1.5, ["draft_tokens", "integer"]),
    ("3", ["draft_tokens", "integer"]),
    (True, ["draft_tokens", "integer"]),
])
def test_bad_draft_tokens_are_400(spec, value, words) -> None:
    body = {"model": "tiny", "prompt": "ab ab", "max_tokens": 3, "draft_tokens": value}
    for path, request in (("/v1/completions", body),
                          ("/v1/chat/completions", {**body, "prompt": None,
                                                    "messages": [{"role": "user", "content": "ab"}]})):
        request = {k: v for k, v in request.items() if v is not None}
        assert_openai_error(*post(spec[0], path, request), *words)


def test_draft_tokens_need_a_drafting_server(plain) -> None:
    body = {"model": "tiny", "prompt": "ab ab", "max_tokens": 3, "draft_tokens": 2}
    assert_openai_error(*post(plain[0], "/v1/completions", body), "draft_tokens", "--draft")
    assert post(plain[0], "/v1/completions", {**body, "draft_tokens": None})[0] == 200


def test_serve_refuses_bad_drafts_in_one_line(model, tmp_path, capsys) -> None:
    served = tmp_path / "model"
    model.save_pretrained(served)
    other = tmp_path / "other-vocabulary"
    random_model(300, tokenizer=BYTES).save_pretrained(other)
    for options, words in [(["--draft-tokens", "3"], ["--draft-tokens needs --draft"]),
                           (["--draft", "lookup", "--draft-tokens", "0"], ["1 to 64", "--draft-tokens"]),
                           (["--draft", other], ["vocabulary", "257", "300"]),
                           (["--draft", tmp_path / "missing"], ["missing"])]:
        assert_one_line_error(*run_cli(capsys, "serve", "--model", served, *options)[::2], *words)


def test_gpt2_serve_with_a_draft_model(model, tmp_path) -> None:
    """A draft model through the command: loaded beside the model (a larger one is a warning), its
    drafts verified to the model's own greedy text."""
    served, draft = tmp_path / "model", tmp_path / "draft"
    model.save_pretrained(served)
    random_model(n_layer=3, n_head=1, n_embd=64, n_positions=WINDOW, tokenizer=BYTES).save_pretrained(draft)
    process, port = serve_process([sys.executable, "-m", "gpt2", "serve", "--model", served, "--draft", draft,
                                   "--draft-tokens", "4"])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=SAFETY_S)

        def up() -> bool:
            assert process.poll() is None, process.stderr.read()
            try:
                return bool(client.models.list().data)
            except openai.APIConnectionError:
                return False

        wait_for(up, "gpt2 serve to answer")
        reply = client.completions.create(model="model", prompt="abc abc abc", max_tokens=20, temperature=0)
        assert reply.choices[0].text == greedy(model, "abc abc abc", 20)
        details = reply.usage.completion_tokens_details
        assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0
    finally:
        process.terminate()
        _, err = process.communicate(timeout=SAFETY_S)
    assert "warning: the draft model" in err and "slower" in err, err
    assert f"drafts by {draft} (4 tokens a step)" in err, err


# ----------------------------------------------------------------------------------------------------
# The cache's operations


def test_batch_cache_forgets_trims_and_compacts_rows() -> None:
    config = GPT2Config(vocab_size=8, n_positions=8, n_embd=2, n_layer=1, n_head=1)
    cache = BatchCache(config, 2, padded=True)
    # row 0: real at 0..5; row 1: padding at 0..1, real at 2..5; each position's key is its index
    cache.key_mask[:, :6] = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    cache.next_position[:2] = torch.tensor([6, 4])
    cache.keys[0][:2, 0, :6, 0] = torch.arange(6.0)
    cache.length = 6
    cache.forget_last([1, 3])  # row 0 loses position 5, row 1 positions 3..5
    assert cache.next_position[:2].tolist() == [5, 1]
    cache.trim(2)
    assert cache.length == 5  # position 5 held nothing any more
    cache.forget_last([0, 0])
    cache.key_mask[0, 2] = False  # a hole in row 0 too: 0, 1, 3, 4 real
    cache.compact(2)
    assert cache.length == 4
    assert cache.key_mask[:2, :4].tolist() == [[True] * 4, [False, False, False, True]]
    assert cache.keys[0][0, 0, :4, 0].tolist() == [0.0, 1.0, 3.0, 4.0]
    assert cache.keys[0][1, 0, 3, 0].item() == 2.0
    assert cache.next_position[:2].tolist() == [5, 1]  # positions are the tokens', not the axis's
