"""Chat templates render as transformers renders them: for GPT-2's real tokenizer saved with our
template (``save_pretrained``), and for a template of the user's own given as a file,
``AutoTokenizer.from_pretrained(dir).apply_chat_template`` gives ``ChatTemplate.encode``'s ids (with
and without the generation prompt) and its trained mask (``return_assistant_tokens_mask``), over
conversations with system messages, several turns, unicode, empty and whitespace-heavy contents."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2.generation.prompts import Templated, fit_messages
from gpt2.generation.sampling import encode_prompt
from gpt2.tokenizer.bpe import Tokenizer
from gpt2.tokenizer.chat_template import GPT2_CHAT_TEMPLATE, ChatTemplate
from gpt2.util.errors import UserError

transformers = pytest.importorskip("transformers")


def _turns(*contents: str) -> list[dict[str, str]]:
    """Alternating user and assistant messages with these contents."""
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "one turn": _turns("What is the capital of France?", "Paris."),
    "system and several turns": [SYSTEM, *_turns("Hi!", "Hello.", "How are you?", "Fine, thanks.",
                                                 "Bye.", "Goodbye!")],
    "unicode": [{"role": "system", "content": "Réponds en français, s'il te plaît."},
                *_turns("Où est la gare ? Ça va très bien.", "À gauche, près du café.",
                        "日本語で答えて。東京はどこ？", "東京は日本の首都です。",
                        "Emoji? 🎉👍🏽 and 🇫🇷", "Sure: 😀 👨‍👩‍👧 ✨")],
    "empty contents": [{"role": "system", "content": ""}, *_turns("", "", "still here?", "")],
    "whitespace": [{"role": "system", "content": "  \n\n  padded  \n"},
                   *_turns("  leading and trailing  ", "\n\nnew lines\n\n\n", "tabs\t\tand   runs" + " " * 80,
                           "a\r\nwindows line\r\n" + "\n" * 40, "end with a space ", " ")],
}
# A template of the user's own: other words, the Jinja features transformers' settings change
# (trim_blocks, lstrip_blocks, filters, loop variables) and a generation block.
CUSTOM_TEMPLATE = """{%- for message in messages %}
    {%- if message.role == 'system' %}
### System
{{ message.content | trim }}

    {% elif message.role == 'user' %}
### User {{ loop.index }}
{{ message.content }}
    {% else %}
### Reply
{% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}

    {% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
### Reply
{% endif %}"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, gpt2_ranks_file: Path) -> Path:
    """GPT-2's real tokenizer saved with our template."""
    tokenizer = Tokenizer.from_file(gpt2_ranks_file)  # a copy of its own: the shared one stays as it is
    tokenizer.chat_template = GPT2_CHAT_TEMPLATE
    directory = tmp_path_factory.mktemp("gpt2-chat")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ours(saved: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(saved)


@pytest.fixture(scope="module")
def theirs(saved: Path):
    return transformers.AutoTokenizer.from_pretrained(saved)


def _hf(tokenizer, messages: list[dict[str, str]], **options) -> tuple[list[int], list[bool] | None]:
    """transformers' ids and (when asked for) assistant mask of ``messages``."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **options)
    mask = out.get("assistant_masks")
    return list(out["input_ids"]), None if mask is None else [bool(m) for m in mask]


def test_the_saved_tokenizer_carries_the_template(ours: Tokenizer, theirs) -> None:
    assert ours.chat_template == GPT2_CHAT_TEMPLATE == theirs.chat_template
    assert ChatTemplate.of(ours).source == GPT2_CHAT_TEMPLATE


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_gpt2_template_ids_and_masks_are_transformers(name: str, ours: Tokenizer, theirs) -> None:
    template = ChatTemplate.of(ours)
    messages = CONVERSATIONS[name]
    ids, mask = template.encode(messages, ours)
    assert (ids, mask) == _hf(theirs, messages, return_assistant_tokens_mask=True)
    assert any(mask) and not all(mask)
    prompt = _hf(theirs, messages[:-1], add_generation_prompt=True)[0]
    assert template.prompt_ids(messages[:-1], ours) == prompt
    assert template.encode(messages, ours, add_generation_prompt=True)[0] == _hf(
        theirs, messages, add_generation_prompt=True)[0]
    # The prompt text sampling encodes (only <|endoftext|> special) is the template's ids.
    text, _ = template.render(messages[:-1], ours, add_generation_prompt=True)
    assert encode_prompt(ours, text) == template.prompt_ids(messages[:-1], ours)


def test_the_trained_part_is_the_reply_and_its_end_of_turn(ours: Tokenizer) -> None:
    template = ChatTemplate.of(ours)
    ids, mask = template.encode(_turns("Hi!", "Hello there."), ours)
    assert ours.decode([t for t, m in zip(ids, mask, strict=True) if m]) == " Hello there.<|endoftext|>"


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_a_template_file_of_the_user_s_own_is_rendered_as_transformers_does(
    name: str, tmp_path: Path, ours: Tokenizer, theirs
) -> None:
    path = tmp_path / "chat_template.jinja"
    path.write_text(CUSTOM_TEMPLATE, encoding="utf-8")
    template = ChatTemplate.read(path)
    messages = CONVERSATIONS[name]
    ids, mask = template.encode(messages, ours)
    expected = _hf(theirs, messages, chat_template=CUSTOM_TEMPLATE, return_assistant_tokens_mask=True)
    assert (ids, mask) == expected
    assert any(mask)
    assert template.prompt_ids(messages[:-1], ours) == _hf(
        theirs, messages[:-1], chat_template=CUSTOM_TEMPLATE, add_generation_prompt=True)[0]
    conversation = [{"role": "system", "content": " S "}, *_turns("Hi", "Yo", "Q")]
    assert ours.decode(template.prompt_ids(conversation, ours)) == (
        "### System\nS\n\n### User 2\nHi\n### Reply\nYo<|endoftext|>\n### User 4\nQ\n### Reply\n")


def test_the_chat_prompt_is_the_template_s_and_drops_the_oldest_turns(ours: Tokenizer, theirs) -> None:
    chat = Templated(ChatTemplate.of(ours), system=SYSTEM["content"])
    turns = [("First question, rather long " * 4, "First answer."), ("Second?", "Second.")]
    full = chat.prompt(turns, "Third?", ours, budget=10_000)
    messages = [SYSTEM, *_turns(turns[0][0], turns[0][1], turns[1][0], turns[1][1], "Third?")]
    assert full == _hf(theirs, messages, add_generation_prompt=True)[0]
    trimmed = chat.prompt(turns, "Third?", ours, budget=len(full) - 1)
    assert trimmed == _hf(theirs, [SYSTEM, *messages[3:]], add_generation_prompt=True)[0]
    with pytest.raises(UserError, match="too long for the context window"):
        chat.prompt(turns, "Third?", ours, budget=10)


def test_fitting_drops_whole_turns_and_keeps_system_messages(ours: Tokenizer) -> None:
    template = ChatTemplate.of(ours)
    messages = [SYSTEM, *_turns("a " * 30, "b " * 30, "c?")]
    kept = fit_messages(template, messages, ours, budget=len(template.prompt_ids(messages, ours)) - 1)
    assert kept == [SYSTEM, messages[-1]]  # the assistant's reply went with its message
    assert fit_messages(template, messages, ours, budget=10_000) == messages
