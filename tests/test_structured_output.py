"""Structured output through the server: every sampled reply follows its JSON schema, regex or choice
(json.loads + jsonschema.validate, re.fullmatch), on /v1/completions and /v1/chat/completions, whole
and streamed; a format that cannot be used is one clear 400.

A tiny random model over GPT-2's real tokenizer serves in a thread (``serving`` in conftest.py); at
temperature 1 it writes near noise, which is what the grammar must hold to its shape. The schemas
bound every string, number and array, so that a reply ends well inside ``max_tokens``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import pytest
import torch
from conftest import assert_openai_error, post, random_model, serving

from gpt2 import GPT2
from gpt2.tokenizer.bpe import Tokenizer

openai = pytest.importorskip("openai")

SEEDS = range(20)
MAX_TOKENS = 160
MESSAGES = [{"role": "user", "content": "Describe a user as JSON."}]
SCHEMAS: dict[str, dict[str, Any]] = {
    "user": {"type": "object", "additionalProperties": False, "required": ["name", "age", "role"],
             "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                            "age": {"type": "integer", "minimum": 0, "maximum": 120},
                            "role": {"enum": ["admin", "user", "guest"]}}},
    "scores": {"type": "array", "minItems": 1, "maxItems": 4,
               "items": {"type": "integer", "minimum": -50, "maximum": 50}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["ok", "point"],
               "properties": {"ok": {"type": "boolean"},
                              "point": {"type": "object", "additionalProperties": False,
                                        "required": ["x", "tags"],
                                        "properties": {"x": {"type": "number", "minimum": -1,
                                                             "maximum": 1, "multipleOf": 0.25},
                                                       "tags": {"type": "array", "maxItems": 2,
                                                                "items": {"type": "string",
                                                                          "maxLength": 4}}}}}},
}


@pytest.fixture(scope="module")
def model(gpt2_tokenizer: Tokenizer) -> GPT2:
    return random_model(gpt2_tokenizer.n_vocab, n_positions=256, tokenizer=gpt2_tokenizer).eval()


@pytest.fixture(scope="module")
def server(model: GPT2) -> Iterator[str]:
    with serving(model, max_batch_size=32) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


def reply(client: openai.OpenAI, chat: bool, seed: int, **options: Any) -> tuple[str, str]:
    """One sampled reply (temperature 1) and its finish reason, from chat or a completion."""
    if chat:
        choice = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                temperature=1.0, seed=seed, **options).choices[0]
        return choice.message.content, choice.finish_reason
    if "response_format" in options:  # not a parameter of the client's legacy completions
        options["extra_body"] = {**options.get("extra_body", {}),
                                 "response_format": options.pop("response_format")}
    done = client.completions.create(model="tiny", prompt="JSON:", max_tokens=MAX_TOKENS, temperature=1.0,
                                     seed=seed, **options).choices[0]
    return done.text, done.finish_reason


def test_every_reply_validates_against_its_schema(client) -> None:
    cases = [(name, seed) for name in SCHEMAS for seed in SEEDS]
    with ThreadPoolExecutor(len(cases)) as pool:  # all at once: the engine batches them
        replies = list(pool.map(lambda case: reply(client, case[1] % 2 == 1, case[1],
                                                   response_format=schema_format(SCHEMAS[case[0]])), cases))
    texts = {}
    for (name, seed), (text, finish) in zip(cases, replies, strict=True):
        assert finish == "stop", (name, seed, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
        texts.setdefault(name, set()).add(text)
    assert all(len(distinct) > 10 for distinct in texts.values()), texts  # really sampled


def test_json_object_replies_are_objects(client, gpt2_tokenizer) -> None:
    # Without a schema an object can go on forever: a bias towards closing it lets it end in time.
    closing = {str(gpt2_tokenizer.encode(c)[0]): 100.0 for c in ('"', "}")}
    for seed in range(4):
        for chat in (False, True):
            text, finish = reply(client, chat, seed, response_format={"type": "json_object"},
                                 logit_bias=closing)
            assert finish == "stop" and isinstance(json.loads(text), dict), text


def test_regex_and_choice_replies_match(client) -> None:
    pattern = r"[a-z]{2,6}-[0-9]{2}( ok)?"
    for seed in range(6):
        text, finish = reply(client, seed % 2 == 1, seed,
                             extra_body={"structured_outputs": {"regex": pattern}})
        assert finish == "stop" and re.fullmatch(pattern, text), text
    choices = ["red", "green", "blue"]
    picked = {reply(client, False, seed, extra_body={"structured_outputs": {"choice": choices}})[0]
              for seed in range(8)}
    assert picked <= set(choices) and len(picked) > 1
    text, _ = reply(client, True, 0, extra_body={"structured_outputs": {"json": SCHEMAS["scores"]}})
    jsonschema.validate(json.loads(text), SCHEMAS["scores"])


def test_streaming_gives_the_same_text(client) -> None:
    settings = dict(model="tiny", max_tokens=MAX_TOKENS, temperature=1.0, seed=5,
                    response_format=schema_format(SCHEMAS["nested"]))
    whole = client.chat.completions.create(messages=MESSAGES, **settings).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, **settings))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    del settings["response_format"]
    extra = {"structured_outputs": {"regex": r"[0-9]{3}\.[0-9]{1,3}"}}
    text = client.completions.create(prompt="x", extra_body=extra, **settings).choices[0].text
    streamed = client.completions.create(prompt="x", extra_body=extra, stream=True, **settings)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_logprobs_are_the_model_s_own(client, model, gpt2_tokenizer) -> None:
    """The mask applies to a copy: the reported log-probabilities are the unconstrained model's."""
    choice = client.completions.create(model="tiny", prompt="Digits:", max_tokens=8, temperature=0,
                                       logprobs=1, extra_body={"structured_outputs": {"regex": "[0-9]{4}"}},
                                       ).choices[0]
    assert re.fullmatch("[0-9]{4}", choice.text)
    prompt = gpt2_tokenizer.encode("Digits:")
    ids = prompt + gpt2_tokenizer.encode(choice.text)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).log_softmax(-1)[0]
    for i, logprob in enumerate(choice.logprobs.token_logprobs):
        assert logprob == pytest.approx(float(expected[len(prompt) - 1 + i, ids[len(prompt) + i]]), abs=1e-4)
    best = max(choice.logprobs.top_logprobs[0].values())  # the model's favourite, allowed or not
    assert best == pytest.approx(float(expected[len(prompt) - 1].max()), abs=1e-4)


@pytest.mark.parametrize(("body", "words"), [
    ({"response_format": schema_format({"type": "nonsense"})}, ["response_format", "Invalid type: nonsense"]),
    ({"response_format": schema_format({"type": "string", "minLength": 5, "maxLength": 2})},
     ["response_format", "Unsatisfiable", "minLength"]),
    ({"response_format": schema_format({"allOf": [{"type": "string"}, {"type": "integer"}]})},
     ["Unsatisfiable"]),
    ({"response_format": {"type": "json_schema"}}, ["response_format", "json_schema"]),
    ({"structured_outputs": {"regex": "(("}}, ["structured_outputs.regex", "unclosed group"]),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, ["exactly one", "regex, choice"]),
    ({"structured_outputs": {"json": "{not json"}}, ["structured_outputs.json", "not valid JSON"]),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, ["not both"]),
    ({"response_format": {"type": "xml"}}, ["response_format"]),
])
def test_a_format_that_cannot_be_used_is_one_clear_400(server, body, words) -> None:
    for path, base in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": MESSAGES})):
        status, payload = post(server, path, {**base, **body})
        assert_openai_error(status, payload, *words)
