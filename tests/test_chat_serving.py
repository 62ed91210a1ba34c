"""Chatting through a chat template: ``gpt2 chat``, ``gpt2 serve``'s ``/v1/chat/completions`` (through
the official openai client) and the playground use the template of the model's tokenizer, or one given
with ``--chat-template``; a base model keeps the plain transcript.

A tiny model over bytes learns two conversations rendered by our template (seconds of training; its
tokenizer is saved with the template), so what it answers is known: its learned reply, ending at the
end-of-turn token, multi-line, with no template text. Bad messages and bad templates are each one line:
``error:`` with status 2 on the command line, a 400 in OpenAI's error shape from the server.
"""

from __future__ import annotations

import http.client
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import (
    BYTES,
    assert_one_line_error,
    assert_openai_error,
    endless_model,
    random_model,
    run_cli,
    saved_model_dir,
    serving,
    wait_for,
)

from gpt2 import GPT2
from gpt2.generation.prompts import CHAT_HEADER, Chat, Templated, Transcript, chat_format
from gpt2.generation.sampling import GenerationConfig
from gpt2.tokenizer.bpe import Tokenizer
from gpt2.tokenizer.chat_template import GPT2_CHAT_TEMPLATE, ChatTemplate

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

SYSTEM = "Answer briefly."
FRANCE, ITALY, HI = "What is the capital of France?", "And of Italy?", "Hi!"
PARIS, ROME, HELLO = "Paris.", "Rome.\nIt is old.", "Hello, friend!"  # a reply may span lines
CONVERSATIONS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FRANCE},
     {"role": "assistant", "content": PARIS}, {"role": "user", "content": ITALY},
     {"role": "assistant", "content": ROME}],
    [{"role": "user", "content": HI}, {"role": "assistant", "content": HELLO}],
]
TEMPLATE_WORDS = ("<|endoftext|>", "User:", "Assistant:")
GREEDY = ["--preset", "greedy", "--max-new-tokens", 40]


def bytes_with_template(template: str | None = GPT2_CHAT_TEMPLATE) -> Tokenizer:
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    tokenizer.chat_template = template
    return tokenizer


def train(model: GPT2, tokenizer: Tokenizer, steps: int = 120) -> None:
    """Overfit ``model`` on CONVERSATIONS: the loss of the tokens the template marks as the replies."""
    template = ChatTemplate.of(tokenizer)
    examples = []
    for conversation in CONVERSATIONS:
        ids, mask = template.encode(conversation, tokenizer)
        targets = torch.tensor(ids[1:]).where(torch.tensor(mask[1:]), -100)
        examples.append((torch.tensor([ids[:-1]]), targets))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = sum(torch.nn.functional.cross_entropy(model(x)[0], y) for x, y in examples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 0.1, loss.item()


@pytest.fixture(scope="module")
def learned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model that learned CONVERSATIONS, saved with its tokenizer and our template."""
    model = random_model(n_layer=2, n_head=2, n_embd=64, n_positions=192, tokenizer=bytes_with_template())
    train(model, model.tokenizer)
    return saved_model_dir(model, tmp_path_factory)


@pytest.fixture(scope="module")
def learned(learned_dir: Path) -> GPT2:
    model = GPT2.from_pretrained(learned_dir).eval()
    assert model.tokenizer.chat_template == GPT2_CHAT_TEMPLATE  # saved with the checkpoint
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random base model over bytes: no chat template."""
    return saved_model_dir(endless_model(128), tmp_path_factory)


def chat_cli(capsys, monkeypatch, lines: str, *argv: object) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    return run_cli(capsys, "chat", *argv)


def template_file(tmp_path: Path, source: str, name: str = "chat_template.jinja") -> Path:
    path = tmp_path / name
    path.write_text(source, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------
# gpt2 chat


def test_chat_answers_in_the_model_s_template(learned_dir: Path, capsys, monkeypatch) -> None:
    code, out, err = chat_cli(capsys, monkeypatch, f"{FRANCE}\n{ITALY}\n\n", "--model", learned_dir,
                              "--system", SYSTEM, *GREEDY)
    assert code == 0, err
    # Each reply ends at the end-of-turn token, keeps its new line, and shows no template text.
    assert out == f"gpt2> {PARIS}\ngpt2> {ROME}\n"
    code, out, _ = chat_cli(capsys, monkeypatch, f"{HI}\n\n", "--model", learned_dir, *GREEDY)
    assert code == 0 and out == f"gpt2> {HELLO}\n"


def test_the_chat_class_renders_the_template_and_records_the_replies(learned: GPT2) -> None:
    chat = Chat(chat_format(ChatTemplate.of(learned.tokenizer), SYSTEM))
    config = GenerationConfig.from_preset("greedy", max_new_tokens=40)
    assert [chat.reply(learned, learned.tokenizer, m, config) for m in (FRANCE, ITALY)] == [PARIS, ROME]
    assert chat.turns == [(FRANCE, PARIS), (ITALY, ROME)]
    assert isinstance(chat.format, Templated)
    # The prompt is what the template renders, so the next turn sees exactly the trained text.
    prompt = chat.prompt("Next?", learned.tokenizer, budget=1000)
    assert prompt == ChatTemplate.of(learned.tokenizer).prompt_ids(
        [*CONVERSATIONS[0], {"role": "user", "content": "Next?"}], learned.tokenizer)


def test_a_template_file_replaces_the_transcript_of_a_base_model(
    base_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    custom = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    path = template_file(tmp_path, custom)
    code, out, err = chat_cli(capsys, monkeypatch, "hello\n\n", "--model", base_dir, "--chat-template", path,
                              "--system", "Be kind.", "--preset", "greedy", "--max-new-tokens", 12)
    assert code == 0, err
    model = GPT2.from_pretrained(base_dir)
    expected = Chat(Templated(ChatTemplate(custom), "Be kind.")).reply(
        model, BYTES, "hello", GenerationConfig.from_preset("greedy", max_new_tokens=12))
    assert out == f"gpt2> {expected}\n"


def test_a_base_model_keeps_the_transcript_and_system_sets_its_header(
    base_dir: Path, capsys, monkeypatch
) -> None:
    config = GenerationConfig.from_preset("greedy", max_new_tokens=12)
    model = GPT2.from_pretrained(base_dir)
    for system, header in ((None, CHAT_HEADER), ("Two friends talk.", "Two friends talk.\n\n")):
        argv = ["--model", base_dir, "--preset", "greedy", "--max-new-tokens", 12]
        argv += ["--system", system] if system else []
        code, out, _ = chat_cli(capsys, monkeypatch, "hello\n\n", *argv)
        expected = Chat(Transcript(header)).reply(model, BYTES, "hello", config)
        assert code == 0 and out.removeprefix("gpt2> ").strip() == expected
    assert isinstance(chat_format(None, "x"), Transcript) and chat_format(None, "x").header == "x\n\n"


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{{ raise_exception('no system messages here') }}", ["failed to render", "no system messages here"]),
        ("{{ messages[5]['content'] }}", ["failed to render"]),
        ("{% for m in messages %}{{ m.content }", ["not a valid Jinja template", "line 1"]),
    ],
)
@pytest.mark.parametrize("verb", ["chat", "serve"])
def test_a_bad_template_file_is_one_line(
    verb: str, source: str, words: list[str], base_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    path = template_file(tmp_path, source, "bad.jinja")
    monkeypatch.setattr("gpt2.cli.serve._serve",
                        lambda *a: pytest.fail("served a template that cannot render"))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello\n\n")))
    code, _, err = run_cli(capsys, verb, "--model", base_dir, "--chat-template", path)
    assert_one_line_error(code, err, "bad.jinja", *words)


def test_a_missing_template_file_is_one_line(base_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "chat", "--model", base_dir, "--chat-template", tmp_path / "none.jinja")
    assert_one_line_error(code, err, "none.jinja", "cannot read the chat template")


# ----------------------------------------------------------------------------------------------------
# The server


@pytest.fixture(scope="module")
def learned_server(learned: GPT2) -> Iterator[str]:
    with serving(learned) as (url, _):  # the template comes with the tokenizer
        yield url


@pytest.fixture(scope="module")
def client(learned_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{learned_server}/v1", api_key="none", max_retries=0)


def _stream(client: openai.OpenAI, messages: list[dict[str, str]], **options: object) -> tuple[str, str]:
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True, **options))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize(("messages", "reply"), [
    (CONVERSATIONS[0][:2], PARIS), (CONVERSATIONS[0][:4], ROME), (CONVERSATIONS[1][:1], HELLO)])
def test_the_server_answers_in_the_template(client, messages, reply) -> None:
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == reply
    assert choice.finish_reason == "stop"
    assert not any(word in choice.message.content for word in TEMPLATE_WORDS)
    assert whole.usage.completion_tokens == len(f" {reply}".encode()) + 1  # the space, the end of turn
    assert _stream(client, messages, max_tokens=40, temperature=0) == (reply, "stop")
    assert client.models.list().data[0].model_extra["chat_template"] is True


def test_the_server_reads_messages_as_prepare_does(client) -> None:
    """OpenAI's ``developer`` role is the system's and content may come as text parts, as in training
    data (``gpt2.tokenizer.chat_template.check_messages``): the same prompt, the same reply."""
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    shaped = [{"role": "developer", "content": SYSTEM}, {"role": "user", "content": parts}]
    joined = "What is the capital\nof France?"
    plain = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": joined}]
    one = client.chat.completions.create(model="tiny", messages=plain, max_tokens=40, temperature=0)
    two = client.chat.completions.create(model="tiny", messages=shaped, max_tokens=40, temperature=0)
    assert two.choices[0].message.content == one.choices[0].message.content
    assert two.usage.prompt_tokens == one.usage.prompt_tokens


def test_the_server_stops_at_a_stop_string_too_and_takes_any_order(client, learned: GPT2) -> None:
    messages = CONVERSATIONS[0][:4]
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                         stop=["old"])
    assert cut.choices[0].message.content == "Rome.\nIt is " and cut.choices[0].finish_reason == "stop"
    # As in vLLM, the generation prompt follows whatever the messages end with (here the assistant's).
    odd = [{"role": "assistant", "content": "Hm."}, {"role": "system", "content": "Late."}]
    result = client.chat.completions.create(model="tiny", messages=odd, max_tokens=5, temperature=0)
    text, _ = ChatTemplate.of(learned.tokenizer).render(odd, learned.tokenizer, add_generation_prompt=True)
    assert result.usage.prompt_tokens == len(learned.tokenizer.encode(text, allowed_special="all"))


def test_the_server_drops_the_oldest_turns_and_caps_max_tokens(learned_server: str, learned: GPT2) -> None:
    template = ChatTemplate.of(learned.tokenizer)
    long = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "x" * 60},
            {"role": "assistant", "content": "y" * 60}, *CONVERSATIONS[0][1:4]]
    status, payload = post(learned_server, {"messages": long, "max_tokens": 50, "temperature": 0})
    assert status == 200, payload
    kept = template.prompt_ids(CONVERSATIONS[0][:4], learned.tokenizer)  # the first turn went whole
    assert payload["usage"]["prompt_tokens"] == len(kept)
    assert payload["choices"][0]["message"]["content"] == ROME  # the history it learned, once the rest went
    status, payload = post(learned_server, {"messages": CONVERSATIONS[1][:1], "max_tokens": 10_000})
    assert status == 400 and "max_tokens" in payload["error"]["message"]
    too_long = [{"role": "user", "content": "z" * 300}]
    status, payload = post(learned_server, {"messages": too_long, "max_tokens": 4})
    assert status == 400 and "too long" in payload["error"]["message"]


def post(url: str, body: dict) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([{"role": "tool", "content": "x"}],
         ["messages.0.role", "'system', 'developer', 'user' or 'assistant'"]),
        ([{"role": "user", "content": 5}], ["messages.0.content", "must be a string", "got a number"]),
        ([{"role": "user", "content": None}], ["messages.0.content", "got null"]),
        ([{"role": "user", "content": [5]}], ["messages.0.content", "must be a string"]),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], ["content part"]),
        ([{"role": "user"}], ["messages.0.content", "Field required"]),
        ([], ["messages"]),
    ],
)
def test_bad_messages_are_400s(learned_server: str, messages, words) -> None:
    assert_openai_error(*post(learned_server, {"messages": messages}), *words)
    assert post(learned_server, {"messages": CONVERSATIONS[1][:1], "max_tokens": 2})[0] == 200  # still up


ONE_MESSAGE_ONLY = ("{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
                    "{{ messages[0].content }}")


@pytest.mark.parametrize(
    ("source", "words", "one_message"),
    [
        (ONE_MESSAGE_ONLY, ["failed to render", "one message only"], 200),
        ("{{ messages[0].content }}{{ messages[5]['content'] }}", ["failed to render"], 400),
        ("{{ messages[0].content + 1 }}", ["failed to render", "TypeError"], 400),
    ],
)
def test_a_template_that_fails_on_a_request_is_a_400(learned: GPT2, source: str, words, one_message) -> None:
    with serving(learned, chat_template=ChatTemplate(source, "the test's template")) as (url, _):
        two = CONVERSATIONS[1]
        for stream in (False, True):
            got = post(url, {"messages": two, "stream": stream})
            assert_openai_error(*got, "the test's template", *words)
        assert post(url, {"messages": two[:1], "max_tokens": 2})[0] == one_message  # and the server is up


def test_gpt2_serve_uses_the_template_file(base_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    custom = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
    apps = []
    monkeypatch.setattr("gpt2.cli.serve._serve", lambda app, *_: apps.append(app))
    code, _, err = run_cli(capsys, "serve", "--model", base_dir, "--allowed-hosts", "*",
                           "--chat-template", template_file(tmp_path, custom))
    assert code == 0 and "chat in its chat template" in err
    messages = [{"role": "user", "content": "hi"}]
    with TestClient(apps[0]) as http:
        payload = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3}).json()
        assert payload["usage"]["prompt_tokens"] == len(b"[user] hi\n[assistant]")
        assert http.get("/v1/models").json()["data"][0]["chat_template"] is True
        assert "the model's chat template" in http.get("/").text


def test_a_base_model_s_server_keeps_the_transcript(base_dir: Path) -> None:
    model = GPT2.from_pretrained(base_dir)
    with serving(model) as (url, _):
        status, payload = post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert status == 200
        assert payload["usage"]["prompt_tokens"] == len(f"{CHAT_HEADER}User: hi\nAssistant:".encode())
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].model_extra["chat_template"] is False


# ----------------------------------------------------------------------------------------------------
# The playground


def test_the_playground_chats_through_the_template(browser, learned_server: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{learned_server}/")
    assert "the model's chat template" in browser.find_element(By.TAG_NAME, "p").text
    Select(browser.find_element(By.ID, "mode")).select_by_value("chat")
    for field, value in (("system", SYSTEM), ("temperature", "0"), ("max_tokens", "40")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    replies = []
    for message in (FRANCE, ITALY):
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(message)
        browser.find_element(By.ID, "generate").click()
        wait_for(lambda: browser.find_element(By.ID, "status").text.startswith(("done", "error")),
                 "the playground to answer", timeout=60)
        assert browser.find_element(By.ID, "status").text.startswith("done"), browser.find_element(
            By.ID, "status").text
        replies.append(browser.execute_script(
            "return Array.from(document.querySelectorAll('#output span.token'), s => s.textContent)"
            ".join('')"))
    assert replies == [PARIS, PARIS + ROME]  # the second turn saw the first (the page keeps the history)
    shown = browser.find_element(By.ID, "output").text
    assert f"you: {FRANCE}" in shown and f"you: {ITALY}" in shown
