"""The HTTP API, shaped like OpenAI's so that its clients work unchanged.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events ending
with ``data: [DONE]`` when ``stream`` is true), ``GET /v1/models``, ``GET /health`` (with the
engine's counters) and the playground page at ``/``. Errors are OpenAI's JSON,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for anything the client can fix.

OpenAI's sampling parameters are honoured (``temperature``, ``top_p``, ``n``, ``stop``, ``seed``,
``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``logprobs``...), and beyond them, as in
vLLM, ``top_k`` (0 = off), ``min_p`` (0 = off) and ``repetition_penalty`` (CTRL's, 1 = off).
``max_tokens`` is capped so that prompt + completion fit the context window. Chat turns a base model
into a chat partner with the plain transcript of ``gpt2.prompts`` (system messages replace its header
line; each reply is one line).
"""

from __future__ import annotations

import contextlib
import html
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2.errors import UserError
from gpt2.prompts import CHAT_HEADER, CHAT_STOPS, Chat
from gpt2.sampling import GenerationConfig, encode_prompt
from gpt2.serving.engine import Engine, Job, QueueFull, SequenceRequest, Step

MAX_N = 16  # choices per prompt
MAX_STOPS = 4

Entry = tuple[int, float | None, dict[int, float] | None]  # a token, its logprob, the top logprobs


# ----------------------------------------------------------------------------------------------------
# Request bodies (strict: "5" is not a number, 1 is not a boolean)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="an extension: sample among the k likeliest (0 = all)")
    min_p: float | None = Field(None, ge=0, le=1, description="an extension: drop p < min_p x the top p")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOPS)
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = Field(None, gt=0, description="an extension: CTRL's penalty (1 = off)")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]  # a string, or OpenAI's content parts (text ones only here)

    @property
    def text(self) -> str:
        """The message's text: its content, or its text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        kinds = [part.get("type") for part in self.content]
        texts = [part.get("text") for part in self.content]
        if any(kind != "text" for kind in kinds) or not all(isinstance(t, str) for t in texts):
            other = next((k for k in kinds if k != "text"), "text without a 'text' string")
            raise APIError(400, f"messages: a content part of type {other!r}; this model reads only "
                           "{'type': 'text', 'text': ...} parts", param="messages", code="invalid_value")
        return "\n".join(texts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ----------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                        code="invalid_json")
    param = where[0] if where else None
    if len(errors) > 1 and len({e["loc"][:2] for e in errors}) == 1:  # every type of a union refused it
        takes = ", ".join(dict.fromkeys(str(e["loc"][2]) for e in errors if len(e["loc"]) > 2))
        got = type(first.get("input")).__name__
        return APIError(400, f"{param}: got a value of type {got}, expected one of: {takes}", param=param,
                        code="invalid_type")
    return APIError(400, f"{'.'.join(where) or 'body'}: {first['msg']}", param=param, code="invalid_value")


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def user_error(_: Request, exc: UserError) -> JSONResponse:
        return APIError(400, str(exc), code="invalid_value").response()

    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        return APIError(exc.status_code, message, code=_HTTP_CODES.get(exc.status_code)).response()

    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"the server failed: {exc!r}", type="server_error").response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(Exception, internal)
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class Guard:
    """ASGI middleware, checked before a body is read: the API key on /v1 (401 without it) and the
    body size limit (413 over it)."""

    def __init__(self, app: ASGIApp, api_key: str | None, limit: int) -> None:
        self.app, self.api_key, self.limit = app, api_key, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        error = None
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer "
                                 "<key>'", code="invalid_api_key")
        declared = headers.get(b"content-length", b"0")
        if error is None and (not declared.isdigit() or int(declared) > self.limit):
            error = APIError(413, f"the request body is over the limit of {self.limit} bytes "
                             "(--max-body-bytes)", code="request_too_large")
        if error is not None:
            return await error.response()(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # a chunked body that declared no length
                raise HTTPException(413, f"the request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


# ----------------------------------------------------------------------------------------------------
# The application


def create_app(
    engine: Engine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    max_prompt_tokens: int | None = None,
) -> FastAPI:
    """The API serving ``engine``'s model as ``model_name``; the engine runs while the app does.

    ``api_key``: requests to /v1 need ``Authorization: Bearer <api_key>``. ``max_prompt_tokens``:
    the longest prompt taken (default: the context window less one token for the answer).
    """
    window = engine.window
    max_prompt = min(max_prompt_tokens or window - 1, window - 1)
    tokenizer = engine.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="gpt2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, limit=max_body_bytes)
    _install_error_handlers(app)
    app.state.engine = engine

    def check_model(body: _Sampling) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist here; this server serves "
                           f"{model_name!r}", param="model", code="model_not_found")

    def checked_prompt(ids: list[int], param: str) -> list[int]:
        if len(ids) > max_prompt:
            raise APIError(400, f"the prompt is {len(ids)} tokens long, over this server's limit of "
                           f"{max_prompt} (context window {window}); shorten it", param=param,
                           code="context_length_exceeded")
        bad = [t for t in ids if not 0 <= t < tokenizer.n_vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is not in the vocabulary (0..{tokenizer.n_vocab - 1})",
                           param=param, code="invalid_value")
        return ids

    def sequences(body: _Sampling, prompts: list[list[int]], max_new: int | None, stops: tuple[str, ...],
                  logprobs: int | None, prompt_logprobs: bool = False) -> list[SequenceRequest]:
        bias = _logit_bias(body.logit_bias or {}, tokenizer.n_vocab)
        out = []
        for ids in prompts:
            for i in range(body.n):
                config = GenerationConfig(
                    max_new_tokens=min(max_new or window, window - len(ids)),
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_k=body.top_k or None, top_p=body.top_p, min_p=body.min_p,
                    stop_token_ids=(tokenizer.eot_token,),
                    stop_strings=stops, seed=None if body.seed is None else body.seed + i,
                    frequency_penalty=body.frequency_penalty or 0.0,
                    presence_penalty=body.presence_penalty or 0.0,
                    repetition_penalty=body.repetition_penalty or 1.0, logit_bias=bias,
                )
                out.append(SequenceRequest(ids, config, logprobs, prompt_logprobs))
        return out

    def submit(requests: list[SequenceRequest]) -> Job:
        try:
            return engine.submit(requests)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error",
                           code="queue_full") from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.load()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "gpt2",
                "max_model_len": window}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt: give a string, a list of strings or a list of token ids",
                           param="prompt")
        prompts = [checked_prompt(p if isinstance(p, list) else encode_prompt(tokenizer, p), "prompt")
                   for p in prompt]
        requests = sequences(body, prompts, body.max_tokens, _stops(body.stop), body.logprobs,
                             prompt_logprobs=body.echo and body.logprobs is not None)
        job = submit(requests)
        reply = _Reply(job, tokenizer, model_name, "cmpl", sum(map(len, prompts)), chat=False, echo=body.echo,
                       include_usage=body.stream_options is not None and body.stream_options.include_usage)
        if body.stream:
            return _event_stream(reply.chunks())
        return await reply.whole(request.is_disconnected)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        check_model(body)
        max_new = body.max_completion_tokens or body.max_tokens
        text = _chat_prompt(body.messages, tokenizer, min(max_prompt, window - (max_new or 1)))
        prompt = checked_prompt(encode_prompt(tokenizer, text), "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = submit(sequences(body, [prompt], max_new, (*CHAT_STOPS, *_stops(body.stop)), top))
        reply = _Reply(job, tokenizer, model_name, "chatcmpl", len(prompt), chat=True,
                       include_usage=body.stream_options is not None and body.stream_options.include_usage)
        if body.stream:
            return _event_stream(reply.chunks())
        return await reply.whole(request.is_disconnected)

    page = resources.files("gpt2.serving").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return page.replace("{{MODEL}}", html.escape(model_name)).replace("{{WINDOW}}", str(window))

    return app


def _logit_bias(given: dict[str, float], n_vocab: int) -> dict[int, float]:
    """OpenAI's ``logit_bias`` ({"token id": bias in [-100, 100]}) with integer keys, checked."""
    bias = {}
    for key, value in given.items():
        if not key.isdigit() or int(key) >= n_vocab:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0..{n_vocab - 1})",
                           param="logit_bias", code="invalid_value")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: the bias of token {key} is {value}, outside [-100, 100]",
                           param="logit_bias", code="invalid_value")
        bias[int(key)] = value
    return bias


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _chat_prompt(messages: list[ChatMessage], tokenizer: Any, budget: int) -> str:
    """The transcript of ``gpt2.prompts.Chat`` for ``messages`` (system messages first, then user and
    assistant turns in turn, ending with the user's)."""
    system = [m.text.strip() for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[-1].role != "user" or any(
        m.role != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)
    ):
        raise APIError(400, "messages: after any system messages, user and assistant messages must "
                       "alternate, starting and ending with a user message", param="messages")
    header = "\n".join(system) + "\n\n" if system else CHAT_HEADER
    pairs = [(turns[i].text.strip(), turns[i + 1].text.strip()) for i in range(0, len(turns) - 1, 2)]
    if budget < 1:
        raise APIError(400, f"max_tokens leaves no room for the messages in the context window ({budget})",
                       param="max_tokens")
    return Chat(header=header, turns=pairs).prompt(turns[-1].text, tokenizer, budget)


def _event_stream(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as e:  # the status line is sent already: report it in the stream
            error = {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                     "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Reply:
    """Turns a job's steps into OpenAI's completion or chat completion objects (whole or chunks)."""

    def __init__(self, job: Job, tokenizer: Any, model: str, prefix: str, prompt_tokens: int, *, chat: bool,
                 echo: bool = False, include_usage: bool = False) -> None:
        self.job, self.tokenizer, self.chat, self.echo = job, tokenizer, chat, echo
        self.prompt_tokens, self.include_usage = prompt_tokens, include_usage
        self.replied = [False] * len(job.requests)  # a chat reply's leading spaces are dropped
        self.head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        self.object = "chat.completion" if chat else "text_completion"
        self.offsets = [0] * len(job.requests)  # text written so far per choice, for text_offset
        self.completion_tokens = 0

    def usage(self) -> dict[str, int]:
        """Token counts; the n choices of a prompt share it, so it counts once (as OpenAI's do)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _text(self, index: int, step: Step) -> str:
        if not self.chat or self.replied[index]:
            return step.text
        text = step.text.lstrip()  # the model writes "Assistant: reply": the reply starts after the space
        self.replied[index] = bool(text)
        return text

    def _wants_logprobs(self, index: int) -> bool:
        return self.job.requests[index].logprobs is not None

    def _start(self, index: int) -> tuple[str, list[Entry]]:
        """The text and logprob entries that come before the new tokens: the echoed prompt."""
        if not self.echo:
            return "", []
        prompt = self.job.requests[index].prompt
        logprobs = self.job.prompt_logprobs.get(index, [(None, None)] * len(prompt))
        entries = [(t, lp, top) for t, (lp, top) in zip(prompt, logprobs, strict=True)]
        return self.tokenizer.decode(prompt), entries

    def _logprobs(self, index: int, entries: list[Entry]) -> Any:
        if not self._wants_logprobs(index):
            return None
        name = self.tokenizer.decode
        if self.chat:
            def item(t: int, lp: float | None) -> dict[str, Any]:
                return {"token": name([t]), "logprob": lp, "bytes": list(self.tokenizer.decode_bytes([t]))}
            return {"content": [{**item(t, lp), "top_logprobs": [item(b, v) for b, v in (top or {}).items()]}
                                for t, lp, top in entries]}
        tokens = [name([t]) for t, _, _ in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(token)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {name([b]): v for b, v in top.items()}
                                 for _, _, top in entries],
                "text_offset": offsets}

    def _entries(self, index: int, step: Step) -> list[Entry]:
        if step.finish_reason == "stop" and step.token in self.job.requests[index].config.stop_token_ids:
            return []  # the end-of-text token is not part of the text
        return [(step.token, step.logprob, step.top_logprobs)]

    def _choice(
        self, index: int, text: str, logprobs: Any, finish: str | None, first: bool = False
    ) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        delta: dict[str, str] = {"role": "assistant", "content": text} if first else {"content": text}
        if finish is not None and not text:
            delta = {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    async def whole(self, is_disconnected: Callable[[], Any]) -> dict[str, Any]:
        """The whole response, once every choice is finished."""
        n = len(self.job.requests)
        texts: list[list[str]] = [[] for _ in range(n)]
        entries: list[list[Entry]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        async for index, step in self.job.steps(is_disconnected):
            self.completion_tokens += 1
            texts[index].append(self._text(index, step))
            entries[index] += self._entries(index, step)
            finish[index] = step.finish_reason
        choices = []
        for i in range(n):
            start, start_entries = self._start(i)  # after the steps: the prompt's logprobs are known
            text, logprobs = start + "".join(texts[i]), self._logprobs(i, start_entries + entries[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": finish[i]})
            else:
                choices.append(self._choice(i, text, logprobs, finish[i]))
        return {**self.head, "object": self.object, "choices": choices, "usage": self.usage()}

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """The streamed response: a chunk per step of each choice (a chat's first one names the
        role, an echo comes before the first step), then the usage if asked for."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"

        def chunk(index: int, text: str, entries: list[Entry], finish: str | None = None,
                  first: bool = False) -> dict[str, Any]:
            choice = self._choice(index, text, self._logprobs(index, entries), finish, first)
            return {**self.head, "object": obj, "choices": [choice]}

        if self.chat:
            for i in range(len(self.job.requests)):
                yield chunk(i, "", [], first=True)
        echoed = set()
        async for index, step in self.job.steps():
            self.completion_tokens += 1
            if self.echo and index not in echoed:
                echoed.add(index)
                yield chunk(index, *self._start(index))
            entries, text = self._entries(index, step), self._text(index, step)
            if text or step.finish_reason or entries:
                yield chunk(index, text, entries, step.finish_reason)
        if self.include_usage:
            yield {**self.head, "object": obj, "choices": [], "usage": self.usage()}
