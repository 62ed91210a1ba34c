"""The playground's inside view in a real headless browser (Debian's chromium driven by Selenium, as in
test_playground_browser.py): the Inside tab looks inside the prompt through /inspect and draws the
attention heat map (tokens x tokens, labelled with the prompt's tokens, each cell the library's
attention weight), the logit-lens grid ((layers + 1) x positions, each cell the token ``logit_lens``
ranks first) and an SAE's features per token; on a quantised model the tab is disabled, saying why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BYTES, serving, wait_for
from test_inspect_route import built, plain_and_served

from gpt2.interpretability.analysis import attention_patterns, logit_lens

webdriver = pytest.importorskip("selenium.webdriver")
Select = pytest.importorskip("selenium.webdriver.support.select").Select

PROMPT = "the cat sat on the mat"
KEY = "inside-key"

READ_TABLE = """
const table = document.getElementById(arguments[0]);
const cells = (row, tag) => Array.from(row.querySelectorAll(tag), c => c.textContent);
return {
    caption: table.caption ? table.caption.textContent : null,
    head: table.tHead ? cells(table.tHead.rows[0], "th") : [],
    labels: Array.from(table.tBodies[0].rows, r => cells(r, "th")),
    cells: Array.from(table.tBodies[0].rows, r => cells(r, "td")),
    titles: Array.from(table.tBodies[0].rows, r => Array.from(r.querySelectorAll("td"), c => c.title)),
};
"""


def label(token: int) -> str:
    """A token as the page labels it: its text as JSON (JavaScript's JSON.stringify)."""
    return json.dumps(BYTES.decode([token]), ensure_ascii=False)


def by_id(browser: object, name: str) -> object:
    return browser.find_element(webdriver.common.by.By.ID, name)


def look_inside(browser: object, url: str, prompt: str, key: str | None = None) -> None:
    """Open the playground, type ``prompt``, open the Inside tab and look inside; wait for the answer."""
    browser.get(f"{url}/")
    if key is not None:
        by_id(browser, "api_key").send_keys(key)
    box = by_id(browser, "prompt")
    box.clear()
    box.send_keys(prompt)
    by_id(browser, "tab_inside").click()
    assert not by_id(browser, "inside_panel").get_attribute("hidden")
    assert by_id(browser, "generate_panel").get_attribute("hidden")
    by_id(browser, "inspect").click()
    wait_for(lambda: by_id(browser, "inside_status").text.startswith(("done", "error")), "the inspection")


def shares(titles: list[list[str]]) -> list[list[float]]:
    """The attention weights (percent) the heat map's cells show on hover, "... → ...: 12.3%"."""
    return [[float(title.rsplit(": ", 1)[1].removesuffix("%")) for title in row] for row in titles]


def test_the_inside_view_draws_the_heat_map_and_the_logit_lens(browser) -> None:
    plain, served = plain_and_served()
    ids = BYTES.encode(PROMPT)
    labels = [label(t) for t in ids]
    with serving(served, api_key=KEY) as (url, _):
        look_inside(browser, url, PROMPT, KEY)
        status = by_id(browser, "inside_status").text
        assert status == f"done: {len(ids)} tokens, layer 0", status
        # The heat map: layer 0, head 0 to start with; a row per query, a cell per key.
        heat = browser.execute_script(READ_TABLE, "attention")
        assert heat["caption"].startswith("layer 0, head 0")
        assert heat["head"] == ["query \\ key", *labels]
        assert heat["labels"] == [[text] for text in labels]
        assert [len(row) for row in heat["cells"]] == [len(ids)] * len(ids)
        patterns = attention_patterns(plain, ids, 0)
        for row, weights in zip(shares(heat["titles"]), (100 * patterns[0]).tolist(), strict=True):
            assert max(abs(a - b) for a, b in zip(row, weights, strict=True)) <= 0.051
        # The logit lens: a row per layer and the output, a cell per position, the top token's text.
        lens = browser.execute_script(READ_TABLE, "lens")
        assert lens["head"] == ["layer \\ position", *labels]
        assert lens["labels"] == [["0_pre"], ["1_pre"], ["final_post"]]
        top = logit_lens(plain, ids).argmax(-1).tolist()
        assert lens["cells"] == [[label(t) for t in row] for row in top]
        assert by_id(browser, "features_part").get_attribute("hidden")  # no SAE
        # Another head: drawn from the same answer; another layer: asked for.
        Select(by_id(browser, "inside_head")).select_by_value("1")
        heat = browser.execute_script(READ_TABLE, "attention")
        assert heat["caption"].startswith("layer 0, head 1")
        for row, weights in zip(shares(heat["titles"]), (100 * patterns[1]).tolist(), strict=True):
            assert max(abs(a - b) for a, b in zip(row, weights, strict=True)) <= 0.051
        Select(by_id(browser, "inside_layer")).select_by_value("1")
        wait_for(lambda: by_id(browser, "inside_status").text.endswith("layer 1"), "layer 1's patterns")
        heat = browser.execute_script(READ_TABLE, "attention")
        assert heat["caption"].startswith("layer 1, head 1")
        last = attention_patterns(plain, ids, 1)[1]
        for row, weights in zip(shares(heat["titles"]), (100 * last).tolist(), strict=True):
            assert max(abs(a - b) for a, b in zip(row, weights, strict=True)) <= 0.051
        # An error is shown, not drawn: a prompt over the limit.
        look_inside(browser, url, "x" * 100, KEY)
        assert by_id(browser, "inside_status").text.startswith("error 400: the prompt is 100 tokens long")


def test_the_inside_view_lists_sae_features(browser, tmp_path: Path) -> None:
    pytest.importorskip("sae_lens")
    from test_sae import saved, their_sae

    from gpt2.interpretability.sae import SAE, top_features

    plain, served = plain_and_served()
    sae = SAE.load(saved(their_sae("standard", "blocks.1.hook_resid_pre", 128, d_sae=48), tmp_path / "sae"))
    with serving(served, sae=sae) as (url, _):
        look_inside(browser, url, PROMPT)
        assert by_id(browser, "inside_status").text.startswith("done")
        assert not by_id(browser, "features_part").get_attribute("hidden")
        assert by_id(browser, "features_hook").text == "blocks.1.hook_resid_pre"
        features = browser.execute_script(READ_TABLE, "features")
    expected = top_features(plain, sae, PROMPT, k=5)
    assert features["labels"] == [[label(t)] for t in BYTES.encode(PROMPT)]
    assert features["cells"] == [[f"#{i} {a:.3f}" for i, a in row.features] for row in expected]
    assert any(features["cells"])


def test_the_inside_view_is_disabled_on_a_quantised_model(browser) -> None:
    plain, _ = plain_and_served()
    with serving(built(plain, "int8")) as (url, _):
        browser.get(f"{url}/")
        tab = by_id(browser, "tab_inside")
        assert not tab.is_enabled()
        assert "quantised to int8" in by_id(browser, "inside_unavailable").text
        assert by_id(browser, "inside_panel").get_attribute("hidden")
