"""Structured output: a request's format as a grammar, and the constraint that holds a sequence to it.

A request asks for a format with OpenAI's ``response_format`` (``{"type": "json_object"}``, or
``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``) or vLLM's
``structured_outputs`` (``{"json": schema}``, ``{"regex": pattern}`` or ``{"choice": [strings]}``).
``grammar_of`` turns it into an llguidance grammar, checked and compiled up front, in the request's
thread: a format over this server's bounds (``MAX_CHOICES``, ``MAX_LITERAL_CHARS``, ``MAX_EXPANSION``,
``MAX_SCHEMA_CHARS``, ``MAX_SCHEMA_DEPTH``: what makes a grammar's masks slow, or its compilation
fail), a string that is no Unicode text, a schema llguidance cannot compile, one that no value
satisfies, or one whose first mask fails, is a ``FormatError`` naming the problem in one line (at most
``MESSAGE_CHARS`` of llguidance's own message), before anything is submitted. The lexer is built and
the first mask computed then, on a matcher each sequence starts from a copy of; the engine's loop never
compiles.

Each sequence of such a request has a ``Constraint`` (an ``llguidance.LLMatcher``): before a token is
drawn, ``allowed_tokens`` gives every constrained row's allowed tokens in one batched call; the drawn
token ``advance``s it; ``done`` says that the grammar can take nothing more. llguidance allows
<|endoftext|> exactly when the text so far is complete, so a reply that ends by itself is complete. A
grammar can still fail while a sequence generates (a limit of llguidance's met after some tokens, as by
an object of 500 optional properties): the constraint's ``error`` then says so, and the engine ends
that sequence alone with it.

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
from dataclasses import dataclass, field
from typing import Any, Literal

import llguidance
import numpy as np
import torch
from llguidance import LLMatcher, LLParserLimits, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask, fill_next_token_bitmask_par
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from gpt2.tokenizer.bpe import GPT2_PATTERN
from gpt2.util.errors import UserError, bounded
from gpt2.util.jsonfile import parse_json

JSON_OPTIONS = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions; compact JSON
# llguidance's default limits, with errors that name the problem without its parser's state or the grammar
LIMITS = LLParserLimits(verbose_errors=False)
MAX_CHOICES = 1000  # choices of a request, items of a list in a schema (llguidance's rows take 2000)
MAX_LITERAL_CHARS = 2000  # a choice, a regex, a string of a schema (a literal's masks cost in its length)
MAX_EXPANSION = 2000  # a regex's characters with its counted repetitions ({n}, {n,m}) written out
MAX_SCHEMA_CHARS = 100_000  # a JSON schema, as compact JSON
MAX_SCHEMA_DEPTH = 64  # objects and lists within each other in a JSON schema
MESSAGE_CHARS = 300  # of a message in an error (llguidance's may hold the whole grammar)
_ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default"})  # not in a grammar
# keys of a schema whose value is a regex, a map of schemas by name, or one by regex (_schema_items)
_KEY_KINDS = {"pattern": "regex", "whitespace_pattern": "regex", "properties": "named", "$defs": "named",
              "definitions": "named", "dependentSchemas": "named", "patternProperties": "patterns"}
_COUNT = re.compile(r"\{(\d+)(,(\d*))?\}")  # a counted repetition: {n}, {n,} or {n,m}
_BRACED_ESCAPE = re.compile(r"\\[xuUpP]\{[^}]*\}")  # \x{41}, \p{Greek}: one character, no repetition
_GROUP_FLAGS = re.compile(r"\?(P?<[^>]*>|[a-zA-Z-]*:?)")  # after a group's "(": (?:, (?i), (?P<name>
_ECHOED_SOURCE = re.compile(r"^\s*(\^+|\d+ \|.*)\s*$")  # lines of an error that point into the grammar
_POSITION = re.compile(r"^at \d+\(\d+\): ")  # where in llguidance's own grammar text
_TERSE = "<non-verbose/>"  # what llguidance's errors end with when LIMITS leaves out their details


class FormatError(UserError):
    """A format that cannot be used: the request's 400, ``param`` its field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {bounded(message, MESSAGE_CHARS)}")
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
    """An llguidance grammar checked against ``tokenizer`` and compiled (``compiled``: a matcher whose
    lexer is built and first mask computed); ``constraint()`` starts a sequence on a copy of it.
    ``param`` is the request's field that asked for it, named in the errors of its sequences."""

    text: str
    tokenizer: LLTokenizer
    param: str
    compiled: LLMatcher = field(repr=False)

    def constraint(self) -> Constraint:
        return Constraint(self.compiled.deep_copy(), self.tokenizer.vocab_size, self.param)


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
    _check_text([given.regex] if given.regex is not None else given.choice or [], param)
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
        _check_regex(given.regex, param)
        return checked(LLMatcher.grammar_from_regex(given.regex), tokenizer, param,
                       "the regex cannot be used: ")
    options = given.choice or []
    if len(options) > MAX_CHOICES:
        raise FormatError(param, f"{len(options)} choices are more than this server takes ({MAX_CHOICES})")
    longest = max(options, key=len)
    if len(longest) > MAX_LITERAL_CHARS:
        raise FormatError(param, f"a choice of {len(longest)} characters is longer than this server takes "
                          f"({MAX_LITERAL_CHARS})")
    return checked(llguidance.grammar_from("choice", json.dumps(options)), tokenizer, param,
                   "the choices cannot be used: ")


def json_grammar(schema: dict[str, Any], tokenizer: Any, param: str) -> Grammar:
    """The grammar of the JSON values ``schema`` validates, compact (``JSON_OPTIONS``), once the schema
    is within this server's bounds."""
    _check_schema(schema, param)
    try:
        text = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise FormatError(param, f"the JSON schema cannot be used: {_one_line(str(e))}") from None
    return checked(text, tokenizer, param, "the JSON schema cannot be used: ")


def checked(text: str, tokenizer: Any, param: str, prefix: str = "") -> Grammar:
    """``text`` as a ``Grammar`` over ``tokenizer``, once llguidance finds it valid and satisfiable and
    has compiled it: its lexer built and its first mask computed here, in the request's thread (a
    schema whose references loop, a regex of an empty class, fail only then)."""
    lltokenizer = ll_tokenizer(tokenizer)
    failed, messages = LLMatcher.validate_grammar_with_warnings(text, lltokenizer, limits=LIMITS)
    if failed:
        raise FormatError(param, prefix + _one_line(messages[0]))
    compiled = LLMatcher(lltokenizer, text, log_level=0, limits=LIMITS)
    if not compiled.is_error():
        fill_next_token_bitmask(compiled, allocate_token_bitmask(1, lltokenizer.vocab_size), 0)
    if compiled.is_error():
        reason = _one_line(compiled.get_error())
        raise FormatError(param, f"{prefix}no text can be generated for it ({reason})")
    return Grammar(text, lltokenizer, param, compiled)


def _check_text(strings: Sequence[str], param: str) -> None:
    """A ``FormatError`` for a string that is no Unicode text (a lone surrogate, \\ud800 to \\udfff)."""
    for text in strings:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError(param, f"{text[:60]!r} holds a lone surrogate (\\ud800 to \\udfff), which is "
                              "no Unicode character") from None


def _check_regex(regex: str, param: str) -> None:
    """A ``FormatError`` for a regex longer than ``MAX_LITERAL_CHARS``, or whose counted repetitions
    expand it beyond ``MAX_EXPANSION`` characters (``a{1000000}`` makes llguidance build a lexer for a
    minute, then fail)."""
    if len(regex) > MAX_LITERAL_CHARS:
        raise FormatError(param, f"a regex of {len(regex)} characters is longer than this server takes "
                          f"({MAX_LITERAL_CHARS})")
    size = expansion(regex)
    if size > MAX_EXPANSION:
        raise FormatError(param, f"the regex {bounded(regex, 60)!r} stands for {size} characters once its "
                          f"counted repetitions are written out, more than this server takes "
                          f"({MAX_EXPANSION}); bound them less, or use * and +")


def expansion(regex: str) -> int:
    """About how many characters ``regex`` has with its counted repetitions written out: each atom
    (a character, an escape, a class) is 1, a group the sum of its own, and ``{n}``, ``{n,}`` or
    ``{n,m}`` multiplies what it follows by n or m (nested ones multiply together)."""
    sizes, last, i = [0], 0, 0  # sizes: of each open group; last: of the atom a count would repeat
    while i < len(regex):
        char, count = regex[i], _COUNT.match(regex, i)
        if count is not None and last:
            times = int(count[3]) if count[3] else int(count[1])
            sizes[-1] += last * (times - 1)
            last, i = last * times, count.end()
            continue
        if char == "(":
            sizes.append(0)
            flags = _GROUP_FLAGS.match(regex, i + 1)
            last, i = 0, i + 1 if flags is None else flags.end()
            continue
        if char == ")" and len(sizes) > 1:
            last = max(sizes.pop(), 1)
            sizes[-1] += last
            i += 1
            continue
        end = _atom_end(regex, i)
        last, i = 1, end
        sizes[-1] += 1
    return sum(sizes)


def _atom_end(regex: str, i: int) -> int:
    """Where the atom at ``i`` ends: an escape (braced ones whole), a class (nested ones too), else one
    character."""
    if regex[i] == "\\":
        braced = _BRACED_ESCAPE.match(regex, i)
        return braced.end() if braced is not None else i + 2
    if regex[i] != "[":
        return i + 1
    depth, j = 0, i
    while j < len(regex):
        if regex[j] == "\\":
            j += 2
            continue
        if regex[j] == "[":
            depth += 1
            j += 1 + regex.startswith("^", j + 1)
            j += regex.startswith("]", j)  # a ] first in a class is one of its characters
            continue
        depth -= regex[j] == "]"
        j += 1
        if depth == 0:
            return j
    return j


def _check_schema(schema: dict[str, Any], param: str) -> None:
    """A ``FormatError`` for a schema over this server's bounds: nested deeper than
    ``MAX_SCHEMA_DEPTH``, longer than ``MAX_SCHEMA_CHARS`` as JSON, a list of more than ``MAX_CHOICES``
    items, a string (not an annotation) of more than ``MAX_LITERAL_CHARS``, a pattern over
    ``MAX_EXPANSION``, or a lone surrogate. Walked without recursion: it may nest as deep as its
    parser allowed."""
    stack: list[tuple[Any, int, str]] = [(schema, 1, "")]  # a value, its depth, its kind (_schema_items)
    while stack:
        value, depth, kind = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise FormatError(param, f"the JSON schema nests deeper than this server takes "
                              f"({MAX_SCHEMA_DEPTH} objects and lists)")
        if isinstance(value, str):
            _check_schema_string(value, kind == "regex", param)
        elif isinstance(value, list | dict):
            stack += [(item, depth + 1, item_kind) for item, item_kind in _schema_items(value, kind, param)]
    size = len(json.dumps(schema, ensure_ascii=False, separators=(",", ":")))
    if size > MAX_SCHEMA_CHARS:
        raise FormatError(param, f"the JSON schema is {size} characters long as JSON, more than this server "
                          f"takes ({MAX_SCHEMA_CHARS})")


def _schema_items(value: list[Any] | dict[str, Any], kind: str, param: str) -> list[tuple[Any, str]]:
    """What a list or object of a schema holds that its grammar is made of, each with its kind: "regex"
    (a pattern, a key of patternProperties), "named" (a map of schemas by name, such as properties,
    whose keys are names, not annotations), "patterns" (patternProperties: one whose keys are regexes)
    or "". Annotations (a schema's title...) are left out."""
    if isinstance(value, list):
        if len(value) > MAX_CHOICES:
            raise FormatError(param, f"a list of {len(value)} items in the JSON schema is longer than "
                              f"this server takes ({MAX_CHOICES})")
        return [(item, "") for item in value]
    named = kind in ("named", "patterns")
    items = [(item, "" if named else _KEY_KINDS.get(key, "")) for key, item in value.items()
             if named or key not in _ANNOTATIONS]
    return items + [(key, "regex" if kind == "patterns" else "") for key in value]


def _check_schema_string(text: str, regex: bool, param: str) -> None:
    """A ``FormatError`` for a string of a schema that is no Unicode text, too long, or (``regex``) a
    pattern over ``MAX_EXPANSION``."""
    _check_text([text], param)
    if len(text) > MAX_LITERAL_CHARS:
        raise FormatError(param, f"a string of {len(text)} characters in the JSON schema is longer than "
                          f"this server takes ({MAX_LITERAL_CHARS})")
    if regex:
        _check_regex(text, param)


def _one_line(message: str) -> str:
    """llguidance's message without the lines that echo the grammar, on one line."""
    lines = [line.strip() for line in message.replace(_TERSE, "").splitlines()
             if not _ECHOED_SOURCE.match(line)]
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
    """Where one sequence is in its grammar; ``param``, the request's field, names it in errors."""

    def __init__(self, matcher: LLMatcher, n_vocab: int, param: str) -> None:
        self.matcher, self.n_vocab, self.param = matcher, n_vocab, param

    def advance(self, token: int) -> None:
        """Take the drawn ``token`` (one ``allowed_tokens`` allowed); ``FormatError`` if the grammar
        fails on it."""
        if not self.matcher.consume_token(token):
            raise self.error or FormatError(self.param, f"the format refused token {token}")

    @property
    def error(self) -> FormatError | None:
        """The request's error once its grammar has failed while generating (a limit of llguidance's
        met after some tokens), else None."""
        if not self.matcher.is_error():
            return None
        message = _one_line(self.matcher.get_error())
        return FormatError(self.param, f"the format failed while generating: {message}")

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
    allowed). A constraint whose grammar fails allows nothing; its ``error`` says why."""
    n_vocab = constraints[0].n_vocab  # the tokenizer's: every constraint of an engine has the same
    bitmask = allocate_token_bitmask(len(constraints), n_vocab)
    fill_next_token_bitmask_par(_executor(), [(c.matcher, i) for i, c in enumerate(constraints)], bitmask)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, : min(n_vocab, vocab_size)]
    allowed = torch.zeros(len(constraints), vocab_size, dtype=torch.bool)
    allowed[:, : bits.shape[1]] = torch.from_numpy(bits.astype(bool))
    return allowed.to(device)
