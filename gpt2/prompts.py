"""The paper's zero-shot task prompts (Radford et al. 2019, section 3) and the chat prompt format.

Each task is a prompt that makes the task the natural continuation, the sampling the paper used,
and a rule for cutting the answer out of what comes back:

- summarize: the article, then ``TL;DR:``; top-k 2, 100 tokens; the first 3 sentences.
- translate: example pairs ``english sentence = french sentence``, one per line, then
  ``english sentence =``; greedy; the first sentence.
- answer: the document, the dialogue so far as ``Q:``/``A:`` lines, the question, then ``A:``;
  greedy; the answer ends at the line's end.

Chat uses this plain-text format (GPT-2 was never tuned for chat, so it is a transcript to continue)::

    A conversation between a curious user and a helpful assistant.

    User: <message>
    Assistant: <reply>
    User: <message>
    Assistant:

The reply ends at the end of its line; the oldest turns are dropped (the header is
kept) until the prompt and the reply fit in the context window.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from gpt2.errors import UserError
from gpt2.model import Transformer
from gpt2.sampling import (
    GenerationConfig,
    TextTokenizer,
    encode_prompt,
    generate_text,
    stream_text,
)

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


def summarize(model: Transformer, tokenizer: TextTokenizer, article: str, *, seed: int | None = None) -> str:
    """A summary of ``article``: 100 tokens with top-k 2 after "TL;DR:", cut to 3 sentences."""
    (text,) = generate_text(model, tokenizer, summarize_prompt(article), SUMMARY.replace(seed=seed))
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
) -> str:
    """The translation of ``sentence``: greedy decoding after the example pairs, first sentence."""
    (text,) = generate_text(model, tokenizer, translate_prompt(sentence, examples), TRANSLATION)
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
) -> str:
    """The answer to ``question`` about ``document`` after the dialogue ``history``: greedy, one line."""
    (text,) = generate_text(model, tokenizer, answer_prompt(document, question, history), ANSWER)
    return text.strip()


# ----------------------------------------------------------------------------------------------------
# Chat

CHAT_HEADER = "A conversation between a curious user and a helpful assistant.\n\n"
CHAT_STOPS = ("\n",)  # a reply is one line; this also stops the model writing the next "User:"


@dataclass
class Chat:
    """A chat transcript: ``turns`` of (user message, assistant reply), oldest first."""

    header: str = CHAT_HEADER
    turns: list[tuple[str, str]] = field(default_factory=list)

    def prompt(self, message: str, tokenizer: TextTokenizer, budget: int) -> str:
        """The transcript ending in ``message`` and ``Assistant:``, oldest turns dropped until it is
        at most ``budget`` tokens long; refuses a message that does not fit on its own."""
        last = f"User: {message.strip()}\nAssistant:"
        kept = list(self.turns)
        while True:
            text = self.header + "".join(f"User: {u}\nAssistant: {a}\n" for u, a in kept) + last
            if len(encode_prompt(tokenizer, text)) <= budget:
                return text
            if not kept:
                raise UserError(
                    f"the message is too long for the context window ({budget} tokens left for it); "
                    "shorten it or ask for fewer new tokens (--max-new-tokens, max_tokens)"
                )
            kept.pop(0)

    def stream_reply(
        self,
        model: Transformer,
        tokenizer: TextTokenizer,
        message: str,
        config: GenerationConfig | None = None,
    ) -> Iterator[str]:
        """Generate the assistant's reply to ``message`` piece by piece (sampled as ``config`` says,
        ending at the line's end); the turn joins the transcript once the reply is complete. A message
        that cannot be answered is refused here, before any piece, and leaves the transcript as it was."""
        config = config or GenerationConfig()
        budget = model.config.n_positions - config.max_new_tokens
        if budget < 1:
            raise UserError(f"max_new_tokens ({config.max_new_tokens}) leaves no room for the chat in the "
                            "context window")
        prompt = self.prompt(message, tokenizer, budget)
        config = config.replace(stop_strings=(*CHAT_STOPS, *config.stop_strings))
        return self._record(message, stream_text(model, tokenizer, prompt, config))

    def _record(self, message: str, pieces: Iterator[str]) -> Iterator[str]:
        reply = []
        for piece in pieces:
            reply.append(piece)
            yield piece
        self.turns.append((message.strip(), "".join(reply).strip()))

    def reply(
        self,
        model: Transformer,
        tokenizer: TextTokenizer,
        message: str,
        config: GenerationConfig | None = None,
    ) -> str:
        """The assistant's whole reply to ``message`` (added to the transcript)."""
        return "".join(self.stream_reply(model, tokenizer, message, config)).strip()
