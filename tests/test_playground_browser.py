"""The playground page at / in a real headless browser (Debian's chromium, driven by Selenium): type a
prompt, set the sampling fields, click Generate, and see the text stream in, each piece with its
tokens' probabilities."""

from __future__ import annotations

import pytest
from conftest import BYTES, Hold, endless_model, serving, wait_for

from gpt2.generation.sampling import GenerationConfig, generate_text

webdriver = pytest.importorskip("selenium.webdriver")


def test_playground_streams_the_completion(browser) -> None:
    model = endless_model()
    prompt, new = "Once upon a time", 40
    with serving(model) as (url, _), Hold(model) as hold:
        browser.get(f"{url}/")
        assert "gpt2 playground" in browser.title
        by_id = webdriver.common.by.By.ID
        box = browser.find_element(by_id, "prompt")
        box.clear()
        box.send_keys(prompt)
        penalties = {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.4}
        for field, value in (("max_tokens", new), ("temperature", 0), *penalties.items()):
            element = browser.find_element(by_id, field)
            element.clear()
            element.send_keys(str(value))
        # Record what the page shows each time the output changes, to see the text arrive in pieces.
        browser.execute_script("""
            window.seen = [];
            new MutationObserver(() => window.seen.push([
                document.querySelectorAll('#output span.token').length,
                document.getElementById('status').textContent,
            ])).observe(document.getElementById('output'), {childList: true});
        """)
        browser.find_element(by_id, "generate").click()

        def shown_while_generating() -> set[int]:
            seen = browser.execute_script("return window.seen")
            return {count for count, state in seen if state == "generating..." and count > 0}

        # The engine held after 10 tokens, then after 20: the page shows each part while it generates.
        hold.wait()  # at the prompt
        hold.allow(10)
        hold.wait()
        wait_for(lambda: len(shown_while_generating()) >= 1, "the page to show the first 10 tokens")
        hold.allow(10)
        hold.wait()
        wait_for(lambda: len(shown_while_generating()) >= 2, "the page to show the next 10 tokens")
        hold.release()
        wait_for(lambda: browser.find_element(by_id, "status").text.startswith(("done", "error")),
                 "the playground to finish")
        status = browser.find_element(by_id, "status").text
        assert status == f"done: {new} tokens (max tokens reached)", status
        shown = browser.execute_script(
            "return Array.from(document.querySelectorAll('#output span.token'), s => s.textContent).join('')")
        assert (
            shown
            == generate_text(
                model, BYTES, prompt, GenerationConfig(temperature=0, max_new_tokens=new, **penalties)
            )[0]
        )
        assert (
            shown
            != generate_text(model, BYTES, prompt, GenerationConfig(temperature=0, max_new_tokens=new))[0]
        )
        seen = browser.execute_script("return window.seen")
        while_generating = shown_while_generating()
        assert len(while_generating) > 1, f"the text did not arrive in pieces: {seen}"
        titles = browser.execute_script(
            "return Array.from(document.querySelectorAll('#output span.token'), s => s.title)"
        )
        assert all("p = " in t and t.endswith("%") for t in titles if t)
        # every generated token's probability, also of those that end inside a character ("\ufffd" here)
        assert sum(t.count("p = ") for t in titles) == new, titles
