"""The request bodies of the API, as strict pydantic models ("5" is not a number, 1 is not a boolean):
FastAPI parses a route's body into one before the route runs, so a malformed body is a 400 in OpenAI's
shape (``gpt2.serving.errors``) and the service sees only well-typed fields.

OpenAI's sampling parameters are taken (``temperature``, ``top_p``, ``n``, ``stop``, ``seed``,
``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``logprobs``...), and beyond them, as in
vLLM, ``top_k`` (0 = off), ``min_p`` (0 = off), ``repetition_penalty`` (CTRL's, 1 = off) and
``structured_outputs`` (``gpt2.serving.structured``, as is OpenAI's ``response_format``), and this
server's ``draft_tokens`` (speculative decoding: at most that many drafted tokens per step, 0 = off).
vLLM's /tokenize and /detokenize bodies are here too, and this server's /inspect.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from gpt2.serving.errors import APIError
from gpt2.serving.structured import ResponseFormat, StructuredOutputs
from gpt2.tokenizer.chat_template import ROLES, message_text
from gpt2.util.errors import UserError

MAX_N = 16  # choices per prompt
MAX_STOPS = 4
MAX_FEATURES = 32  # SAE features per token that /inspect lists


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    include_usage: bool = False


class Sampling(BaseModel):
    """The parameters the completion and chat bodies share."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
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
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(None, description="an extension: vLLM's")
    draft_tokens: int | None = Field(None, ge=0, description="an extension: at most this many drafted "
                                     "tokens per step (speculative decoding, gpt2 serve --draft); 0 = off")


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", dict: "an object"}


class ChatMessage(BaseModel):
    """A message as OpenAI's chat API takes it, read by the rule training data is read by
    (``gpt2.tokenizer.chat_template``): ``developer`` is ``system``, content is a string or text parts."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]  # a string, or OpenAI's content parts (text ones only here)

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        return ROLES[value]

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One clear error for content of another type (not one per type of the union)."""
        try:
            return handler(value)
        except ValidationError:
            got = _JSON_TYPES.get(type(value), "a list of something other than objects")
            raise PydanticCustomError("content_type", "must be a string or a list of {'type': 'text', "
                                      "'text': ...} parts, got {got}", {"got": got}) from None

    @property
    def text(self) -> str:
        """The message's text: its content, or its text parts joined by newlines."""
        try:
            return message_text(self.content, "messages: a message")
        except UserError:
            kinds = [part.get("type") for part in self.content]
            other = next((k for k in kinds if k != "text"), "text without a 'text' string")
            raise APIError(400, f"messages: a content part of type {other!r}; this model reads only "
                           "{'type': 'text', 'text': ...} parts", param="messages",
                           code="invalid_value") from None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a ``prompt``, or chat ``messages`` rendered as /v1/chat/completions
    renders them (none dropped). ``add_special_tokens`` is taken for vLLM's sake: GPT-2's tokenizer
    adds none either way."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize body: the ids to turn into text."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[int]


class InspectRequest(BaseModel):
    """This server's /inspect body (``gpt2.serving.inspection``): the ``prompt`` to look inside, the
    ``layer`` whose attention patterns come back (0 is the first, -1 the last), one ``head`` of it (all
    by default), and how many SAE features per token (``top_features``, with ``gpt2 serve --sae``)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str
    layer: int = 0
    head: int | None = None
    top_features: int = Field(5, ge=1, le=MAX_FEATURES)
