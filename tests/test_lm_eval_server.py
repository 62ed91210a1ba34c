"""Scoring through the server as lm-evaluation-harness does it: ``echo`` + ``logprobs`` give an entry per
prompt token plus one per generated token, the ``<|endoftext|>`` that ends a completion included;
``max_tokens`` 0 with ``echo`` scores the prompt alone; and the real ``lm-eval`` package, run with
``--model local-completions`` against the server and with ``--model hf`` on the same saved directory,
gets the same log-likelihoods and metrics.

The model is a tiny random one over bytes (``random_model``: every byte a token, ``<|endoftext|>`` 256)
whose ``<|endoftext|>`` logit is one constant (``eot_model``), set so that the greedy next token after
some of the test's texts is ``<|endoftext|>`` and after the others is not.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import BYTES, random_model, saved_model_dir, serving

from gpt2 import GPT2
from gpt2.tokenizer.chat_template import GPT2_CHAT_TEMPLATE, ChatTemplate

pytest.importorskip("uvicorn")

WINDOW = 64
KEY = "lm-eval-key"
EOT = str(BYTES.eot_token)
PAIRS = [("The cat sat ", "on the mat"), ("Once upon a ", "time"), ("To be or not ", "to be"),
         ("Hello, ", "world"), ("We went ", "home"), ("It was a dark and ", "stormy night")]


def eot_model(texts: list[str]) -> GPT2:
    """``random_model`` whose ``<|endoftext|>`` logit is the same constant c after every text: ln_f's
    bias 0.1 everywhere and the token's embedding row alpha everywhere make it alpha x 0.1 x width (a
    LayerNorm's normalised output sums to 0). c lies between the other tokens' best logits after the
    texts, so the greedy next token is ``<|endoftext|>`` after the two texts where that best is lowest."""
    model = random_model(n_positions=WINDOW, tokenizer=BYTES).eval()
    eot, width = BYTES.eot_token, model.config.n_embd
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(0.1)
        model.transformer.wte.weight[eot] = 0.0
        best = sorted(float(model(torch.tensor([BYTES.encode(t)]))[0, -1].max()) for t in texts)
        model.transformer.wte.weight[eot] = (best[1] + best[2]) / 2 / (0.1 * width)
    return model


@pytest.fixture(scope="module")
def model() -> GPT2:
    return eot_model([context + target for context, target in PAIRS])


@pytest.fixture(scope="module")
def server(model: GPT2) -> Iterator[str]:
    with serving(model, api_key=KEY) as (url, _):
        yield url


def post(url: str, body: dict, path: str = "/v1/completions") -> tuple[int, dict | list[dict]]:
    """POST ``body`` with the key: the status and the reply (a list of the chunks when streamed)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", path, body=json.dumps(body),
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    raw = response.read().decode()
    connection.close()
    if body.get("stream"):
        events = [line.removeprefix("data: ") for line in raw.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return response.status, [json.loads(e) for e in events[:-1]]
    return response.status, json.loads(raw)


def streamed_logprobs(chunks: list[dict]) -> tuple[str, list[str], list[float | None], str | None]:
    """The text, tokens, token logprobs and finish reason of a streamed choice 0."""
    text, tokens, logprobs, finish = "", [], [], None
    for chunk in chunks:
        for choice in chunk["choices"]:
            text += choice["text"]
            tokens += choice["logprobs"]["tokens"] if choice["logprobs"] else []
            logprobs += choice["logprobs"]["token_logprobs"] if choice["logprobs"] else []
            finish = choice["finish_reason"] or finish
    return text, tokens, logprobs, finish


SCORE = {"prompt": [BYTES.encode("Hello, world")], "max_tokens": 1, "logprobs": 1, "echo": True,
         "temperature": 0}


@pytest.mark.parametrize("stream", [False, True])
def test_the_end_of_text_that_ends_a_completion_is_scored(server, model, stream) -> None:
    ids = SCORE["prompt"][0]
    status, reply = post(server, {**SCORE, "logit_bias": {EOT: 100}, "stream": stream})
    assert status == 200, reply
    if stream:
        text, tokens, logprobs, finish = streamed_logprobs(reply)
    else:
        choice = reply["choices"][0]
        text, finish, logprobs = choice["text"], choice["finish_reason"], choice["logprobs"]
        tokens, logprobs = logprobs["tokens"], logprobs["token_logprobs"]
        assert reply["usage"]["completion_tokens"] == 1
        assert reply["choices"][0]["logprobs"]["text_offset"][-1] == len(text)
    assert len(logprobs) == len(ids) + 1 and logprobs[0] is None
    assert (text, tokens[-1], finish) == ("Hello, world", "<|endoftext|>", "stop")
    with torch.no_grad():  # the model's own log-probability (logit_bias only steers the draw)
        expected = model(torch.tensor([ids]))[0, -1].log_softmax(-1)[BYTES.eot_token]
    assert logprobs[-1] == pytest.approx(float(expected), abs=1e-4)


def test_every_text_gets_its_continuations_entry_whatever_the_next_token(server) -> None:
    ends = []
    for context, target in PAIRS:
        ids = BYTES.encode(context + target)
        status, reply = post(server, {**SCORE, "prompt": [ids]})
        assert status == 200, reply
        choice = reply["choices"][0]
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1
        ends.append(choice["finish_reason"])
    assert ends.count("stop") == 2 and ends.count("length") == len(PAIRS) - 2  # as eot_model planned


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_0_with_echo_scores_the_prompt_alone(server, stream) -> None:
    status, one = post(server, {**SCORE, "n": 2})
    assert status == 200, one
    status, reply = post(server, {**SCORE, "max_tokens": 0, "n": 2, "stream": stream})
    assert status == 200, reply
    ids = SCORE["prompt"][0]
    if stream:
        text, tokens, logprobs, finish = streamed_logprobs([{**c, "choices": [x for x in c["choices"]
                                                                               if x["index"] == 0]}
                                                            for c in reply])
    else:
        assert len(reply["choices"]) == 2 and reply["usage"] == {
            "prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        choice = reply["choices"][0]
        text, finish, logprobs = choice["text"], choice["finish_reason"], choice["logprobs"]
        tokens, logprobs = logprobs["tokens"], logprobs["token_logprobs"]
    assert (text, finish, len(tokens)) == ("Hello, world", "length", len(ids))
    assert logprobs == one["choices"][0]["logprobs"]["token_logprobs"][: len(ids)]


@pytest.mark.parametrize(("body", "words"), [
    ({"max_tokens": 0, "echo": False}, ["max_tokens: 0 is taken only with echo"]),
    ({"max_tokens": 0, "echo": False, "logprobs": None}, ["max_tokens: 0 is taken only with echo"]),
    ({"max_tokens": -1}, ["max_tokens", "greater than or equal to 0"]),
])
def test_max_tokens_0_without_echo_is_one_clear_400(server, body, words) -> None:
    status, reply = post(server, {**SCORE, **body})
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == "max_tokens"
    for word in words:
        assert word in error["message"], error
    assert "\n" not in error["message"]


def test_chat_logprobs_stay_the_contents_tokens(model) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True,
            "logit_bias": {EOT: 100}}
    with serving(model, api_key=KEY, chat_template=ChatTemplate(GPT2_CHAT_TEMPLATE)) as (url, _):
        status, reply = post(url, body, "/v1/chat/completions")
    assert status == 200, reply
    choice = reply["choices"][0]
    assert (choice["message"]["content"], choice["logprobs"]["content"], choice["finish_reason"]) == (
        "", [], "stop")


# ----------------------------------------------------------------------------------------------------
# The real lm-evaluation-harness

TASKS = {
    "gpt2_scoring": {"output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "target",
                     "target_delimiter": "", "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]},
    "gpt2_choice": {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                    "doc_to_target": "gold", "target_delimiter": "",
                    "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
}

# Run in a process of its own, so that the offline settings hold from the first import on.
LM_EVAL = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

tasks, runs = sys.argv[1], json.loads(sys.argv[2])
manager = TaskManager(include_path=tasks, include_defaults=False)
out = {}
for name, args in runs.items():
    result = lm_eval.simple_evaluate(model=name, model_args=args, tasks=sorted(json.loads(sys.argv[3])),
                                     task_manager=manager, log_samples=True, bootstrap_iters=0)
    out[name] = {"results": result["results"],
                 "samples": {t: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
                             for t, samples in result["samples"].items()}}
print("RESULT " + json.dumps(out))
"""


def write_tasks(directory: Path, model: GPT2) -> None:
    """The tasks' YAML files over one local jsonl file. One example's target is the model's greedy next
    character (so lm-eval's is_greedy is true for it); each example offers its target and two others."""
    with torch.no_grad():
        context = next(c for c in ("Then", "So", "And", "But", "Now", "If", "As", "Or", "Yes", "No")
                       if 32 <= int(model(torch.tensor([BYTES.encode(c)]))[0, -1].argmax()) < 127)
        greedy = chr(int(model(torch.tensor([BYTES.encode(context)]))[0, -1].argmax()))
    pairs = [*PAIRS, (context, greedy)]
    targets = [t for _, t in pairs]
    rows = []
    for i, (context, target) in enumerate(pairs):
        others = [targets[(i + 1) % len(pairs)], targets[(i + 2) % len(pairs)]]
        rows.append({"context": context, "target": target, "gold": i % 3,
                     "choices": [*others[: i % 3], target, *others[i % 3 :]]})
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    for name, task in TASKS.items():
        config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                  "test_split": "test", **task}
        (directory / f"{name}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")


def run_lm_eval(tmp_path: Path, runs: dict[str, dict[str, object]]) -> dict:
    """lm-eval's results and samples for each of ``runs`` (model type -> model_args), offline."""
    home = tmp_path / "hf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets"), "OPENAI_API_KEY": KEY,
           "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-c", LM_EVAL, str(tmp_path), json.dumps(runs), json.dumps(list(TASKS))]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow
def test_lm_eval_scores_the_same_through_the_server_as_with_transformers(
    server, model, tmp_path, tmp_path_factory
) -> None:
    pytest.importorskip("lm_eval")
    directory = saved_model_dir(model, tmp_path_factory)
    write_tasks(tmp_path, model)
    runs = {
        "hf": {"pretrained": str(directory), "dtype": "float32", "device": "cpu", "batch_size": 1},
        "local-completions": {"model": "tiny", "base_url": f"{server}/v1/completions",
                              "tokenizer_backend": "huggingface", "tokenizer": str(directory),
                              "max_length": WINDOW, "max_retries": 1, "batch_size": 1},
    }
    out = run_lm_eval(tmp_path, runs)
    hf, served = out["hf"], out["local-completions"]
    for task in TASKS:
        pairs = [(a, b) for x, y in zip(hf["samples"][task], served["samples"][task], strict=True)
                 for a, b in zip(x, y, strict=True)]
        for (ll_hf, greedy_hf), (ll_served, greedy_served) in ((a[0], b[0]) for a, b in pairs):
            assert ll_served == pytest.approx(ll_hf, abs=1e-4)
            assert greedy_served == greedy_hf
    ours, theirs = served["results"], hf["results"]
    assert math.log(ours["gpt2_scoring"]["perplexity,none"]) == pytest.approx(
        math.log(theirs["gpt2_scoring"]["perplexity,none"]), abs=1e-4)
    for task, metric in (("gpt2_scoring", "acc"), ("gpt2_choice", "acc"), ("gpt2_choice", "acc_norm")):
        assert ours[task][f"{metric},none"] == pytest.approx(theirs[task][f"{metric},none"], abs=1e-4)
    assert theirs["gpt2_scoring"]["acc,none"] > 0  # the greedy example: is_greedy was read from top_logprobs
