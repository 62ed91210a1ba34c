"""The model behind the routes (``Service``): a request checked against it, turned into the engine's
``SequenceRequest``s and submitted, off the event loop.

The work a request asks for is bounded before any is done: its sequences (prompts x ``n``) against
the queue, each prompt's length in characters against what ``max_prompt_tokens`` can hold; prompts are
encoded and sequences built in a worker thread, never on the event loop.

``max_tokens`` is capped so that prompt + completion fit the context window; a completion's
``max_tokens`` may be 0 with ``echo`` (the prompt scored, nothing generated, as OpenAI's legacy API
and vLLM take it). A format of structured output that cannot be used (an invalid or unsatisfiable
schema) is a 400. Chat renders the messages with the model's chat template when there is one
(``gpt2.tokenizer.chat_template``, as transformers and vLLM do: any order of roles the template takes,
then its generation prompt; a reply ends at the end-of-turn token or a ``stop`` string). A base model
without one becomes a chat partner through the plain transcript of ``gpt2.generation.prompts`` (system
messages replace its header line; each reply is one line). In both, the oldest turns are dropped when
the messages do not fit.
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any

from gpt2.generation.prompts import CHAT_HEADER, CHAT_STOPS, Chat, Transcript, fit_messages
from gpt2.generation.sampling import GenerationConfig, encode_prompt
from gpt2.serving.engine import Engine, Job, QueueFull, SequenceRequest
from gpt2.serving.errors import APIError
from gpt2.serving.protocol import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    InspectRequest,
    Sampling,
    TokenizeRequest,
)
from gpt2.serving.replies import ChatReply, CompletionReply
from gpt2.serving.structured import FormatError, grammar_of
from gpt2.tokenizer.bpe import bytes_to_unicode
from gpt2.tokenizer.chat_template import ChatTemplate
from gpt2.util.errors import UserError

_TOKEN_ID = re.compile(r"[0-9]{1,9}")  # a logit_bias key (str.isdigit also takes "²")


class Service:
    """The model behind the routes: checks a request against it, turns the request into the engine's
    ``SequenceRequest``s, submits them and gives back the job's reply. Its ``complete`` and ``chat``
    run in a worker thread, their jobs reporting to the event loop ``loop``; so do ``tokenize`` and
    ``detokenize``, which answer at once."""

    def __init__(self, engine: Engine, model_name: str, max_prompt_tokens: int | None,
                 template: ChatTemplate | None = None) -> None:
        self.engine, self.model_name, self.tokenizer = engine, model_name, engine.tokenizer
        self.template = template
        self.window = engine.window
        if max_prompt_tokens is not None and not 1 <= max_prompt_tokens < self.window:
            raise UserError(f"max_prompt_tokens must be in 1..{self.window - 1} (the context window "
                            f"less one), got {max_prompt_tokens}")
        self.max_prompt = max_prompt_tokens or self.window - 1
        # A token holds at most this many characters: a longer string is refused before encoding.
        vocab = range(self.tokenizer.n_vocab)
        self.longest_token = max(len(self.tokenizer.decode_bytes([t])) for t in vocab)
        self.max_prompt_chars = self.max_prompt * self.longest_token

    def complete(self, body: CompletionRequest, loop: asyncio.AbstractEventLoop) -> CompletionReply:
        """A completion request, checked and submitted: the reply to its job."""
        self.check_model(body)
        scoring = body.max_tokens == 0  # the prompt's logprobs only: one token drawn, not answered
        if scoring and not body.echo:
            raise APIError(400, "max_tokens: 0 is taken only with echo true (the prompt scored, nothing "
                           "generated); ask for at least 1 token", param="max_tokens", code="invalid_value")
        given = _prompt_list(body.prompt)
        self.check_count(len(given) * body.n)
        prompts = [self.checked_prompt(p if isinstance(p, list) else self.encoded(p, "prompt"), "prompt")
                   for p in given]
        requests = self.sequences(body, prompts, 1 if scoring else body.max_tokens, _stops(body.stop),
                                  body.logprobs, prompt_logprobs=body.echo and body.logprobs is not None)
        return CompletionReply(self.submit(requests, loop), self.tokenizer, self.model_name,
                                sum(map(len, prompts)), echo=body.echo, generates=not scoring)

    def chat(self, body: ChatRequest, loop: asyncio.AbstractEventLoop) -> ChatReply:
        """A chat completion request, checked and submitted: the reply to its job."""
        self.check_model(body)
        self.check_count(body.n)
        max_new = body.max_completion_tokens or body.max_tokens
        budget = min(self.max_prompt, self.window - (max_new or 1))
        self.check_chars(body.messages[-1].text, "messages")
        if budget < 1:
            raise APIError(400, f"max_tokens leaves no room for the messages in the context window "
                           f"({budget})", param="max_tokens")
        if self.template is None:
            text = _chat_prompt(body.messages, self.tokenizer, budget, self.max_prompt_chars)
            ids, stops = encode_prompt(self.tokenizer, text), (*CHAT_STOPS, *_stops(body.stop))
        else:
            ids = _templated_prompt(self.template, body.messages, self.tokenizer, budget,
                                    self.max_prompt_chars)
            stops = _stops(body.stop)
        prompt = self.checked_prompt(ids, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        requests = self.sequences(body, [prompt], max_new, stops, top)
        return ChatReply(self.submit(requests, loop), self.tokenizer, self.model_name, len(prompt),
                          one_space=self.template is not None)

    def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize: the ids of the prompt (special tokens in it are special, as in
        transformers; "" has none) or of the rendered messages, their count and the window."""
        self.check_model(body)
        if (body.prompt is None) == (body.messages is None):
            given = ("both prompt and messages: give one" if body.prompt is not None else
                     "neither prompt nor messages: give prompt (a string) or messages (chat messages)")
            raise APIError(400, f"the body has {given}", param="prompt", code="invalid_value")
        if body.prompt is not None:
            ids = self.tokenizer.encode(body.prompt, allowed_special=frozenset(self.tokenizer.special_tokens))
        elif self.template is None:
            text = _chat_prompt(body.messages or [], self.tokenizer, sys.maxsize, sys.maxsize)
            ids = encode_prompt(self.tokenizer, text)
        else:
            given = [{"role": m.role, "content": m.text} for m in body.messages or []]
            try:
                text, _ = self.template.render(given, self.tokenizer,
                                               add_generation_prompt=body.add_generation_prompt)
            except UserError as e:
                raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
            ids = self.tokenizer.encode(text, allowed_special=frozenset(self.tokenizer.special_tokens))
        strs = _token_strs(self.tokenizer, ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.window, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: DetokenizeRequest) -> dict[str, str]:
        """vLLM's /detokenize: the text of the ids (special tokens as their text)."""
        self.check_model(body)
        return {"prompt": self.tokenizer.decode(self.check_ids(body.tokens, "tokens"))}

    def check_count(self, sequences: int) -> None:
        """400 for more sequences (prompts x n) than the queue can ever take."""
        if sequences > self.engine.max_queue:
            raise APIError(400, f"the request asks for {sequences} sequences (prompts x n), more than "
                           f"this server ever queues ({self.engine.max_queue}); send fewer prompts or "
                           "a smaller n", param="n", code="too_many_sequences")

    def check_chars(self, text: str, param: str) -> None:
        """400 when ``text`` has too many characters to fit the prompt limit, whatever its tokens."""
        if len(text) > self.max_prompt_chars:
            raise APIError(400, f"the prompt is {len(text)} characters long, over this server's limit "
                           f"of {self.max_prompt} tokens (context window {self.window}); shorten it",
                           param=param, code="context_length_exceeded")

    def encoded(self, text: str, param: str) -> list[int]:
        """``text``'s ids, once its length in characters can fit the limit."""
        self.check_chars(text, param)
        return encode_prompt(self.tokenizer, text)

    def check_model(self, body: Sampling | TokenizeRequest | DetokenizeRequest | InspectRequest) -> None:
        """404 unless the body names no model or this one."""
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist here; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    def checked_prompt(self, ids: list[int], param: str) -> list[int]:
        """``ids``, once they are known to fit the prompt limit and the vocabulary."""
        if len(ids) > self.max_prompt:
            raise APIError(400, f"the prompt is {len(ids)} tokens long, over this server's limit of "
                           f"{self.max_prompt} (context window {self.window}); shorten it", param=param,
                           code="context_length_exceeded")
        return self.check_ids(ids, param)

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        """``ids``, once they are known to be in the vocabulary."""
        n_vocab = self.tokenizer.n_vocab
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is not in the vocabulary (0..{n_vocab - 1})",
                           param=param, code="invalid_value")
        return ids

    def sequences(self, body: Sampling, prompts: list[list[int]], max_new: int | None,
                  stops: tuple[str, ...], logprobs: int | None,
                  prompt_logprobs: bool = False) -> list[SequenceRequest]:
        """``body.n`` sequences per prompt (the i-th seeded ``seed + i``), each ending by the window."""
        bias = _logit_bias(body.logit_bias or {}, self.tokenizer.n_vocab)
        self.check_draft_tokens(body.draft_tokens)
        try:
            grammar = grammar_of(body.response_format, body.structured_outputs, self.tokenizer)
        except FormatError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        out = []
        for ids in prompts:
            max_new_tokens = min(max_new or self.window, self.window - len(ids))
            out += [SequenceRequest(ids, self._config(body, i, max_new_tokens, stops, bias), logprobs,
                                    prompt_logprobs, grammar, body.draft_tokens) for i in range(body.n)]
        return out

    def check_draft_tokens(self, tokens: int | None) -> None:
        """400 for ``draft_tokens`` on a server that does not draft, or over what it drafts."""
        if tokens is None:
            return
        draft = self.engine.draft
        if draft is None:
            raise APIError(400, "draft_tokens: this server does not decode speculatively; it drafts only "
                           "when started with --draft lookup or --draft DIR", param="draft_tokens",
                           code="invalid_value")
        if tokens > draft.tokens:
            raise APIError(400, f"draft_tokens: {tokens} is more than this server drafts per step "
                           f"(--draft-tokens {draft.tokens}); ask for 0 (off) to {draft.tokens}",
                           param="draft_tokens", code="invalid_value")

    def _config(self, body: Sampling, i: int, max_new_tokens: int, stops: tuple[str, ...],
                bias: dict[int, float]) -> GenerationConfig:
        """The body's sampling parameters as the i-th sequence's config (OpenAI's defaults filled in)."""
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k or None, top_p=body.top_p, min_p=body.min_p,
            stop_token_ids=(self.tokenizer.eot_token,),
            stop_strings=stops, seed=None if body.seed is None else body.seed + i,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0, logit_bias=bias,
        )

    def submit(self, requests: list[SequenceRequest], loop: asyncio.AbstractEventLoop) -> Job:
        """The engine's job for ``requests``; 429 when its queue is full."""
        try:
            return self.engine.submit(requests, loop)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error",
                           code="queue_full") from None


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """A completion's ``prompt`` as a list of prompts (strings or token ids); 400 if there is none."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: give a string, a list of strings or a list of token ids",
                       param="prompt")
    return prompt


def _logit_bias(given: dict[str, float], n_vocab: int) -> dict[int, float]:
    """OpenAI's ``logit_bias`` ({"token id": bias in [-100, 100]}) with integer keys, checked."""
    bias = {}
    for key, value in given.items():
        if not _TOKEN_ID.fullmatch(key) or int(key) >= n_vocab:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0..{n_vocab - 1})",
                           param="logit_bias", code="invalid_value")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: the bias of token {key} is {value}, outside [-100, 100]",
                           param="logit_bias", code="invalid_value")
        bias[int(key)] = value
    return bias


def _token_strs(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id's token as transformers' ``convert_ids_to_tokens`` spells it (as vLLM's
    ``return_token_strs`` does): bytes by GPT-2's printable alphabet ("Ġ" a space), specials as text."""
    table, specials = bytes_to_unicode(), {i: text for text, i in tokenizer.special_tokens.items()}
    return [specials[t] if t in specials else "".join(table[b] for b in tokenizer.decode_bytes([t]))
            for t in ids]


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _chat_prompt(messages: list[ChatMessage], tokenizer: Any, budget: int, max_chars: int) -> str:
    """The transcript of ``gpt2.generation.prompts.Chat`` for ``messages`` (system messages first, then
    user and assistant turns in turn, ending with the user's). Of the earlier turns, only the latest
    that hold at most ``max_chars`` characters can fit; the others are dropped before any is encoded."""
    system = [m.text.strip() for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[-1].role != "user" or any(
        m.role != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)
    ):
        raise APIError(400, "messages: after any system messages, user and assistant messages must "
                       "alternate, starting and ending with a user message", param="messages")
    header = "\n".join(system) + "\n\n" if system else CHAT_HEADER
    pairs = [(turns[i].text.strip(), turns[i + 1].text.strip()) for i in range(0, len(turns) - 1, 2)]
    chars = 0
    for first in range(len(pairs) - 1, -1, -1):
        chars += len(pairs[first][0]) + len(pairs[first][1])
        if chars > max_chars:
            pairs = pairs[first + 1 :]
            break
    return Chat(Transcript(header), turns=pairs).prompt(turns[-1].text, tokenizer, budget)


def _templated_prompt(template: ChatTemplate, messages: list[ChatMessage], tokenizer: Any, budget: int,
                      max_chars: int) -> list[int]:
    """The ids of ``messages`` rendered by ``template`` with its generation prompt, the oldest turns
    dropped until they fit ``budget`` (``gpt2.generation.prompts.fit_messages``); only the latest
    messages that hold at most ``max_chars`` characters (system messages aside) can fit, the others are
    dropped before any is rendered. A template that fails to render them is the request's 400."""
    given = [{"role": m.role, "content": m.text} for m in messages]
    chars, keep = 0, [True] * len(given)
    for i in range(len(given) - 2, -1, -1):
        if given[i]["role"] != "system":
            chars += len(given[i]["content"])
            keep[i] = chars <= max_chars
    try:
        kept = fit_messages(template, [m for m, k in zip(given, keep, strict=True) if k], tokenizer, budget)
        return template.prompt_ids(kept, tokenizer)
    except UserError as e:
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None

