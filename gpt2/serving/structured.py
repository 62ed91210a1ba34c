"""Structured output: a request's format as a grammar, and the constraint that holds a sequence to it.

A request asks for a format with OpenAI's ``response_format`` (``{"type": "json_object"}``, or
``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``) or vLLM's
``structured_outputs`` (``{"json": schema}``, ``{"regex": pattern}`` or ``{"choice": [strings]}``).
``grammar_of`` turns it into an llguidance grammar, checked up front: a schema llguidance cannot
compile, or one that no value satisfies, is a ``FormatError`` naming the problem in one line, before
anything is submitted.

Each sequence of such a request has a ``Constraint`` (an ``llguidance.LLMatcher``): before a token is
drawn, ``allowed_tokens`` gives every constrained row's allowed tokens in one batched call; the drawn
token ``advance``s it; ``done`` says that the grammar can take nothing more. llguidance allows
<|endoftext|> exactly when the text so far is complete, so a reply that ends by itself is complete.

JSON is compact (no whitespace between tokens, ``,`` and ``:`` as separators; llguidance's
``whitespace_flexible`` off), so that a model cannot fill its budget with whitespace; a schema's own
``x-guidance`` options may say otherwise.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from gpt2.tokenizer.bpe import GPT2_PATTERN
from gpt2.util.errors import UserError
from gpt2.util.jsonfile import parse_json

JSON_OPTIONS = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions; compact JSON
_ECHOED_SOURCE = re.compile(r"^\s*(\^+|\d+ \|.*)\s*$")  # lines of an error that point into the grammar
_POSITION = re.compile(r"^at \d+\(\d+\): ")  # where in llguidance's own grammar text


class FormatError(UserError):
    """A format that cannot be used: the request's 400, ``param`` its field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


# ----------------------------------------------------------------------------------------------------
# The request's fields (strict pydantic models, as the app's bodies are)


class JsonSchema(BaseModel):
    """OpenAI's ``response_format.json_schema``; ``strict`` is taken (the output always follows the
    schema) and ``description`` is not used."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: "text" (the default: free text), "json_object" (any JSON
    object) or "json_schema" (a value of ``json_schema.schema``)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of ``json`` (a JSON schema, or its text),
    ``regex`` (Rust's regex syntax, matched in full) and ``choice`` (one of these strings)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)


# ----------------------------------------------------------------------------------------------------
# Grammars


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar checked against ``tokenizer``; ``constraint()`` starts a sequence on it."""

    text: str
    tokenizer: LLTokenizer

    def constraint(self) -> Constraint:
        return Constraint(LLMatcher(self.tokenizer, self.text, log_level=0), self.tokenizer.vocab_size)


def grammar_of(response_format: ResponseFormat | None, structured_outputs: StructuredOutputs | None,
               tokenizer: Any) -> Grammar | None:
    """The grammar a request's fields ask for (None: free text); ``FormatError`` when they ask for
    two, or for one that cannot be used."""
    wanted = response_format is not None and response_format.type != "text"
    if structured_outputs is not None:
        if wanted:
            raise FormatError("structured_outputs", "give either response_format or structured_outputs, "
                              "not both")
        return _structured_outputs(structured_outputs, tokenizer)
    if not wanted:
        return None
    assert response_format is not None
    if response_format.type == "json_object":
        return json_grammar({"type": "object"}, tokenizer, "response_format")
    given = response_format.json_schema
    if given is None:
        raise FormatError("response_format", "type 'json_schema' needs a 'json_schema' object "
                          "({'name': ..., 'schema': {...}})")
    return json_grammar({} if given.schema_ is None else given.schema_, tokenizer, "response_format")


def _structured_outputs(given: StructuredOutputs, tokenizer: Any) -> Grammar:
    kinds = [name for name, value in (("json", given.json_), ("regex", given.regex),
                                      ("choice", given.choice)) if value is not None]
    if len(kinds) != 1:
        raise FormatError("structured_outputs", f"give exactly one of json, regex and choice, got "
                          f"{', '.join(kinds) or 'none'}")
    param = f"structured_outputs.{kinds[0]}"
    if given.json_ is not None:
        schema = given.json_
        if isinstance(schema, str):
            try:
                schema = parse_json(schema, "the schema")
            except UserError as e:
                raise FormatError(param, str(e)) from None
        if not isinstance(schema, dict):
            raise FormatError(param, "a JSON schema is an object")
        return json_grammar(schema, tokenizer, param)
    if given.regex is not None:
        return checked(LLMatcher.grammar_from_regex(given.regex), tokenizer, param,
                       "the regex cannot be used: ")
    options = given.choice or []
    return checked(llguidance.grammar_from("choice", json.dumps(options)), tokenizer, param,
                   "the choices cannot be used: ")


def json_grammar(schema: dict[str, Any], tokenizer: Any, param: str) -> Grammar:
    """The grammar of the JSON values ``schema`` validates, compact (``JSON_OPTIONS``)."""
    try:
        text = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise FormatError(param, f"the JSON schema cannot be used: {_one_line(str(e))}") from None
    return checked(text, tokenizer, param, "the JSON schema cannot be used: ")


def checked(text: str, tokenizer: Any, param: str, prefix: str = "") -> Grammar:
    """``text`` as a ``Grammar`` over ``tokenizer``, once llguidance finds it valid and satisfiable."""
    lltokenizer = ll_tokenizer(tokenizer)
    failed, messages = LLMatcher.validate_grammar_with_warnings(text, lltokenizer)
    if failed:
        raise FormatError(param, prefix + _one_line(messages[0]))
    return Grammar(text, lltokenizer)


def _one_line(message: str) -> str:
    """llguidance's message without the lines that echo the grammar, on one line."""
    lines = [line.strip() for line in message.splitlines() if not _ECHOED_SOURCE.match(line)]
    return _POSITION.sub("", " ".join(line for line in lines if line))


_TOKENIZERS: weakref.WeakKeyDictionary[Any, LLTokenizer] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Any) -> LLTokenizer:
    """llguidance's view of ``tokenizer`` (a ``gpt2.Tokenizer``: every id's bytes, the special
    tokens, <|endoftext|> the end), built once per tokenizer (about a second for GPT-2's)."""
    with _LOCK:
        found = _TOKENIZERS.get(tokenizer)
        if found is None:
            specials = dict(tokenizer.special_tokens)
            special_ids = set(specials.values())
            ranks = {tokenizer.decode_bytes([i]): i for i in range(tokenizer.n_vocab) if i not in special_ids}
            found = LLTokenizer.from_tiktoken(encoder=ranks, special_tokens=specials, pattern=GPT2_PATTERN,
                                              eos_token=tokenizer.eot_token)
            _TOKENIZERS[tokenizer] = found
        return found


# ----------------------------------------------------------------------------------------------------
# Constraints


class Constraint:
    """Where one sequence is in its grammar."""

    def __init__(self, matcher: LLMatcher, n_vocab: int) -> None:
        self.matcher, self.n_vocab = matcher, n_vocab

    def advance(self, token: int) -> None:
        """Take the drawn ``token`` (one ``allowed_tokens`` allowed)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """Whether the text is complete and the grammar takes no more tokens."""
        return self.matcher.is_stopped() and not self.matcher.is_error()


@functools.cache  # made on first use: it starts threads
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


def allowed_tokens(constraints: Sequence[Constraint], vocab_size: int, device: torch.device) -> Tensor:
    """Which tokens each constraint allows next: (len(constraints), vocab_size) booleans, computed
    together on llguidance's threads (ids beyond the tokenizer's, if the model has any, are never
    allowed)."""
    n_vocab = constraints[0].n_vocab  # the tokenizer's: every constraint of an engine has the same
    bitmask = allocate_token_bitmask(len(constraints), n_vocab)
    fill_next_token_bitmask_par(_executor(), [(c.matcher, i) for i, c in enumerate(constraints)], bitmask)
    for c in constraints:
        if c.matcher.is_error():
            raise RuntimeError(f"the grammar failed: {c.matcher.get_error()}")
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, : min(n_vocab, vocab_size)]
    allowed = torch.zeros(len(constraints), vocab_size, dtype=torch.bool)
    allowed[:, : bits.shape[1]] = torch.from_numpy(bits.astype(bool))
    return allowed.to(device)
