"""This server's ``POST /inspect`` (the playground's inside view): the logit lens, a layer's attention
patterns and an SAE's top features of a prompt, equal to what ``gpt2.interpretability`` computes on the
plain model, from a model built for inference (its CPU layers blocked); bad bodies are a 400 in
OpenAI's shape, a quantised model a 501, an SAE that does not fit one line at start; an inspection
runs beside generation, not in its way.

The served model is ``load_for_inference``'s build of a small random model over bytes (``served``),
whose plain float original the library functions run on.
"""

from __future__ import annotations

import copy
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import BYTES, SAFETY_S, assert_one_line_error, assert_openai_error, random_model, serving

from gpt2 import GPT2
from gpt2.cli import main
from gpt2.interpretability import analysis
from gpt2.interpretability.analysis import attention_patterns, logit_lens
from gpt2.util.errors import UserError

pytest.importorskip("uvicorn")

WINDOW = 64
KEY = "inspect-key"
PROMPT = "the cat sat on the mat"
TOLERANCE = 1e-6  # the same weights through the same hooked pass: equal but for the products' order


def plain_and_served() -> tuple[GPT2, GPT2]:
    """A random model over bytes (2 layers, 2 heads of 64) and the inference model built from a copy of
    it, as ``gpt2 serve`` loads one (on the CPU: blocked weights, attention by hand)."""
    plain = random_model(n_layer=2, n_head=2, n_embd=128, n_positions=WINDOW, tokenizer=BYTES).eval()
    return plain, built(plain, "fp32")


def built(model: GPT2, precision: str) -> GPT2:
    """``load_for_inference``'s model of a copy of ``model`` in ``precision``, on the CPU."""
    from gpt2.inference.load import load_for_inference

    return load_for_inference(copy.deepcopy(model), device="cpu", precision=precision)


@pytest.fixture(scope="module")
def models() -> tuple[GPT2, GPT2]:
    return plain_and_served()


@pytest.fixture(scope="module")
def server(models: tuple[GPT2, GPT2]) -> Iterator[str]:
    with serving(models[1], api_key=KEY) as (url, _):
        yield url


def post(url: str, body: object, path: str = "/inspect", key: str | None = KEY) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=SAFETY_S)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    connection.request("POST", path, body=json.dumps(body), headers=headers)
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


def test_the_served_model_is_built_for_inference(models: tuple[GPT2, GPT2]) -> None:
    """What the route has to undo: the served model's layers are not the plain ones the hooks read."""
    with pytest.raises(UserError, match="built for inference"):
        models[1].run_with_cache(torch.tensor(BYTES.encode(PROMPT)))


def test_an_inspection_is_the_library_s(server: str, models: tuple[GPT2, GPT2]) -> None:
    plain = models[0]
    ids = torch.tensor(BYTES.encode(PROMPT))
    status, reply = post(server, {"prompt": PROMPT, "layer": 1})
    assert status == 200, reply
    assert reply["object"] == "inspection" and reply["model"] == "tiny"
    assert reply["tokens"] == ids.tolist() and reply["token_strs"] == list(PROMPT)
    lens = logit_lens(plain, ids)
    top = lens.argmax(-1)
    given = reply["logit_lens"]
    assert given["rows"] == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    assert given["tokens"] == top.tolist()
    assert given["token_strs"] == [[BYTES.decode([t]) for t in row] for row in top.tolist()]
    probs = lens.gather(-1, top[..., None])[..., 0].exp()
    assert (torch.tensor(given["probs"]) - probs).abs().max() < TOLERANCE
    attention = reply["attention"]
    assert attention["layer"] == 1 and attention["heads"] == [0, 1]
    assert (torch.tensor(attention["patterns"]) - attention_patterns(plain, ids, 1)).abs().max() < TOLERANCE
    assert reply["sae"] is None
    # One head; a layer counted from the last.
    status, one = post(server, {"prompt": PROMPT, "layer": -2, "head": 1})
    assert status == 200 and one["attention"]["layer"] == 0 and one["attention"]["heads"] == [1]
    pattern = torch.tensor(one["attention"]["patterns"])
    assert pattern.shape == (1, len(PROMPT), len(PROMPT))
    assert (pattern[0] - attention_patterns(plain, ids, 0)[1]).abs().max() < TOLERANCE
    assert one["logit_lens"] == given


def test_a_bf16_model_is_inspected_in_bf16(models: tuple[GPT2, GPT2]) -> None:
    ids = torch.tensor(BYTES.encode(PROMPT))
    plain = copy.deepcopy(models[0]).to(torch.bfloat16)
    with serving(built(models[0], "bf16")) as (url, _):
        status, reply = post(url, {"prompt": PROMPT, "layer": 1}, key=None)
    assert status == 200, reply
    assert reply["logit_lens"]["tokens"] == logit_lens(plain, ids).argmax(-1).tolist()
    patterns = torch.tensor(reply["attention"]["patterns"])
    assert (patterns - attention_patterns(plain, ids, 1)).abs().max() < TOLERANCE


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"prompt": ""}, 400, "prompt", ["empty"]),
    ({"prompt": "x" * WINDOW}, 400, "prompt", ["64 tokens long", f"limit of {WINDOW - 1} tokens"]),
    ({"prompt": "x" * 10**5}, 400, "prompt", ["100000 characters long", "limit"]),
    ({"prompt": "hi", "layer": 2}, 400, "layer", ["layer 2 does not exist", "2 layers"]),
    ({"prompt": "hi", "layer": -3}, 400, "layer", ["layer -3 does not exist"]),
    ({"prompt": "hi", "head": 2}, 400, "head", ["head 2 does not exist", "2 heads"]),
    ({"prompt": "hi", "head": -1}, 400, "head", ["head -1 does not exist"]),
    ({"prompt": "hi", "layer": "1"}, 400, "layer", ["layer"]),
    ({"prompt": "hi", "top_features": 0}, 400, "top_features", ["top_features"]),
    ({"prompt": "hi", "top_features": 33}, 400, "top_features", ["top_features"]),
    ({"prompt": ["hi"]}, 400, "prompt", ["prompt"]),
    ({}, 400, "prompt", ["prompt"]),
    ({"prompt": "hi", "model": "other"}, 404, "model", ["'other' does not exist"]),
])
def test_bad_inspections_are_4xx_in_openai_s_shape(server: str, body: dict, status: int, param: str,
                                                   words: list[str]) -> None:
    got, reply = post(server, body)
    if status == 400:
        assert_openai_error(got, reply, *words)
    else:
        assert got == status and all(word in reply["error"]["message"] for word in words), reply
    assert reply["error"]["param"] == param, reply


def test_inspect_needs_the_api_key(server: str) -> None:
    for key in (None, "wrong"):
        status, reply = post(server, {"prompt": "hi"}, key=key)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key", reply


def test_max_prompt_tokens_bounds_an_inspection(models: tuple[GPT2, GPT2]) -> None:
    with serving(models[1], max_prompt_tokens=8) as (url, _):
        assert post(url, {"prompt": "x" * 8}, key=None)[0] == 200
        assert_openai_error(*post(url, {"prompt": "x" * 9}, key=None), "9 tokens long", "limit of 8 tokens")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_quantised_model_is_refused(models: tuple[GPT2, GPT2], precision: str) -> None:
    with serving(built(models[0], precision)) as (url, _):
        status, reply = post(url, {"prompt": "hi"}, key=None)
        assert status == 501, reply
        error = reply["error"]
        assert error["code"] == "inspection_unavailable" and error["type"] == "server_error", error
        assert f"quantised to {precision}" in error["message"] and "fp32 or bf16" in error["message"], error
        connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=SAFETY_S)
        connection.request("GET", "/")
        page = connection.getresponse().read().decode()
        connection.close()
        assert '"available": false' in page and f"quantised to {precision}" in page


def test_an_inspection_runs_beside_generation(server: str, models: tuple[GPT2, GPT2],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Held in its worker thread, an inspection leaves the event loop and the engine free: a completion
    is answered meanwhile."""
    import openai

    started, go = threading.Event(), threading.Event()
    lens = analysis.logit_lens

    def held(*args: object) -> torch.Tensor:
        started.set()
        assert go.wait(SAFETY_S)
        return lens(*args)

    monkeypatch.setattr(analysis, "logit_lens", held)
    answer: list[tuple[int, dict]] = []
    thread = threading.Thread(target=lambda: answer.append(post(server, {"prompt": PROMPT})))
    thread.start()
    try:
        assert started.wait(SAFETY_S)
        client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=SAFETY_S)
        completion = client.completions.create(model="tiny", prompt="hi", max_tokens=4)
        assert completion.usage.completion_tokens == 4
    finally:
        go.set()
        thread.join(SAFETY_S)
    assert answer[0][0] == 200


# ----------------------------------------------------------------------------------------------------
# An SAE's features (the real sae-lens makes it)


def test_sae_features_are_top_features(models: tuple[GPT2, GPT2], tmp_path: Path) -> None:
    pytest.importorskip("sae_lens")
    from test_sae import saved, their_sae

    from gpt2.interpretability.sae import SAE, top_features

    plain = models[0]
    sae = SAE.load(saved(their_sae("standard", "blocks.1.hook_resid_pre", 128, d_sae=48), tmp_path / "sae"))
    with serving(models[1], sae=sae) as (url, _):
        status, reply = post(url, {"prompt": PROMPT, "top_features": 3}, key=None)
    assert status == 200, reply
    assert reply["sae"]["hook_name"] == "blocks.1.hook_resid_pre" and reply["sae"]["d_sae"] == 48
    expected = top_features(plain, sae, PROMPT, k=3)
    given = reply["sae"]["features"]
    assert len(given) == len(expected) == len(PROMPT)
    assert sum(map(len, given)) > 0
    for row, theirs in zip(given, expected, strict=True):
        assert [f["id"] for f in row] == [i for i, _ in theirs.features]
        assert all(abs(f["activation"] - a) < 1e-5 for f, (_, a) in zip(row, theirs.features, strict=True))


def test_an_sae_that_does_not_fit_is_one_line_at_start(models: tuple[GPT2, GPT2], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sae_lens")
    from test_sae import saved, their_sae

    from gpt2.interpretability.sae import SAE
    from gpt2.serving import Engine, create_app

    wide = saved(their_sae("standard", "blocks.0.hook_resid_pre", 64), tmp_path / "wide")
    deep = saved(their_sae("standard", "blocks.5.hook_resid_pre", 128), tmp_path / "deep")
    engine = Engine(models[1], BYTES, max_batch_size=1)
    with pytest.raises(UserError, match="d_in=64"):
        create_app(engine, model_name="tiny", sae=SAE.load(wide))
    directory = tmp_path / "model"
    models[0].save_pretrained(directory)
    monkeypatch.setattr("gpt2.cli.serve._serve", lambda *_: pytest.fail("served an SAE that does not fit"))
    for sae, words in ((wide, ["d_in=64", "128 wide", "another model"]), (deep, ["block 5", "2 blocks"]),
                       (tmp_path, ["not an SAE directory"])):
        code = main(["serve", "--model", str(directory), "--sae", str(sae)])
        assert_one_line_error(code, capsys.readouterr().err, *words)
    quantised = Engine(built(models[0], "int8"), BYTES, max_batch_size=1)
    with pytest.raises(UserError, match="--sae reads the model's activations, and the model is quantised"):
        create_app(quantised, model_name="tiny", sae=SAE.load(deep))
