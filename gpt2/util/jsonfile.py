"""JSON read from files and lines, the one way every module reads it. Valid JSON can still hold what
Python cannot carry on with: nesting deeper than its stack (``RecursionError``), numbers beyond a
float's range (1e999999 parses as inf) or with more digits than ``int`` converts (``ValueError``),
and escapes that are no Unicode character (a lone ``\\ud800``, which fails only later, when the text is
encoded). Each is refused here, in one ``UserError`` naming where it is, instead of a traceback
further on; ``check_field`` does the same for a field of the wrong type."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from gpt2.util.errors import UserError

# An escape of a UTF-16 surrogate (D800-DFFF): only where one occurs can a parsed string hold a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
          dict: "an object", type(None): "null"}


class NotJSON(UserError):
    """Text that is not JSON at all (a syntax error; a line cut short is one), as opposed to JSON that
    holds what cannot be read."""


class _Refused(ValueError):
    """A value that ``parse_json``'s hooks refuse (a number beyond a float's range)."""


def parse_json(text: str | bytes, where: str, *, finite: bool = True) -> Any:
    """The value of the JSON ``text``; ``where`` (a file, or ``file:line``) names it in the error.
    With ``finite``, NaN, Infinity and numbers that overflow a float are refused too (``finite=False``
    keeps them, for logs whose losses may have diverged)."""
    hooks: dict[str, Any] = {"parse_float": _finite_float, "parse_constant": _no_constant} if finite else {}
    try:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        value = json.loads(text, **hooks)
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start}); give JSON in "
                        "UTF-8") from None
    except json.JSONDecodeError as e:
        raise NotJSON(f"{where} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); "
                      "fix it") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to read (no file this reads nests more than a few "
                        "levels); it is damaged, or not the file meant") from None
    except _Refused as e:
        raise UserError(f"{where}: {e}; give finite numbers") from None
    except ValueError as e:  # an integer of more digits than int() converts
        raise UserError(f"{where}: a number too long to read ({str(e).split(';')[0]}); fix it") from None
    if _SURROGATE_ESCAPE.search(text):
        bad = _lone_surrogate(value)
        if bad is not None:
            raise UserError(f"{where}: the string {bad[:60]!r} holds an escape that is no Unicode character "
                            "(a lone surrogate, \\ud800 to \\udfff); fix it")
    return value


def parse_json_object(text: str | bytes, where: str) -> dict[str, Any]:
    """``parse_json``, and the value must be an object (every JSON file we read holds one)."""
    value = parse_json(text, where)
    if not isinstance(value, dict):
        raise UserError(f"{where} holds a JSON {_json_name(value)}, not an object; is it the file meant?")
    return value


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the UTF-8 file ``path`` (``parse_json_object``); a file that cannot be read
    is one error naming it, too."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); is it damaged?") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    return parse_json_object(text, str(path))


def check_field(obj: dict[str, Any], key: str, kinds: tuple[type, ...], where: str) -> None:
    """Refuse ``obj[key]``, where present, unless it is one of ``kinds`` (JSON's true is no number here,
    though Python's bool is an int): one line naming the field and what it must be."""
    if key not in obj:
        return
    value = obj[key]
    if isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)):
        return
    shown = [kind for kind in kinds if not (kind is int and float in kinds)]  # a number covers both
    expected = " or ".join(_KINDS.get(kind, kind.__name__) for kind in shown)
    raise UserError(f"{where}: {key} must be {expected}, found {_short(value)}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {_short(text)} is beyond a float's range")
    return value


def _no_constant(name: str) -> float:
    raise _Refused(f"{name} is not JSON (its numbers are finite)")


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in ``value`` that UTF-8 cannot encode; walked without recursion,
    since the value may nest as deep as the parser allowed."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
    return None


def _json_name(value: Any) -> str:
    """``value``'s kind as JSON calls it."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), "null")


def _short(value: Any) -> str:
    """``value`` for a message: its repr, cut to a line's worth (a hostile value may be huge)."""
    if isinstance(value, int) and value.bit_length() > 200:  # repr() of a long one may itself fail
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
