"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: their shapes, agreement with transformers' tokenizer
of the same files and with what the chat route reads, the API key, and every bad body a clear 4xx.

A tiny random model over bytes (``random_model``: every byte a token, ``<|endoftext|>`` 256, a 128-token
window) serves on 127.0.0.1 in a thread (``serving`` in conftest.py).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BYTES, random_model, serving

from gpt2 import GPT2
from gpt2.tokenizer.chat_template import GPT2_CHAT_TEMPLATE, ChatTemplate

pytest.importorskip("uvicorn")

KEY = "tokenize-key"
WINDOW = 128  # the messages fit whole
TEXT = "Hi there,  café 😀<|endoftext|>\nnext"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def model() -> GPT2:
    return random_model(n_positions=WINDOW, tokenizer=BYTES).eval()


@pytest.fixture(scope="module")
def server(model: GPT2) -> Iterator[str]:
    with serving(model) as (url, _):
        yield url


def post(url: str, path: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST ``body`` as JSON; the status and the decoded reply."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", path, body=json.dumps(body),
                       headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    """transformers' tokenizer over the files ``BYTES.save_pretrained`` writes (what vLLM would load)."""
    transformers = pytest.importorskip("transformers")
    directory: Path = tmp_path_factory.mktemp("bytes-tokenizer")
    BYTES.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


def test_tokenize_gives_vllms_shape_and_transformers_ids(server, hf_tokenizer) -> None:
    status, reply = post(server, "/tokenize", {"model": "tiny", "prompt": TEXT, "return_token_strs": True})
    assert status == 200, reply
    assert list(reply) == ["count", "max_model_len", "tokens", "token_strs"]
    assert reply["tokens"] == hf_tokenizer(TEXT)["input_ids"]
    assert reply["tokens"][-6] == BYTES.eot_token  # the special token in the text is special
    assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == WINDOW
    assert reply["token_strs"] == hf_tokenizer.convert_ids_to_tokens(reply["tokens"])
    assert reply["token_strs"][:3] == ["H", "i", "Ġ"]


def test_tokenize_without_token_strs_and_of_nothing(server) -> None:
    for body in ({"prompt": "ab", "add_special_tokens": False}, {"prompt": "ab", "add_special_tokens": True}):
        assert post(server, "/tokenize", body) == (
            200, {"count": 2, "max_model_len": WINDOW, "tokens": [97, 98], "token_strs": None})
    # A tokenizer's answer: "" is no tokens (the completions route reads it as <|endoftext|>).
    assert post(server, "/tokenize", {"prompt": ""})[1]["tokens"] == []


def test_tokenized_messages_are_what_the_chat_route_reads(server) -> None:
    status, reply = post(server, "/tokenize", {"messages": MESSAGES})
    assert status == 200, reply
    chat = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})[1]
    assert reply["count"] == chat["usage"]["prompt_tokens"]
    text = post(server, "/detokenize", {"tokens": reply["tokens"]})[1]["prompt"]
    assert text.startswith("Be brief.\n") and text.endswith("User: Who are you?\nAssistant:")


def test_tokenized_messages_follow_the_chat_template(model) -> None:
    template = ChatTemplate(GPT2_CHAT_TEMPLATE, "GPT-2's template")
    with serving(model, chat_template=template) as (url, _):
        status, reply = post(url, "/tokenize", {"messages": MESSAGES})
        chat = post(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})[1]
        plain = post(url, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})[1]
    assert status == 200, reply
    assert reply["count"] == chat["usage"]["prompt_tokens"]
    expected, _ = template.render(MESSAGES, BYTES, add_generation_prompt=True)
    assert reply["tokens"] == BYTES.encode(expected, allowed_special="all")
    assert reply["tokens"][: plain["count"]] == plain["tokens"] and plain["count"] < reply["count"]


def test_detokenize_is_transformers_decode(server, hf_tokenizer) -> None:
    ids = BYTES.encode(TEXT, allowed_special="all")
    assert post(server, "/detokenize", {"model": "tiny", "tokens": ids}) == (200, {"prompt": TEXT})
    cut = [*BYTES.encode("é"), 97][1:]  # a cut-off character: U+FFFD, as transformers decodes it
    assert post(server, "/detokenize", {"tokens": cut}) == (200, {"prompt": hf_tokenizer.decode(cut)})
    assert post(server, "/detokenize", {"tokens": []}) == (200, {"prompt": ""})


def test_both_routes_need_the_api_key(model) -> None:
    with serving(model, api_key=KEY) as (url, _):
        for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [97]})):
            status, reply = post(url, path, body)
            assert status == 401 and reply["error"]["code"] == "invalid_api_key", reply
            status, _ = post(url, path, body, {"Authorization": "Bearer wrong"})
            assert status == 401
            status, reply = post(url, path, body, {"Authorization": f"Bearer {KEY}"})
            assert status == 200, reply


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), [
    ("/tokenize", {"prompt": 5}, 400, "prompt", ["prompt", "string"]),
    ("/tokenize", {"prompt": ["a"]}, 400, "prompt", ["prompt", "string"]),
    ("/tokenize", {}, 400, "prompt", ["neither prompt nor messages"]),
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "prompt", ["both prompt and messages"]),
    ("/tokenize", {"messages": []}, 400, "messages", ["messages", "at least 1"]),
    ("/tokenize", {"messages": [{"role": "robot", "content": "a"}]}, 400, "messages", ["role"]),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "a"}]}, 400, "messages", ["alternate"]),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, 400, "add_special_tokens", ["boolean"]),
    ("/tokenize", {"prompt": "a", "return_token_strs": 1}, 400, "return_token_strs", ["boolean"]),
    ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model", ["'other'", "does not exist"]),
    ("/detokenize", {"tokens": [97, 300]}, 400, "tokens", ["token id 300", "0..256"]),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", ["token id -1", "0..256"]),
    ("/detokenize", {"tokens": [10**30]}, 400, "tokens", ["not in the vocabulary"]),
    ("/detokenize", {"tokens": [1.0]}, 400, "tokens", ["tokens.0", "integer"]),
    ("/detokenize", {"tokens": [True]}, 400, "tokens", ["tokens.0", "integer"]),
    ("/detokenize", {"tokens": "ab"}, 400, "tokens", ["tokens", "list"]),
    ("/detokenize", {}, 400, "tokens", ["tokens", "required"]),
    ("/detokenize", {"tokens": [1], "model": "other"}, 404, "model", ["does not exist"]),
    ("/detokenize", [1, 2], 400, None, ["body"]),
])
def test_bad_bodies_are_one_clear_4xx(server, path, body, status, param, words) -> None:
    got, reply = post(server, path, body)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert "\n" not in error["message"]
    for word in words:
        assert word in error["message"], error["message"]
    assert post(server, "/detokenize", {"tokens": [97]}) == (200, {"prompt": "a"})  # still serving
