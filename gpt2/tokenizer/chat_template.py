"""Chat templates: conversations to text, token ids and loss masks, as transformers renders them.

GPT-2 ships no chat template; ``GPT2_CHAT_TEMPLATE`` is ours. It uses only GPT-2's own tokens (no
new vocabulary, so published weights fine-tune directly) and ``<|endoftext|>`` as the end-of-turn
marker, so generation stops where GPT-2 always stops::

    <|endoftext|>You are a helpful assistant.        (a system message, if any, opens it)

    User: What is the capital of France?
    Assistant: Paris.<|endoftext|>
    User: And of Italy?
    Assistant:                                       (the generation prompt)

The reply follows ``Assistant:`` after a space, as GPT-2's tokens start words with their space.
A template is Jinja, rendered exactly as ``transformers``' ``apply_chat_template`` renders it (the
same sandboxed environment and settings, the same variables), so ``AutoTokenizer.from_pretrained(
dir).apply_chat_template(messages)`` gives our ids for any template saved in tokenizer_config.json.
The assistant's part of each turn is wrapped in ``{% generation %}...{% endgeneration %}``, the tag
transformers (``return_assistant_tokens_mask``) and TRL (``assistant_only_loss``) read: its tokens,
end-of-turn marker included, are the ones a fine-tune trains on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gpt2.tokenizer.bpe import ENDOFTEXT, Tokenizer
from gpt2.util.errors import UserError

# The plain transcript's opening (``gpt2.generation.prompts.Transcript``) when no system message is given.
CHAT_HEADER = "A conversation between a curious user and a helpful assistant.\n\n"

# The roles a message may have, as OpenAI's chat API takes them, with the role each is rendered as:
# ``developer`` is what newer OpenAI models call the system message.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
Message = dict[str, str]

GPT2_CHAT_TEMPLATE = (
    "{{- eos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- 'User: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'Assistant:' -}}"
    "{%- generation -%}"
    "{{- (' ' + message['content'] if message['content'] else '') + eos_token -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown role ' + message['role'] + '; use system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)

Span = tuple[int, int]  # [start, end) character offsets of a generation block in the rendered text
_spans: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar("chat_template_spans", default=None)


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged and, while a rendering
    is being tracked, records where in the text the body landed."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own declaration)

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller: Any) -> str:
        text = caller()
        tracking = _spans.get()
        if tracking is not None:
            rendered, spans = tracking
            start = sum(len(block) for block in rendered)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: sandboxed, ``trim_blocks`` and
    ``lstrip_blocks``, loop controls, and its globals (``raise_exception``, ``strftime_now``) and
    ``tojson`` filter (which does not escape HTML)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys))
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template; ``source`` is its Jinja text, ``origin`` names it in errors."""

    def __init__(self, source: str, origin: str = "the chat template") -> None:
        self.source, self.origin = source, origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise UserError(f"{origin} is not a valid Jinja template (line {e.lineno}: {e.message}); "
                            "fix it") from None
        self.marks_replies = "generation" in source and "endgeneration" in source

    @classmethod
    def read(cls, path: str | Path) -> ChatTemplate:
        """A template from a Jinja file (e.g. ``chat_template.jinja``)."""
        try:
            return cls(Path(path).read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read the chat template ({e})") from None

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> ChatTemplate | None:
        """The tokenizer's own template (from its tokenizer_config.json), or None."""
        if tokenizer.chat_template is None:
            return None
        return cls(tokenizer.chat_template, f"the chat template of {tokenizer.source}")

    def render(
        self, messages: Sequence[Message], tokenizer: Tokenizer, *, add_generation_prompt: bool = False
    ) -> tuple[str, list[Span]]:
        """The conversation as text, and where the assistant's parts (generation blocks) are in it."""
        messages = check_messages(messages)
        names = {"eos_token": ENDOFTEXT, "bos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}  # as saved
        rendered: list[str] = []
        spans: list[Span] = []
        with _tracking(rendered, spans):
            try:
                for block in self._template.generate(messages=[dict(m) for m in messages],
                                                     add_generation_prompt=add_generation_prompt, **names):
                    rendered.append(block)
            except jinja2.exceptions.TemplateError as e:
                raise UserError(f"{self.origin} failed to render the conversation ({e}); fix the "
                                "template or the messages") from None
            except Exception as e:  # a template is code: a type error there is the template's fault
                raise UserError(f"{self.origin} failed to render the conversation ({type(e).__name__}: "
                                f"{e}); fix the template") from None
        return "".join(rendered), spans

    def encode(
        self, messages: Sequence[Message], tokenizer: Tokenizer, *, add_generation_prompt: bool = False,
        trained_turns: Sequence[bool] | None = None,
    ) -> tuple[list[int], list[bool]]:
        """The conversation's ids (special tokens in the text are special, as transformers encodes a
        rendered chat) and, for each, whether it lies in an assistant's part: a token overlapping a
        generation block is trained on, as transformers' ``assistant_masks``. ``trained_turns`` says,
        for each assistant message in order, whether its part is (OpenAI's ``"weight"``; default: all)."""
        text, spans = self.render(messages, tokenizer, add_generation_prompt=add_generation_prompt)
        if trained_turns is not None and not all(trained_turns):
            if len(spans) != len(trained_turns):
                raise UserError(f"{self.origin} marks {len(spans)} {{% generation %}} block(s) for "
                                f"{len(trained_turns)} assistant message(s), so those of weight 0 cannot "
                                "be left out; wrap each assistant message in one block")
            spans = [span for span, trained in zip(spans, trained_turns, strict=True) if trained]
        ids = _encode(text, tokenizer)
        return ids, _overlapping(ids, text, spans, tokenizer)

    def prompt_ids(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
        """The ids that ask the model for the next assistant turn after ``messages`` (no mask: this
        is what chat and serving call, once per turn dropped)."""
        return _encode(self.render(messages, tokenizer, add_generation_prompt=True)[0], tokenizer)


def _encode(text: str, tokenizer: Tokenizer) -> list[int]:
    """A rendered chat's ids: special tokens in it are special, as transformers encodes one."""
    return tokenizer.encode(text, allowed_special=frozenset(tokenizer.special_tokens))


@contextmanager
def _tracking(rendered: list[str], spans: list[Span]) -> Iterator[None]:
    token = _spans.set((rendered, spans))
    try:
        yield
    finally:
        _spans.reset(token)


def _overlapping(ids: list[int], text: str, spans: list[Span], tokenizer: Tokenizer) -> list[bool]:
    """For each token, whether its bytes overlap one of the character ``spans`` of ``text``."""
    byte_spans = [(len(text[:s].encode("utf-8")), len(text[:e].encode("utf-8"))) for s, e in spans if e > s]
    mask = []
    start = 0
    for token in ids:
        end = start + len(tokenizer.decode_bytes([token]))
        mask.append(any(start < e and end > s for s, e in byte_spans))
        start = end
    return mask


def check_messages(messages: object, where: str = "the conversation") -> list[Message]:
    """``messages`` as a list of {"role", "content"} string dicts, the shapes OpenAI's chat API takes
    made one (the rule shared by training data and the server's ``gpt2.serving.protocol.ChatMessage``):
    ``developer`` becomes ``system`` (``ROLES``), content given as text parts is joined
    (``message_text``). A one-line error names the problem: not a list, an unknown role, content that
    is neither."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}: message {i} is not an object; give "
                            '{"role": ..., "content": ...}')
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise UserError(f"{where}: message {i} has unknown role {role!r}; use system, developer, user "
                            "or assistant")
        checked.append({"role": ROLES[role],
                        "content": message_text(message.get("content"), f"{where}: message {i} ({role})")})
    return checked


def message_text(content: object, where: str) -> str:
    """A message's text: its content, a string, or OpenAI's list of text parts
    (``[{"type": "text", "text": ...}]``) joined by newlines, as the server reads them."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(_is_text_part(part) for part in content):
        return "\n".join(part["text"] for part in content)
    got = "a list of other than text parts" if isinstance(content, list) else _JSON_TYPES.get(
        type(content), type(content).__name__)
    raise UserError(f"{where} has {got} as content; content must be a string or a list of "
                    '{"type": "text", "text": "..."} parts')


_JSON_TYPES = {dict: "an object", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def _is_text_part(part: object) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
