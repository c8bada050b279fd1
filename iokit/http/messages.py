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

    The parser builds it from the bytes it saw (``from_raw``) and nothing is decoded until a handler looks: a plain GET
    whose handler reads no header pays for none. ``get`` looks in the raw fields without decoding the others.
    """

    __slots__ = ("_fields", "_raw")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()):
        self._fields = [(name.lower(), value) for name, value in fields]
        self._raw = None

    @classmethod
    def from_lowercase(cls, fields: list[tuple[str, str]]) -> "Headers":
        """Return headers over ``fields`` as given: names already lower-case (no copy)."""
        headers = cls.__new__(cls)
        headers._fields = fields
        headers._raw = None
        return headers

    @classmethod
    def from_raw(cls, raw: list[tuple[bytes, bytes]]) -> "Headers":
        """Return headers over the parser's ``(name, value)`` bytes, decoded on first use."""
        headers = cls.__new__(cls)
        headers._fields = None
        headers._raw = raw
        return headers

    def _decoded(self) -> list[tuple[str, str]]:
        fields = self._fields
        if fields is None:
            fields = self._fields = [(name.decode("latin-1").lower(), value.decode("latin-1").strip(" \t"))
                                     for name, value in self._raw]
            self._raw = None
        return fields

    def get(self, name: str, default: str | None = None) -> str | None:
        """Return the first value of ``name``, or ``default`` when the field is absent."""
        raw = self._raw
        if raw is not None:
            wanted = name.lower().encode("latin-1")
            for field_name, value in raw:
                if len(field_name) == len(wanted) and field_name.lower() == wanted:
                    return value.decode("latin-1").strip(" \t")
            return default
        name = name.lower()
        for field_name, value in self._fields:
            if field_name == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Return every value of ``name`` in arrival order (an empty list when absent)."""
        name = name.lower()
        return [value for field_name, value in self._decoded() if field_name == name]

    def get_tokens(self, name: str) -> list[str]:
        """Return the comma-separated list elements of every ``name`` field, stripped and lower-cased."""
        return comma_separated(self.get_all(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._raw) if self._raw is not None else len(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._decoded() == other._decoded()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({self._decoded()!r})"


class RequestHead:
    """A request line and header section that passed every framing check.

    ``content_length`` is the declared body size (``None`` without the header); ``chunked`` says the body is chunked;
    a request with neither has no body. ``keep_alive`` is what the client asked for (HTTP/1.1 default, or HTTP/1.0 with
    ``Connection: keep-alive``); the server may still close. A plain class with slots, not a frozen dataclass: one is
    made per request, and a frozen dataclass's ``__init__`` costs a ``object.__setattr__`` per field.
    """

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "content_length", "chunked", "expect_continue")

    def __init__(self, method: str, target: str, version: str, headers: Headers, keep_alive: bool,
                 content_length: int | None, chunked: bool, expect_continue: bool):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue

    @property
    def has_body(self) -> bool:
        """Return ``True`` when a body follows the head (chunked, or a non-zero Content-Length)."""
        return self.chunked or bool(self.content_length)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RequestHead) and all(getattr(self, name) == getattr(other, name)
                                                      for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RequestHead({self.method} {self.target} HTTP/{self.version}, {self.headers!r})"


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
