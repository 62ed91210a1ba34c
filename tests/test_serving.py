"""The server: the official openai client against it, streaming, batching that really shares forward
passes, the queue limit, disconnects, and every bad input a clear 4xx (with the server still up).

A tiny random model over bytes serves on 127.0.0.1 (a free port, in a thread: ``serving`` in
conftest.py). Its end-of-text logit is pushed far down so that it never ends a text by itself and every
length is known (``endless_model``).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sys
import threading
from collections.abc import Iterator

import pytest
import torch
from conftest import BYTES, SAFETY_S, Hold, endless_model, serve_process, serving, serving_app, wait_for

from gpt2 import GPT2
from gpt2.cli import main
from gpt2.generation.sampling import GenerationConfig, generate, generate_text
from gpt2.serving import Engine
from gpt2.serving.engine import Job, SequenceRequest, draw

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

WINDOW = 96
KEY = "secret-key"


@pytest.fixture(scope="module")
def model() -> GPT2:
    return endless_model(WINDOW)


@pytest.fixture(scope="module")
def server(model: GPT2) -> Iterator[tuple[str, Engine]]:
    with serving(model) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: tuple[str, Engine]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, path: str, body: bytes | str | dict | Iterator[bytes],
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST raw bytes (or JSON) with http.client, so that malformed bodies really go out as they are."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    data = json.dumps(body) if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **(headers or {})}
    connection.request("POST", path, body=data, headers=headers,
                       encode_chunked="Transfer-Encoding" in headers)
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


# ----------------------------------------------------------------------------------------------------
# The official client, unchanged


def test_completion_is_the_greedy_continuation(client, model) -> None:
    prompts = ["Hello", "The quick brown fox"]
    result = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0)
    expected = generate_text(model, BYTES, prompts, GenerationConfig(temperature=0, max_new_tokens=12))
    assert [c.text for c in sorted(result.choices, key=lambda c: c.index)] == expected
    assert {c.finish_reason for c in result.choices} == {"length"}
    assert result.usage.prompt_tokens == sum(len(BYTES.encode(p)) for p in prompts)
    assert result.usage.completion_tokens == 2 * 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 24


def test_streaming_gives_the_same_text(client) -> None:
    for settings in ({"temperature": 0}, {"temperature": 1.0, "top_k": 20, "seed": 7}):
        extra = {"top_k": settings.pop("top_k")} if "top_k" in settings else {}
        whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=20,
                                          extra_body=extra, **settings)
        stream = client.completions.create(model="tiny", prompt="Once upon", max_tokens=20, stream=True,
                                           stream_options={"include_usage": True}, extra_body=extra,
                                           **settings)
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text
        assert chunks[-1].usage.completion_tokens == 20
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_seed_makes_samples_reproducible_and_n_gives_distinct_choices(client) -> None:
    a = client.completions.create(model="tiny", prompt="x", max_tokens=16, seed=3, n=3)
    b = client.completions.create(model="tiny", prompt="x", max_tokens=16, seed=3, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) == 3
    assert a.usage.completion_tokens == 48 and a.usage.prompt_tokens == 1


def test_logprobs_and_echo(client, model) -> None:
    result = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, logprobs=2,
                                       echo=True)
    choice = result.choices[0]
    assert choice.text.startswith("abc")
    lp = choice.logprobs
    assert len(lp.tokens) == 3 + 5 and lp.token_logprobs[0] is None
    # Direct computation: the model's log-softmax over the prompt and its greedy continuation.
    ids = generate(
        model, torch.tensor([BYTES.encode("abc")]), GenerationConfig(max_new_tokens=5, temperature=0)
    )[0].tolist()
    assert lp.tokens == [BYTES.decode([t]) for t in ids]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).log_softmax(-1)[0]
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(float(expected[pos - 1, ids[pos]]), abs=1e-4)
        top = lp.top_logprobs[pos]
        assert len(top) == 2 and max(top.values()) == pytest.approx(float(expected[pos - 1].max()), abs=1e-4)
    assert lp.text_offset[:3] == [0, 1, 2]


def test_chat_uses_the_transcript_and_streams_the_same(client, model) -> None:
    messages = [
        {"role": "system", "content": "Two friends talk."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "How are you?"},
    ]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    reply = whole.choices[0].message
    assert reply.role == "assistant"
    # The template of gpt2.generation.prompts.Chat, continued greedily (a reply is one line, leading spaces
    # dropped).
    transcript = "Two friends talk.\n\nUser: Hi!\nAssistant: Hello.\nUser: How are you?\nAssistant:"
    (expected,) = generate_text(
        model, BYTES, transcript, GenerationConfig(temperature=0, max_new_tokens=10, stop_strings=["\n"])
    )
    assert reply.content == expected.lstrip()
    assert whole.usage.prompt_tokens == len(BYTES.encode(transcript))
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.content
    assert client.models.list().data[0].id == "tiny"


def test_penalties_and_logit_bias_are_the_library_s(client, model) -> None:
    settings = dict(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3)
    result = client.completions.create(model="tiny", prompt="abcabc", max_tokens=16, temperature=0,
                                       extra_body={"repetition_penalty": 1.3}, frequency_penalty=1.5,
                                       presence_penalty=0.5)
    (expected,) = generate_text(
        model, BYTES, "abcabc", GenerationConfig(temperature=0, max_new_tokens=16, **settings)
    )
    (plain,) = generate_text(model, BYTES, "abcabc", GenerationConfig(temperature=0, max_new_tokens=16))
    assert result.choices[0].text == expected != plain
    forced = client.completions.create(
        model="tiny", prompt="hi", max_tokens=6, temperature=1.0, logit_bias={str(ord("z")): 100}
    )
    assert forced.choices[0].text == "zzzzzz"
    banned = client.completions.create(model="tiny", prompt="hi", max_tokens=6, temperature=0,
                                       logit_bias={str(ord(c)): -100 for c in plain[:6]})
    assert not set(banned.choices[0].text) & set(plain[:6])


def test_min_p_of_one_samples_the_greedy_text(client, model) -> None:
    result = client.completions.create(
        model="tiny", prompt="abc", max_tokens=12, temperature=1.0, seed=3, extra_body={"min_p": 1.0}
    )
    (greedy,) = generate_text(model, BYTES, "abc", GenerationConfig(temperature=0, max_new_tokens=12))
    assert result.choices[0].text == greedy
    sampled = client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=1.0, seed=3)
    assert sampled.choices[0].text != greedy  # (without it, temperature 1 does sample)


def test_n_choices_read_their_prompt_once(server, client) -> None:
    _, engine = server
    prompt = "All four choices share this prompt."
    before = engine.load()["prompt_tokens"]
    together = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=8, n=4, seed=7, echo=True, logprobs=1
    )
    assert engine.load()["prompt_tokens"] - before == len(BYTES.encode(prompt))
    alone = [
        client.completions.create(
            model="tiny", prompt=prompt, max_tokens=8, seed=7 + i, echo=True, logprobs=1
        ).choices[0]
        for i in range(4)
    ]
    for shared, single in zip(sorted(together.choices, key=lambda c: c.index), alone, strict=True):
        assert shared.text == single.text
        expected = single.logprobs.token_logprobs[1:]
        assert shared.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert len({c.text for c in together.choices}) > 1


def test_chat_takes_text_content_parts(client) -> None:
    def reply(system: object, user: object) -> tuple[str, list[float]]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        choice = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True
        ).choices[0]
        return choice.message.content, [t.logprob for t in choice.logprobs.content]

    def text(t: str) -> dict[str, str]:
        return {"type": "text", "text": t}

    parts = reply([text("Chat.")], [text("Hi"), text("you!")])
    assert parts == reply("Chat.", "Hi\nyou!")  # parts joined by newlines
    assert parts != reply("Chat.", "Hi you!")  # (the prompt does change the log-probabilities)


def test_max_tokens_is_capped_by_the_window(client) -> None:
    result = client.completions.create(model="tiny", prompt="a" * (WINDOW - 4), max_tokens=50)
    assert result.usage.completion_tokens == 4 and result.choices[0].finish_reason == "length"


# ----------------------------------------------------------------------------------------------------
# Concurrency


def test_concurrent_requests_share_forward_passes(server, client, model) -> None:
    _, engine = server
    before = dict(engine.load())
    prompts = [f"request {i}: " + "xyz" * (5 * i) for i in range(6)]  # lengths 11 to 86
    results: dict[int, str] = {}

    def ask(i: int) -> threading.Thread:
        def run() -> None:
            max_tokens = min(40, WINDOW - len(prompts[i]))
            r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=max_tokens,
                                          temperature=0)
            results[i] = r.choices[0].text

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    # The first request runs alone; the other five arrive while its prompt is read and join it at the
    # engine's next step (held there, so that they do arrive together however busy the machine is).
    with Hold(model) as hold:
        threads = [ask(0)]
        hold.wait()
        threads += [ask(i) for i in range(1, 6)]
        wait_for(lambda: engine.load()["waiting"] == 5, "the five later requests to be queued")
    for t in threads:
        t.join(timeout=SAFETY_S)
    after = engine.load()
    # Batched with others (left-padded, shifted in the shared cache), each is its own greedy continuation.
    for i, prompt in enumerate(prompts):
        assert (
            results[i]
            == generate_text(model, BYTES, prompt,
                             GenerationConfig(temperature=0, max_new_tokens=min(40, WINDOW - len(prompt))))[0]
        )
    tokens = after["tokens_generated"] - before["tokens_generated"]
    passes = after["forward_passes"] - before["forward_passes"]
    assert tokens == sum(min(40, WINDOW - len(p)) for p in prompts)
    assert passes < tokens / 2, f"{passes} forward passes for {tokens} tokens: requests were not batched"
    assert after["max_batch"] > 1


def test_chunked_prefill_gives_the_same_text_and_prompt_logprobs(client, model) -> None:
    prompts = ["Hi", "The quick brown fox jumps over the lazy dog"]  # 2 and 43 tokens, left-padded
    whole = client.completions.create(
        model="tiny", prompt=prompts, max_tokens=10, temperature=0, echo=True, logprobs=1
    )
    with serving(model, prefill_chunk=5) as (url, _):
        chunked_client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        chunked = chunked_client.completions.create(
            model="tiny", prompt=prompts, max_tokens=10, temperature=0, echo=True, logprobs=1
        )
    for a, b, prompt in zip(whole.choices, chunked.choices, prompts, strict=True):
        (expected,) = generate_text(model, BYTES, prompt, GenerationConfig(temperature=0, max_new_tokens=10))
        assert a.text == b.text == prompt + expected
        assert b.logprobs.token_logprobs[0] is None
        assert b.logprobs.token_logprobs[1:] == pytest.approx(a.logprobs.token_logprobs[1:], abs=1e-4)


@pytest.mark.parametrize(("chunk", "most", "least"), [(4, 99, 12), (256, 8, 0)], ids=["chunked", "whole"])
def test_a_long_prompt_does_not_stall_running_sequences(model, chunk: int, most: int, least: int) -> None:
    """While an 88-token prompt is read in 22 chunks of 4, a running sequence gets a token per chunk;
    read whole, it stalls the running sequence (the bound leaves room for tokens in flight)."""

    async def tokens_of_a_while_b_is_read() -> int:
        engine = Engine(model, BYTES, max_batch_size=4, prefill_chunk=chunk)
        engine.start()
        order: list[str] = []

        async def read(job: Job, name: str) -> None:
            async for _ in job.steps():
                order.append(name)

        try:
            with Hold(model) as hold:
                a = engine.submit([SequenceRequest([97], GenerationConfig(max_new_tokens=60, temperature=0))])
                reading_a = asyncio.create_task(read(a, "a"))
                await asyncio.to_thread(hold.wait)  # at a's prompt
                hold.allow(1)
                await asyncio.to_thread(hold.wait)  # at a's first decoding step: its first token is out
                while not order:  # and read
                    await asyncio.sleep(0.001)
                b = engine.submit([SequenceRequest([98] * 88, GenerationConfig(max_new_tokens=3,
                                                                               temperature=0))])
                order.append("b submitted")
            await asyncio.wait_for(asyncio.gather(reading_a, read(b, "b")), SAFETY_S)
        finally:
            engine.stop()
        return order[order.index("b submitted") : order.index("b")].count("a")

    count = asyncio.run(tokens_of_a_while_b_is_read())
    assert least <= count <= most, count


def test_a_request_cancelled_while_its_prompt_is_read_is_dropped(model) -> None:
    async def run() -> dict[str, int]:
        engine = Engine(model, BYTES, max_batch_size=2, prefill_chunk=1)  # 90 steps to read the prompt
        engine.start()
        try:
            greedy = GenerationConfig(max_new_tokens=3, temperature=0)
            with Hold(model) as hold:
                job = engine.submit([SequenceRequest([98] * 90, greedy)])
                await asyncio.to_thread(hold.wait)  # at the prompt's first chunk
                assert engine.load()["running"] == 1
                job.cancel()
            while engine.load()["running"]:
                await asyncio.sleep(0.001)
            after = engine.submit([SequenceRequest([97], greedy)])
            assert [step.token async for _, step in after.steps()] == generate(
                model, torch.tensor([[97]]), GenerationConfig(max_new_tokens=3, temperature=0)
            )[0, 1:].tolist()
            return engine.load()
        finally:
            engine.stop()

    load = asyncio.run(asyncio.wait_for(run(), SAFETY_S))
    assert load["cancelled"] == 1 and load["forward_passes"] < 90


def test_full_queue_answers_429_and_disconnect_frees_the_slot(model) -> None:
    with serving_app(model, max_batch_size=1, max_queue=1) as (url, app), Hold(model) as hold:
        engine = app.state.engine
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=SAFETY_S)
        stream = client.completions.create(model="tiny", prompt="a", max_tokens=WINDOW - 1, stream=True)
        hold.wait()
        hold.allow(1)
        hold.wait()  # the first request holds the only slot, its first token out, held mid-stream
        waiting = threading.Thread(
            target=client.completions.create, kwargs=dict(model="tiny", prompt="b", max_tokens=4)
        )
        waiting.start()
        wait_for(lambda: engine.load()["waiting"] == 1, "the second request to wait")
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model="tiny", prompt="c", max_tokens=4)
        assert "busy" in refused.value.body["message"]
        stream.close()  # the client goes away mid-stream: its slot goes to the waiting request
        wait_for(lambda: app.state.shutdown.running == 1, "the stream's end (its job cancelled)")
        hold.release()
        waiting.join(timeout=SAFETY_S)
        wait_for(lambda: engine.load()["running"] == 0, "the slots to be freed")
        load = engine.load()
        assert load["cancelled"] == 1 and load["rejected"] == 1
        assert load["tokens_generated"] < WINDOW - 1 + 4  # the first request was cut short
        assert client.completions.create(model="tiny", prompt="d", max_tokens=3).usage.completion_tokens == 3


# ----------------------------------------------------------------------------------------------------
# Bad input: a 4xx in OpenAI's shape with a message that says what is wrong, and the server still up

GOOD = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ('{"model": "tiny", "prompt": ', 400, "not valid JSON"),
        ({**GOOD, "max_tokens": "five"}, 400, "max_tokens"),
        ({**GOOD, "prompt": 3}, 400, "prompt"),
        ({**GOOD, "temperature": "hot"}, 400, "temperature"),
        ({**GOOD, "stream": "yes"}, 400, "stream"),
        ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
        ({**GOOD, "max_tokens": -3}, 400, "max_tokens"),
        ({**GOOD, "n": 0}, 400, "n"),
        ({**GOOD, "temperature": -0.5}, 400, "temperature"),
        ({**GOOD, "top_p": 0}, 400, "top_p"),
        ({**GOOD, "stop": [""]}, 400, "stop"),
        ({**GOOD, "model": "gpt-4"}, 404, "does not exist"),
        ({**GOOD, "prompt": "x" * WINDOW}, 400, "context window"),
        ({**GOOD, "prompt": [10**9]}, 400, "vocabulary"),
        ({**GOOD, "frequency_penalty": 2.5}, 400, "frequency_penalty"),
        ({**GOOD, "presence_penalty": -3}, 400, "presence_penalty"),
        ({**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({**GOOD, "min_p": 1.5}, 400, "min_p"),
        ({**GOOD, "logit_bias": {"abc": 1}}, 400, "not a token id"),
        ({**GOOD, "logit_bias": {"300": 1}}, 400, "not a token id"),
        ({**GOOD, "logit_bias": {"5": 101}}, 400, "outside [-100, 100]"),
        ({"model": "tiny", "max_tokens": 2}, 400, "prompt"),
    ],
)
def test_bad_completion_requests(server, body, status, words) -> None:
    url, _ = server
    got, payload = post(url, "/v1/completions", body)
    assert got == status
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    assert post(url, "/v1/completions", GOOD)[0] == 200  # still up


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, "alternate"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 2 * WINDOW}]}, "too long"),
        (
            {
                "model": "tiny",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ],
            },
            "'image_url'",
        ),
    ],
)
def test_bad_chat_requests(server, body, words) -> None:
    got, payload = post(server[0], "/v1/chat/completions", body)
    assert got == 400 and words in payload["error"]["message"]


def test_body_limit_and_api_key(model) -> None:
    with serving(model, api_key=KEY, max_body_bytes=2000) as (url, _):
        auth = {"Authorization": f"Bearer {KEY}"}
        status, payload = post(url, "/v1/completions", {**GOOD, "prompt": "y" * 5000}, auth)
        assert status == 413 and "2000 bytes" in payload["error"]["message"]
        chunks = iter([b'{"model": "tiny", "prompt": "', b"z" * 3000, b'"}'])  # no length declared
        status, payload = post(url, "/v1/completions", chunks, {**auth, "Transfer-Encoding": "chunked"})
        assert status == 413 and "2000 bytes" in payload["error"]["message"]
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, payload = post(url, "/v1/completions", GOOD, headers)
            assert status == 401 and payload["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens == 2


# ----------------------------------------------------------------------------------------------------
# The engine's batched draw


def test_draw_follows_the_filtered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    config = GenerationConfig(temperature=0.7, top_k=3)
    tokens = torch.tensor(draw(logits, [config] * len(logits), [None] * len(logits)))
    expected = (logits[0, :3] / 0.7).softmax(-1)  # direct computation: the top 3, renormalised
    frequencies = torch.bincount(tokens, minlength=5) / len(tokens)
    assert frequencies[3:].sum() == 0
    assert torch.allclose(frequencies[:3], expected, atol=0.015)
    # top_p 0.7: token 0 (p 0.56) and token 1 (0.21) are needed to reach it, token 2 is not.
    nucleus = draw(logits[:2000], [GenerationConfig(top_p=0.7)] * 2000, [None] * 2000)
    assert set(nucleus) == {0, 1}


def test_draw_mixes_settings_and_seeds_reproduce() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    configs = [GenerationConfig(temperature=0), GenerationConfig(seed=1), GenerationConfig(top_k=5, seed=2)]
    configs *= 2

    def seeded() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(10 + i) for i in range(6)]

    first = draw(logits, configs, seeded())
    assert first == draw(logits, configs, seeded())
    assert first[0] == int(logits[0].argmax()) and first[3] == int(logits[3].argmax())
    assert first[2] in logits[2].topk(5).indices.tolist() and first[5] in logits[5].topk(5).indices.tolist()


# ----------------------------------------------------------------------------------------------------
# The command


def test_gpt2_serve_command(model, tmp_path, capsys) -> None:
    directory = tmp_path / "bytes-model"
    model.save_pretrained(directory)
    assert main(["serve", "--model", str(directory), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be positive" in capsys.readouterr().err
    assert main(["serve", "--model", str(directory), "--prefill-chunk", "0"]) == 2
    assert "--prefill-chunk must be positive" in capsys.readouterr().err
    command = [
        sys.executable,
        "-m",
        "gpt2",
        "serve",
        "--model",
        str(directory),
        "--api-key",
        KEY,
        "--no-batching",
        "--prefill-chunk",
        "2",
    ]
    process, port = serve_process(command)  # on a free port, listening
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)

        def up() -> bool:
            assert process.poll() is None, process.stderr.read()
            try:
                return client.models.list().data[0].id == "bytes-model"
            except openai.APIConnectionError:
                return False

        wait_for(up, "gpt2 serve to answer")
        result = client.completions.create(model="bytes-model", prompt="Hi", max_tokens=5, temperature=0)
        assert (
            result.choices[0].text
            == generate_text(model, BYTES, "Hi", GenerationConfig(temperature=0, max_new_tokens=5))[0]
        )
    finally:
        process.terminate()
        _, err = process.communicate(timeout=SAFETY_S)
    assert f"on http://127.0.0.1:{port}/ (batch 1)" in err
