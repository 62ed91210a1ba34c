"""The paper's zero-shot task prompts (Radford et al. 2019, section 3) and the chat prompt format.

Each task is a prompt that makes the task the natural continuation, the sampling the paper used,
and a rule for cutting the answer out of what comes back:

- summarize: the article, then ``TL;DR:``; top-k 2, 100 tokens; the first 3 sentences.
- translate: example pairs ``english sentence = french sentence``, one per line, then
  ``english sentence =``; greedy; the first sentence.
- answer: the document, the dialogue so far as ``Q:``/``A:`` lines, the question, then ``A:``;
  greedy; the answer ends at the line's end.

Chat has two formats. A model whose tokenizer has a chat template (``gpt2.tokenizer.chat_template``; a model
fine-tuned for chat) gets its conversation rendered by it, as transformers would: the system message,
the turns, then the template's generation prompt; a reply ends at the end-of-turn token
(``<|endoftext|>``) and may span lines. A base model (GPT-2 was never tuned for chat) gets a plain
transcript to continue::

    A conversation between a curious user and a helpful assistant.

    User: <message>
    Assistant: <reply>
    User: <message>
    Assistant:

where the reply ends at the end of its line. In both, the oldest turns are dropped (the header or
system message is kept) until the prompt and the reply fit in the context window.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from gpt2.generation.sampling import (
    GenerationConfig,
    TextTokenizer,
    encode_prompt,
    generate_text,
    stream_text,
)
from gpt2.generation.speculative import Drafter
from gpt2.model import Transformer
from gpt2.tokenizer.bpe import Tokenizer
from gpt2.tokenizer.chat_template import CHAT_HEADER, ChatTemplate, Message
from gpt2.util.errors import UserError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

# The paper's decoding for each task.
SUMMARY = GenerationConfig.from_preset("summarize", truncate=True)
TRANSLATION = GenerationConfig.from_preset("greedy", max_new_tokens=64, stop_strings=("\n",), truncate=True)
ANSWER = GenerationConfig.from_preset("greedy", max_new_tokens=48, stop_strings=("\n",), truncate=True)


def first_sentences(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text`` (a sentence ends at . ! or ? followed by a space)."""
    text = " ".join(text.split())  # generated text wraps lines anywhere
    return " ".join(_SENTENCE_END.split(text, maxsplit=n)[:n]).strip()


# ----------------------------------------------------------------------------------------------------
# Summarisation


def summarize_prompt(article: str) -> str:
    return article.strip() + "\nTL;DR:"


def summarize(model: Transformer, tokenizer: TextTokenizer, article: str, *, seed: int | None = None,
              draft: Drafter | None = None) -> str:
    """A summary of ``article``: 100 tokens with top-k 2 after "TL;DR:", cut to 3 sentences. ``draft``:
    decode speculatively (``gpt2.generation.speculative``; the same distribution)."""
    (text,) = generate_text(model, tokenizer, summarize_prompt(article), SUMMARY.replace(seed=seed), draft)
    return first_sentences(text, 3)


# ----------------------------------------------------------------------------------------------------
# Translation

# A few pairs to show the format (our own; the paper used WMT-14 English-French pairs).
DEFAULT_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("The cat is sleeping on the chair.", "Le chat dort sur la chaise."),
    ("I would like a cup of coffee, please.", "Je voudrais une tasse de café, s'il vous plaît."),
    ("Where is the train station?", "Où est la gare ?"),
    ("We are going to the beach tomorrow.", "Nous allons à la plage demain."),
)


def translate_prompt(sentence: str, examples: Sequence[tuple[str, str]] = DEFAULT_EXAMPLES) -> str:
    pairs = "".join(f"{source} = {target}\n" for source, target in examples)
    return f"{pairs}{sentence.strip()} ="


def read_pairs(
    text: str, source: str, form: str = "english sentence = french sentence"
) -> list[tuple[str, str]]:
    """Pairs from lines of the form ``left = right`` (blank lines skipped); ``form`` shows the form
    in error messages about the file ``source``."""
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            left, sep, right = line.partition(" = ")
            if not sep or not left.strip() or not right.strip():
                raise UserError(
                    f"{source}:{number}: expected a line '{form}', got {line!r}"
                )
            pairs.append((left.strip(), right.strip()))
    if not pairs:
        raise UserError(f"{source}: no pairs found; write one '{form}' per line")
    return pairs


def translate(
    model: Transformer,
    tokenizer: TextTokenizer,
    sentence: str,
    examples: Sequence[tuple[str, str]] = DEFAULT_EXAMPLES,
    draft: Drafter | None = None,
) -> str:
    """The translation of ``sentence``: greedy decoding after the example pairs, first sentence
    (``draft``: speculatively, the same text)."""
    (text,) = generate_text(model, tokenizer, translate_prompt(sentence, examples), TRANSLATION, draft)
    return first_sentences(text, 1)


# ----------------------------------------------------------------------------------------------------
# Question answering (CoQA-style)


def answer_prompt(document: str, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
    turns = "".join(f"Q: {q}\nA: {a}\n" for q, a in history)
    return f"{document.strip()}\n\n{turns}Q: {question.strip()}\nA:"


def answer(
    model: Transformer,
    tokenizer: TextTokenizer,
    document: str,
    question: str,
    history: Sequence[tuple[str, str]] = (),
    draft: Drafter | None = None,
) -> str:
    """The answer to ``question`` about ``document`` after the dialogue ``history``: greedy, one line
    (``draft``: speculatively, the same text)."""
    (text,) = generate_text(model, tokenizer, answer_prompt(document, question, history), ANSWER, draft)
    return text.strip()


# ----------------------------------------------------------------------------------------------------
# Chat

CHAT_STOPS = ("\n",)  # a reply is one line; this also stops the model writing the next "User:"


class Transcript:
    """The plain transcript for a base model: ``header``, then ``User: ...`` / ``Assistant: ...``
    lines; a reply is one line."""

    stops = CHAT_STOPS  # a reply is one line; this also stops the model writing the next "User:"

    def __init__(self, header: str = CHAT_HEADER) -> None:
        self.header = header

    def prompt(self, turns: Sequence[tuple[str, str]], message: str, tokenizer: TextTokenizer,
               budget: int) -> str:
        """The transcript of ``turns`` ending in ``message`` and ``Assistant:``, oldest turns dropped
        until it is at most ``budget`` tokens long."""
        last = f"User: {message}\nAssistant:"
        kept = list(turns)
        while True:
            text = self.header + "".join(f"User: {u}\nAssistant: {a}\n" for u, a in kept) + last
            if len(encode_prompt(tokenizer, text)) <= budget:
                return text
            if not kept:
                raise _too_long(budget)
            kept.pop(0)

    def pieces(self, pieces: Iterator[str]) -> Iterator[str]:
        """The reply's pieces as they are shown (as generated)."""
        return pieces

    def reply(self, text: str) -> str:
        """The reply as it joins the transcript: without its spaces around."""
        return text.strip()


class Templated:
    """A chat template's format (``gpt2.tokenizer.chat_template``): ``system`` (if not None) as the system
    message, the turns as user and assistant messages, then the generation prompt; a reply ends at the
    end-of-turn token and may span lines. The one space the template puts after ``Assistant:`` is not
    part of the reply."""

    stops: tuple[str, ...] = ()

    def __init__(self, template: ChatTemplate, system: str | None = None) -> None:
        self.template, self.system = template, system

    def prompt(self, turns: Sequence[tuple[str, str]], message: str, tokenizer: Tokenizer,
               budget: int) -> list[int]:
        """The ids of the conversation asking for the reply to ``message``, oldest turns dropped
        until it is at most ``budget`` tokens long."""
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        for user, assistant in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": message})
        return self.template.prompt_ids(fit_messages(self.template, messages, tokenizer, budget), tokenizer)

    def pieces(self, pieces: Iterator[str]) -> Iterator[str]:
        """The reply's pieces without the one leading space."""
        for piece in pieces:
            if piece:
                yield piece.removeprefix(" ")
                break
        yield from pieces

    def reply(self, text: str) -> str:
        return text


def chat_format(template: ChatTemplate | None, system: str | None = None) -> Transcript | Templated:
    """The format for a model with ``template`` (None: a base model's transcript, ``system`` its
    header line; else the template's, ``system`` its system message)."""
    if template is not None:
        return Templated(template, system)
    return Transcript(CHAT_HEADER if system is None else system.strip() + "\n\n")


def fit_messages(template: ChatTemplate, messages: Sequence[Message], tokenizer: Tokenizer,
                 budget: int) -> list[Message]:
    """``messages`` with the oldest turns dropped (system messages and the last message kept, and a
    conversation that then starts with an assistant message loses that too) until the template's
    prompt for the next reply is at most ``budget`` tokens long."""
    kept = list(messages)
    while len(template.prompt_ids(kept, tokenizer)) > budget:
        first = next((i for i, m in enumerate(kept[:-1]) if m["role"] != "system"), None)
        if first is None:
            raise _too_long(budget)
        del kept[first]
        while first < len(kept) - 1 and kept[first]["role"] == "assistant":
            del kept[first]  # a turn goes whole: its reply with its message
    return kept


def _too_long(budget: int) -> UserError:
    return UserError(f"the message is too long for the context window ({budget} tokens left for it); "
                     "shorten it or ask for fewer new tokens (--max-new-tokens, max_tokens)")


@dataclass
class Chat:
    """A chat: ``turns`` of (user message, assistant reply), oldest first, shown to the model in
    ``format`` (``chat_format``: the model's chat template, else the plain transcript); replies
    decoded speculatively with ``draft`` when given."""

    format: Transcript | Templated = field(default_factory=Transcript)
    turns: list[tuple[str, str]] = field(default_factory=list)
    draft: Drafter | None = None

    def prompt(self, message: str, tokenizer: TextTokenizer, budget: int) -> str | list[int]:
        """The prompt (transcript text, or a template's ids) for the reply to ``message`` after the
        turns, oldest turns dropped until it is at most ``budget`` tokens long; refuses a message that
        does not fit on its own."""
        return self.format.prompt(self.turns, message.strip(), tokenizer, budget)

    def stream_reply(
        self,
        model: Transformer,
        tokenizer: TextTokenizer,
        message: str,
        config: GenerationConfig | None = None,
    ) -> Iterator[str]:
        """Generate the assistant's reply to ``message`` piece by piece (sampled as ``config`` says,
        ending where the format ends a reply); the turn joins the chat once the reply is complete. A
        message that cannot be answered is refused here, before any piece, and leaves the chat as it
        was."""
        config = config or GenerationConfig()
        budget = model.config.n_positions - config.max_new_tokens
        if budget < 1:
            raise UserError(f"max_new_tokens ({config.max_new_tokens}) leaves no room for the chat in the "
                            "context window")
        prompt = self.prompt(message, tokenizer, budget)
        config = config.replace(stop_strings=(*self.format.stops, *config.stop_strings))
        pieces = stream_text(model, tokenizer, prompt, config, self.draft)
        return self._record(message, self.format.pieces(pieces))

    def _record(self, message: str, pieces: Iterator[str]) -> Iterator[str]:
        reply = []
        for piece in pieces:
            reply.append(piece)
            yield piece
        self.turns.append((message.strip(), self.format.reply("".join(reply))))

    def reply(
        self,
        model: Transformer,
        tokenizer: TextTokenizer,
        message: str,
        config: GenerationConfig | None = None,
    ) -> str:
        """The assistant's whole reply to ``message`` (added to the chat)."""
        return self.format.reply("".join(self.stream_reply(model, tokenizer, message, config)))
