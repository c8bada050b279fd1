"""Numbers and JSON that come from a client, read one way everywhere.

Python's own readers are too generous for input from the network. ``str.isdigit()`` says yes to a superscript two and
to other scripts' digits, and ``int()`` then refuses the first and reads the second (``int("٣") == 3``); ``int()``
refuses more than 4,300 digits with a ``ValueError`` a handler rarely expects; ``float()`` takes ``"nan"``, ``"inf"``,
``"1_0"`` and surrounding spaces. ``json.loads`` recurses once per nesting level, so a body of a few thousand ``[`` is a
``RecursionError`` (a 500), and it accepts ``NaN`` and ``Infinity``, which are not JSON.

So every number a client sends (a query parameter, a header, a JSON field) goes through ``read_integer`` or
``read_decimal``: ASCII digits only, at most ``MAX_NUMBER_DIGITS`` of them, nothing else (no sign, no space, no
underscore). They return ``None`` for anything else, and each caller raises its own typed error (an ``HttpError``
400, a tus error, ``InvalidJobRequest``), since the status and the wording are the caller's. Every JSON body goes
through ``read_json``, which checks the nesting depth before parsing and reads the integers in it with the same rule.
"""

from __future__ import annotations

import json
import re

from .limits import MAX_JSON_DEPTH, MAX_NUMBER_DIGITS

# A JSON string, escapes included: stripped before counting brackets, so a "[" inside a string does not count.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


class InvalidJson(ValueError):
    """A body that is not JSON we accept: malformed, not UTF-8, nested too deeply, or with a number out of bounds."""


def read_integer(text: str | None, max_digits: int = MAX_NUMBER_DIGITS) -> int | None:
    """Return the non-negative integer ``text`` spells in 1 to ``max_digits`` ASCII digits, else ``None`` (also for
    ``None``, an empty string, a sign, spaces, or any other script's digits)."""
    if text is None or not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def read_decimal(text: str | None, max_digits: int = MAX_NUMBER_DIGITS) -> float | None:
    """Return the non-negative number ``text`` spells as ASCII digits with an optional fraction (``"2"``, ``"0.5"``),
    each part at most ``max_digits`` long, else ``None``: no exponent, sign, ``nan``, ``inf`` or spaces."""
    if text is None:
        return None
    whole, point, fraction = text.partition(".")
    if read_integer(whole, max_digits) is None or (point and read_integer(fraction, max_digits) is None):
        return None
    return float(text)


def read_json(body: bytes, max_depth: int = MAX_JSON_DEPTH):
    """Return the value of the JSON ``body``. Raises ``InvalidJson`` for a body that is not UTF-8 JSON, that nests
    arrays and objects more than ``max_depth`` deep, that holds ``NaN`` or ``Infinity``, or an integer of more than
    ``MAX_NUMBER_DIGITS`` digits."""
    depth = _nesting_depth(body)
    if depth > max_depth:
        raise InvalidJson(f"the JSON nests {depth} levels deep; at most {max_depth} are accepted")
    try:
        return json.loads(body, parse_int=_json_integer, parse_constant=_refuse_constant)
    except (ValueError, UnicodeError) as error:
        if isinstance(error, InvalidJson):
            raise
        raise InvalidJson(f"the body is not JSON: {error}") from None


def _nesting_depth(body: bytes) -> int:
    """Return how deep arrays and objects nest in ``body`` (counted on the bytes: no recursion, whatever the input)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub(b"", body)):
        if bracket[0] in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _json_integer(text: str) -> int:
    number = read_integer(text.removeprefix("-"))
    if number is None:
        raise InvalidJson(f"an integer of {len(text)} characters is over the {MAX_NUMBER_DIGITS}-digit limit")
    return -number if text.startswith("-") else number


def _refuse_constant(name: str):
    raise InvalidJson(f"{name} is not JSON")
