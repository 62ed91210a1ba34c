"""Replies in OpenAI's shape, one class per kind of response: ``CompletionReply`` and ``ChatReply``
over ``Reply``, which holds what they share (the id, the usage, the loop over the job's steps).
``answer`` sends one whole or streamed as server-sent events ending with ``data: [DONE]``.

The token that ends a completion (``<|endoftext|>``) has its logprob entry, text "", so that ``echo``
+ ``logprobs`` give len(prompt) + completion_tokens entries. A chat reply made with a chat template
loses the one space the template leaves after its prompt.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from gpt2.serving.engine import Job, Step
from gpt2.serving.errors import error_of
from gpt2.serving.metrics import Metrics
from gpt2.serving.protocol import Sampling

Entry = tuple[int, float | None, dict[int, float] | None]  # a token, its logprob, the top logprobs


async def answer(reply: Reply, body: Sampling, request: Request, metrics: Metrics) -> Any:
    """``reply`` streamed as server-sent events when the body asks for it, else whole; its usage
    counted in ``metrics`` once its last choice is done (before the stream's ``[DONE]``)."""
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def counted() -> AsyncIterator[dict[str, Any]]:
            try:
                async for chunk in reply.chunks(include_usage):
                    yield chunk
            finally:
                metrics.used(reply.prompt_tokens, reply.completion_tokens)

        return _event_stream(counted())
    try:
        return await reply.whole(request.is_disconnected)
    finally:
        metrics.used(reply.prompt_tokens, reply.completion_tokens)


def _event_stream(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as e:  # the status line is sent already: report it in the stream
            yield f"data: {json.dumps(error_of(e).payload())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Reply:
    """What both kinds of reply share: the id, the usage and the loop over the job's steps, whole
    (``whole``) or streamed (``chunks``). A kind says how its choices look (``_choice`` whole,
    ``_chunk_choice`` streamed) and how its logprobs do (``_logprobs``). ``generates`` False: the
    steps are drawn but not answered (nothing generated; the choices end as "length"). A choice the
    engine cuts (``Engine.cut``, at a shutdown's deadline) ends with a step that holds no token and
    finish_reason "abort"."""

    prefix: ClassVar[str]  # of the id
    object: ClassVar[str]  # of the whole response
    chunk_object: ClassVar[str]  # of each streamed chunk

    def __init__(self, job: Job, tokenizer: Any, model: str, prompt_tokens: int) -> None:
        self.job, self.tokenizer, self.prompt_tokens = job, tokenizer, prompt_tokens
        self.head = {"id": f"{self.prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        self.completion_tokens = 0
        self.generates = True

    def usage(self) -> dict[str, Any]:
        """Token counts; the n choices of a prompt share it, so it counts once (as OpenAI's do). A
        request decoded speculatively also has OpenAI's ``completion_tokens_details`` of predicted
        outputs: the drafted tokens kept (``accepted_prediction_tokens``) and the others."""
        prompt, completion = self.prompt_tokens, self.completion_tokens
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}
        job = self.job
        if job.speculative:
            usage["completion_tokens_details"] = {"accepted_prediction_tokens": job.accepted,
                                                  "rejected_prediction_tokens": job.drafted - job.accepted}
        return usage

    async def whole(self, is_disconnected: Callable[[], Any]) -> dict[str, Any]:
        """The whole response, once every choice is finished."""
        n = len(self.job.requests)
        texts: list[list[str]] = [[] for _ in range(n)]
        entries: list[list[Entry]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        async for index, step in self.job.steps(is_disconnected):
            self.completion_tokens += self._counts(step)
            texts[index].append(self._text(index, step))
            entries[index] += self._entries(index, step)
            finish[index] = self._finish(step)
        choices = [self._choice(i, "".join(texts[i]), entries[i], finish[i]) for i in range(n)]
        return {**self.head, "object": self.object, "choices": choices, "usage": self.usage()}

    async def chunks(self, include_usage: bool = False) -> AsyncIterator[dict[str, Any]]:
        """The streamed response: the kind's opening chunks, a chunk per step of each choice, then
        the usage if asked for."""
        for choice in self._opening():
            yield self._chunk([choice])
        async for index, step in self.job.steps():
            self.completion_tokens += self._counts(step)
            for choice in self._step_choices(index, step):
                yield self._chunk([choice])
        if include_usage:
            yield {**self._chunk([]), "usage": self.usage()}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.head, "object": self.chunk_object, "choices": choices}

    def _opening(self) -> list[dict[str, Any]]:
        """The choices streamed before the first step."""
        return []

    def _step_choices(self, index: int, step: Step) -> Iterator[dict[str, Any]]:
        """The choices streamed for a step: one, unless it adds nothing."""
        entries, text, finish = self._entries(index, step), self._text(index, step), self._finish(step)
        if text or finish or entries:
            yield self._chunk_choice(index, text, entries, finish)

    def _counts(self, step: Step) -> int:
        """1 if the step is a generated token (not the scoring pass's, not the "abort" of a cut), else 0."""
        return int(self.generates and step.token is not None)

    def _finish(self, step: Step) -> str | None:
        """The finish reason the step gives its choice."""
        if not self.generates and step.finish_reason != "abort":
            return "length"
        return step.finish_reason

    def _text(self, index: int, step: Step) -> str:
        return step.text if self.generates else ""

    def _entries(self, index: int, step: Step) -> list[Entry]:
        """The step's logprob entries: its token's, the end-of-text token's too (its text is "")."""
        return [(step.token, step.logprob, step.top_logprobs)] if self._counts(step) else []

    def _ends_turn(self, index: int, step: Step) -> bool:
        """Whether the step's token is the stop token that ended its choice (not part of the text)."""
        return step.finish_reason == "stop" and step.token in self.job.requests[index].config.stop_token_ids

    def logprobs(self, index: int, entries: list[Entry]) -> Any:
        """The logprobs of choice ``index`` in the kind's shape; None where they were not asked for."""
        if self.job.requests[index].logprobs is None:
            return None
        return self._logprobs(index, entries)

    def _logprobs(self, index: int, entries: list[Entry]) -> dict[str, Any]:
        raise NotImplementedError

    def _choice(self, index: int, text: str, entries: list[Entry], finish: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk_choice(
        self, index: int, text: str, entries: list[Entry], finish: str | None
    ) -> dict[str, Any]:
        raise NotImplementedError


class CompletionReply(Reply):
    """OpenAI's text completion: choices of ``text``, logprobs with text offsets, and the prompt
    before the text when ``echo``."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, job: Job, tokenizer: Any, model: str, prompt_tokens: int, *, echo: bool,
                 generates: bool = True) -> None:
        super().__init__(job, tokenizer, model, prompt_tokens)
        self.echo, self.generates = echo, generates
        self.offsets = [0] * len(job.requests)  # text written so far per choice, for text_offset
        self.echoed: set[int] = set()  # the choices whose echo is streamed

    def _echo(self, index: int) -> tuple[str, list[Entry]]:
        """The text and logprob entries that come before the new tokens: the echoed prompt."""
        if not self.echo:
            return "", []
        prompt = self.job.requests[index].prompt
        logprobs = self.job.prompt_logprobs.get(index, [(None, None)] * len(prompt))
        entries = [(t, lp, top) for t, (lp, top) in zip(prompt, logprobs, strict=True)]
        return self.tokenizer.decode(prompt), entries

    def _choice(self, index: int, text: str, entries: list[Entry], finish: str | None) -> dict[str, Any]:
        start, start_entries = self._echo(index)  # after the steps: the prompt's logprobs are known
        return self._chunk_choice(index, start + text, start_entries + entries, finish)

    def _chunk_choice(
        self, index: int, text: str, entries: list[Entry], finish: str | None
    ) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": self.logprobs(index, entries),
                "finish_reason": finish}

    def _step_choices(self, index: int, step: Step) -> Iterator[dict[str, Any]]:
        """The echo comes before a choice's first step."""
        if self.echo and index not in self.echoed:
            self.echoed.add(index)
            yield self._chunk_choice(index, *self._echo(index), None)
        yield from super()._step_choices(index, step)

    def _logprobs(self, index: int, entries: list[Entry]) -> dict[str, Any]:
        """OpenAI's legacy logprobs; the end-of-text token is named "<|endoftext|>" as OpenAI's were
        (its offset is where the text ends)."""
        name = self.tokenizer.decode
        tokens = [name([t]) for t, _, _ in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(token)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {name([b]): v for b, v in top.items()}
                                 for _, _, top in entries],
                "text_offset": offsets}


class ChatReply(Reply):
    """OpenAI's chat completion: an assistant ``message`` per choice (streamed as ``delta``s, the first
    naming the role), the reply's leading spaces dropped (only the first with ``one_space``: a chat
    template's reply may start with more), logprobs as ``content`` items."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, job: Job, tokenizer: Any, model: str, prompt_tokens: int, *,
                 one_space: bool = False) -> None:
        super().__init__(job, tokenizer, model, prompt_tokens)
        self.replied = [False] * len(job.requests)  # whether a choice's reply has begun
        self.one_space = one_space

    def _text(self, index: int, step: Step) -> str:
        if self.replied[index]:
            return step.text
        # The model writes "Assistant: reply": the reply starts after the space.
        text = step.text.removeprefix(" ") if self.one_space else step.text.lstrip()
        self.replied[index] = bool(step.text if self.one_space else text)
        return text

    def _entries(self, index: int, step: Step) -> list[Entry]:
        """As OpenAI's chat logprobs, the tokens of the content only: not the stop token."""
        return [] if self._ends_turn(index, step) else super()._entries(index, step)

    def _choice(self, index: int, text: str, entries: list[Entry], finish: str | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs(index, entries), "finish_reason": finish}

    def _chunk_choice(self, index: int, text: str, entries: list[Entry], finish: str | None,
                      first: bool = False) -> dict[str, Any]:
        delta: dict[str, str] = {"role": "assistant", "content": text} if first else {"content": text}
        if finish is not None and not text:
            delta = {}
        return {"index": index, "delta": delta, "logprobs": self.logprobs(index, entries),
                "finish_reason": finish}

    def _opening(self) -> list[dict[str, Any]]:
        """A chunk per choice naming the role."""
        return [self._chunk_choice(i, "", [], None, first=True) for i in range(len(self.job.requests))]

    def _logprobs(self, index: int, entries: list[Entry]) -> dict[str, Any]:
        def item(t: int, lp: float | None) -> dict[str, Any]:
            return {"token": self.tokenizer.decode([t]), "logprob": lp,
                    "bytes": list(self.tokenizer.decode_bytes([t]))}

        return {"content": [{**item(t, lp), "top_logprobs": [item(b, v) for b, v in (top or {}).items()]}
                            for t, lp, top in entries]}
