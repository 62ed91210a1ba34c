"""The prefix cache of ``gpt2 serve``: later prompts that start like earlier ones reuse their keys and
values, the replies (text and log-probabilities, greedy and seeded samples, one by one and arriving
together) equal those of a server without it, and its memory budget holds with the least recently
used blocks evicted. What it did is read off /metrics, as an operator would.

A tiny random model over bytes (``endless_model``, a 256-position window) serves in a thread
(``serving`` in conftest.py); a byte is a token, so the prompts' lengths are their characters'.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator

import pytest
from conftest import assert_one_line_error, endless_model, run_cli, saved_model_dir, serving, wait_for

from gpt2 import GPT2
from gpt2.generation.sampling import GenerationConfig
from gpt2.serving.engine import PREFIX_CACHE_TOKENS, Engine, SequenceRequest
from gpt2.serving.prefix_cache import BLOCK

openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

DOCUMENT = ("The harbour town kept its old stone walls long after the castle fell; fishermen mended "
            "nets on them and children ran along the top. ")  # 132 characters: 8 whole blocks
QUESTIONS = ["Who mended nets?", "What fell first?", "Where did the children run?", "How old are walls?",
             "What did fishermen do?", "Is the castle standing?"]


@pytest.fixture(scope="module")
def model() -> GPT2:
    return endless_model(256)


@pytest.fixture(scope="module")
def served(model: GPT2) -> Iterator[tuple[dict[str, str], Engine]]:
    """One server with the default prefix cache and one without, by name, and the first's engine."""
    with serving(model) as (cached, engine), serving(model, prefix_cache_tokens=0) as (plain, _):
        yield {"cached": cached, "plain": plain}, engine


@pytest.fixture(scope="module")
def servers(served: tuple[dict[str, str], Engine]) -> dict[str, str]:
    return served[0]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def metrics(url: str) -> dict[str, float]:
    """The prefix cache's samples of /metrics, parsed by prometheus_client."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {s.name: s.value for family in parser.text_string_to_metric_families(text)
            for s in family.samples if "prefix_cache" in s.name}


def complete(url: str, prompt: str, **options: object) -> tuple[str, list[float]]:
    """A completion's text and token log-probabilities."""
    reply = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=12, logprobs=2,
                                           **options)  # type: ignore[call-overload]
    choice = reply.choices[0]
    return choice.text, choice.logprobs.token_logprobs


def assert_same(cached: tuple[str, list[float]], plain: tuple[str, list[float]]) -> None:
    assert cached[0] == plain[0]
    assert cached[1] == pytest.approx(plain[1], abs=1e-4)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7},
                                      {"temperature": 0.8, "top_p": 0.9, "seed": 3}])
def test_replies_equal_a_server_without_the_cache(servers, sampling) -> None:
    before = metrics(servers["cached"])["gpt2_prefix_cache_hits_total"]
    for question in QUESTIONS:
        assert_same(complete(servers["cached"], DOCUMENT + question, **sampling),
                    complete(servers["plain"], DOCUMENT + question, **sampling))
    hits = metrics(servers["cached"])["gpt2_prefix_cache_hits_total"] - before
    # every question after the first found the document's 8 blocks (the first too when cached before)
    assert hits >= (len(QUESTIONS) - 1) * (len(DOCUMENT) // BLOCK * BLOCK)
    assert metrics(servers["plain"])["gpt2_prefix_cache_hits_total"] == 0


def test_chat_turns_reuse_the_system_prompt(servers) -> None:
    system = {"role": "system", "content": DOCUMENT}
    for question in QUESTIONS[:3]:
        replies = [client(url).chat.completions.create(
            model="tiny", messages=[system, {"role": "user", "content": question}], max_tokens=8,
            temperature=1.0, seed=11, logprobs=True) for url in (servers["cached"], servers["plain"])]
        texts = [r.choices[0].message.content for r in replies]
        logprobs = [[t.logprob for t in r.choices[0].logprobs.content] for r in replies]
        assert texts[0] == texts[1]
        assert logprobs[0] == pytest.approx(logprobs[1], abs=1e-4)


def test_a_conversation_s_next_turn_reuses_the_last_reply(model) -> None:
    """What a sequence generated is kept when it ends: the next prompt, which repeats it, finds it."""
    greedy = GenerationConfig(max_new_tokens=30, temperature=0, seed=None)

    async def turn(engine: Engine, prompt: list[int]) -> list[int]:
        job = engine.submit([SequenceRequest(prompt, greedy, logprobs=0)])
        return [step.token async for _, step in job.steps()]

    first = list(range(40, 80))  # 40 tokens: 2 whole blocks of their own
    replies = {}
    for budget in (PREFIX_CACHE_TOKENS, 0):
        engine = Engine(model, model.tokenizer, prefix_cache_tokens=budget)
        engine.start()
        try:
            reply = asyncio.run(turn(engine, first))
            hits = engine.stats.prefix_cache_hits
            second = first + reply + [10, 11, 12]
            replies[budget] = (reply, asyncio.run(turn(engine, second)))
            hits = engine.stats.prefix_cache_hits - hits
        finally:
            engine.stop()
        if budget:  # the first prompt and the 29 tokens read of its reply: 69 positions, 4 whole blocks
            assert hits == (len(first) + len(reply) - 1) // BLOCK * BLOCK == 64
    assert replies[PREFIX_CACHE_TOKENS] == replies[0]


def test_prompts_arriving_together_equal_one_by_one(served) -> None:
    """Prompts of different lengths sharing a new start, sent at once (the engine reads the first and
    holds the others back so that they find it cached), beside prompts of their own."""
    servers, engine = served
    fresh = "A different document, never seen by this server before, about the river and its mills. "
    prompts = [fresh + q for q in QUESTIONS] + ["short one", QUESTIONS[0] * 3]
    before = metrics(servers["cached"])["gpt2_prefix_cache_hits_total"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        engine.stop()  # they wait in its queue until every one is there: they do arrive together
        try:
            replies = [pool.submit(complete, servers["cached"], p, temperature=1.0, seed=5) for p in prompts]
            wait_for(lambda: engine.load()["waiting"] == len(prompts), "every prompt to be queued")
        finally:
            engine.start()
        together = [reply.result() for reply in replies]
    hits = metrics(servers["cached"])["gpt2_prefix_cache_hits_total"] - before
    for prompt, reply in zip(prompts, together, strict=True):
        assert_same(reply, complete(servers["plain"], prompt, temperature=1.0, seed=5))
    # read together, left-padded to end at one position, a shorter prompt reuses its cached start
    # only as far as the longest one's does: up to the questions' spread in length less
    spread = max(map(len, QUESTIONS)) - min(map(len, QUESTIONS))
    assert hits >= (len(QUESTIONS) - 1) * (len(fresh) // BLOCK * BLOCK - spread)


def test_echoed_prompt_logprobs_are_read_whole_and_equal(servers) -> None:
    for url in servers.values():
        complete(url, DOCUMENT + "Warm?")
    replies = [client(url).completions.create(model="tiny", prompt=DOCUMENT + "Cold?", max_tokens=2,
                                              logprobs=1, echo=True, temperature=0)
               for url in (servers["cached"], servers["plain"])]
    logprobs = [r.choices[0].logprobs.token_logprobs for r in replies]
    assert len(logprobs[0]) == len(DOCUMENT + "Cold?") + 2
    assert logprobs[0][1:] == pytest.approx(logprobs[1][1:], abs=1e-4)


def test_the_budget_holds_and_the_least_recently_used_go_first(model) -> None:
    """A budget of 4 blocks and prompts of 2 whole blocks (33 tokens): two prompts fill it, a third
    evicts the one used least recently, and the positions in use never pass the budget."""
    a, b, c = ("a" * 20 + "1" * 13, "b" * 20 + "2" * 13, "c" * 20 + "3" * 13)
    with serving(model, prefix_cache_tokens=4 * BLOCK) as (url, _):
        def hits_of(prompt: str) -> float:
            before = metrics(url)["gpt2_prefix_cache_hits_total"]
            complete(url, prompt)
            after = metrics(url)
            assert after["gpt2_prefix_cache_positions_in_use"] <= after["gpt2_prefix_cache_positions"] == 64
            return after["gpt2_prefix_cache_hits_total"] - before

        assert [hits_of(p) for p in (a, b)] == [0, 0]
        assert metrics(url)["gpt2_prefix_cache_positions_in_use"] == 4 * BLOCK  # full
        assert hits_of(a) == 2 * BLOCK  # both of a's blocks (the last token is always read)
        assert hits_of(c) == 0  # evicts b, now the least recently used
        assert hits_of(a) == 2 * BLOCK
        assert hits_of(b) == 0  # b was evicted (and now c is)
        assert hits_of(c) == 0
        assert metrics(url)["gpt2_prefix_cache_positions_in_use"] == 4 * BLOCK


def test_a_budget_under_one_block_turns_it_off(model) -> None:
    with serving(model, prefix_cache_tokens=BLOCK - 1) as (url, _):
        complete(url, DOCUMENT)
        complete(url, DOCUMENT + "again")
        assert metrics(url)["gpt2_prefix_cache_hits_total"] == 0
        assert metrics(url)["gpt2_prefix_cache_positions"] == 0


def test_a_negative_budget_is_one_clear_error(model, tmp_path_factory, capsys) -> None:
    directory = saved_model_dir(model, tmp_path_factory)
    code, _, err = run_cli(capsys, "serve", "--model", directory, "--prefix-cache-tokens", "-1")
    assert_one_line_error(code, err, "--prefix-cache-tokens", "0")
