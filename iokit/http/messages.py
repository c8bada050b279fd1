"""What the request parser hands out: a request head, body chunks, and the end of a message.

These are plain values with no I/O attached, so the parser can be tested by feeding bytes and comparing lists of events,
and the server can keep a few of them buffered while a handler is busy (pipelining).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator


def comma_separated(values: Iterable[str]) -> list[str]:
    """Return the elements of comma-separated header ``values`` (RFC 9110 section 5.6.1), stripped and lower-cased."""
    return [token.strip().lower() for value in values for token in value.split(",") if token.strip()]


class Headers:
    """An ordered, case-insensitive multi-map of header fields, as received.

    Names are kept lower-cased (HTTP field names are case-insensitive); values are ``str`` decoded as latin-1, so every
    byte a client sent survives the round trip (``value.encode("latin-1")``), with surrounding whitespace removed.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: Iterable[tuple[str, str]] = ()):
        self._fields = [(name.lower(), value) for name, value in fields]

    @classmethod
    def from_lowercase(cls, fields: list[tuple[str, str]]) -> "Headers":
        """Return headers over ``fields`` as given: names already lower-case (the parser's fast path; no copy)."""
        headers = cls.__new__(cls)
        headers._fields = fields
        return headers

    def get(self, name: str, default: str | None = None) -> str | None:
        """Return the first value of ``name``, or ``default`` when the field is absent."""
        name = name.lower()
        for field_name, value in self._fields:
            if field_name == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Return every value of ``name`` in arrival order (an empty list when absent)."""
        name = name.lower()
        return [value for field_name, value in self._fields if field_name == name]

    def get_tokens(self, name: str) -> list[str]:
        """Return the comma-separated list elements of every ``name`` field, stripped and lower-cased."""
        return comma_separated(self.get_all(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(field_name == name.lower() for field_name, _ in self._fields)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._fields == other._fields

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


@dataclasses.dataclass(frozen=True)
class RequestHead:
    """A request line and header section that passed every framing check.

    ``content_length`` is the declared body size (``None`` without the header); ``chunked`` says the body is chunked;
    a request with neither has no body. ``keep_alive`` is what the client asked for (HTTP/1.1 default, or HTTP/1.0 with
    ``Connection: keep-alive``); the server may still close.
    """

    method: str
    target: str
    version: str
    headers: Headers
    keep_alive: bool
    content_length: int | None
    chunked: bool
    expect_continue: bool

    @property
    def has_body(self) -> bool:
        """Return ``True`` when a body follows the head (chunked, or a non-zero Content-Length)."""
        return self.chunked or bool(self.content_length)


@dataclasses.dataclass(frozen=True)
class BodyChunk:
    """Some bytes of the current request's body, already de-chunked."""

    data: bytes


class EndOfMessage:
    """The current request is complete (its whole body, if any, was delivered). Use the ``END_OF_MESSAGE`` singleton."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_MESSAGE"


END_OF_MESSAGE = EndOfMessage()
