"""Responses: what a handler returns, and how it is framed on the wire (sans-IO).

The framing rules are RFC 9112 section 6 seen from the server: a response to HEAD, and any 1xx, 204 or 304, has no body;
a body known in advance goes out with Content-Length; a body produced as it goes (an async iterator: a download, an event
stream) is chunked for an HTTP/1.1 client, and for an HTTP/1.0 client, which knows no chunks, it runs until we close. The
server alone decides ``Connection`` and ``Transfer-Encoding``, so a handler cannot produce a response whose framing
disagrees with the bytes that follow it.
"""

from __future__ import annotations

import email.utils
import enum
import json
import time
from typing import Any, AsyncIterable, Iterable

from .errors import HttpError
from .status import reason_phrase

SERVER_NAME = "iokit"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
# Framing and connection management belong to the server; a handler's values for these are dropped.
_SERVER_OWNED_HEADERS = frozenset({"connection", "transfer-encoding", "keep-alive", "date", "server"})


class Response:
    """What a handler returns: a status, header fields, and a body.

    ``body`` is ``bytes`` (or ``str``, sent as UTF-8) for a body known in advance, or an async iterable of ``bytes`` for one
    produced as it goes (sent chunked, or with the ``Content-Length`` the handler set, which it must then honour).
    ``headers`` is an iterable of ``(name, value)`` pairs or a dict; ``content_type`` is a shortcut for that header.
    """

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int = 200, body: bytes | str | AsyncIterable[bytes] = b"", *,
                 headers: Iterable[tuple[str, str]] | dict[str, str] = (), content_type: str | None = None):
        self.status = status
        self.headers = list(headers.items() if isinstance(headers, dict) else headers)
        if content_type is not None:
            self.headers.append(("Content-Type", content_type))
        self.body = body.encode() if isinstance(body, str) else body

    @classmethod
    def json(cls, value: Any, status: int = 200, *, headers: Iterable[tuple[str, str]] = ()) -> "Response":
        """Return a response whose body is ``value`` as compact JSON (``application/json``)."""
        body = json.dumps(value, separators=(",", ":")).encode() + b"\n"
        return cls(status, body, headers=headers, content_type="application/json")

    @classmethod
    def from_error(cls, error: HttpError) -> "Response":
        """Return the JSON error response ``{"error": ..., "detail": ...}`` for ``error``, with its extra headers."""
        return cls.json({"error": error.error, "detail": error.detail}, error.status, headers=error.headers)

    def header(self, name: str) -> str | None:
        """Return the first value the handler set for ``name`` (case-insensitive), or ``None``."""
        name = name.lower()
        return next((value for field, value in self.headers if field.lower() == name), None)


class BodyFraming(enum.Enum):
    NONE = "no body"                  # HEAD, 1xx, 204, 304
    LENGTH = "Content-Length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until close"       # a streamed body to an HTTP/1.0 client


class FramedHead:
    """The bytes of a status line and header section, and how the body after it must be sent.

    ``content_length`` is set for ``BodyFraming.LENGTH`` (even for HEAD, where it describes the body not sent);
    ``close`` says the connection ends after this response. (A slots class: one is made per response.)
    """

    __slots__ = ("data", "framing", "content_length", "close")

    def __init__(self, data: bytes, framing: BodyFraming, content_length: int | None, close: bool):
        self.data = data
        self.framing = framing
        self.content_length = content_length
        self.close = close


def status_has_body(status: int) -> bool:
    """Return ``False`` for the statuses that never carry a body (1xx, 204, 304)."""
    return not (100 <= status < 200 or status in (204, 304))


def frame_response(response: Response, *, request_method: str, request_version: str, keep_alive: bool) -> FramedHead:
    """Return the head to send for ``response`` to a request with this method and version.

    ``keep_alive`` is the server's wish to keep the connection; the head says ``Connection: close`` when it will not (or
    when the body must run until close), and ``Connection: keep-alive`` to an HTTP/1.0 client that keeps it.
    Raises ``ValueError`` for a handler's ``Content-Length`` that is not a number or disagrees with a ``bytes`` body.
    """
    body = response.body
    key = None
    if body.__class__ is bytes:
        # A server answers the same few shapes over and over: the head but for its Date line is remembered per
        # status, handler fields, body size, keep-alive, version and HEAD (what decides it), and only so many.
        key = (response.status, tuple(response.headers), len(body), keep_alive, request_version,
               request_method == "HEAD")
        try:
            known = _known_heads.get(key)
        except TypeError:  # a field that is not a hashable pair: framed every time
            known, key = None, None
        if known is not None:
            status_line, fields, framing, content_length, close = known
            return FramedHead(b"".join((status_line, _date_and_server(), fields)), framing, content_length, close)
    fields, declared_length, keep_alive = _handler_fields(response, keep_alive)
    streamed = not isinstance(body, (bytes, bytearray, memoryview))
    content_length = None

    if not status_has_body(response.status):
        framing = BodyFraming.NONE
    else:
        if not streamed:
            if declared_length is not None and declared_length != len(body) and request_method != "HEAD":
                raise ValueError(f"Content-Length {declared_length} for a body of {len(body)} bytes")
            content_length = len(body) if declared_length is None else declared_length
        else:
            content_length = declared_length
        if content_length is not None:
            framing = BodyFraming.LENGTH
            fields.append(("Content-Length", str(content_length)))
        elif request_version == "1.1":
            framing = BodyFraming.CHUNKED
            fields.append(("Transfer-Encoding", "chunked"))
        else:
            framing = BodyFraming.UNTIL_CLOSE
            keep_alive = False
        if request_method == "HEAD":
            framing = BodyFraming.NONE

    if not keep_alive:
        fields.append(("Connection", "close"))
    elif request_version == "1.0":
        fields.append(("Connection", "keep-alive"))
    status_line, encoded = _status_line(response.status), _encode_fields(fields)
    if key is not None:
        if len(_known_heads) >= _MAX_KNOWN_HEADS:
            _known_heads.clear()
        _known_heads[key] = (status_line, encoded, framing, content_length, not keep_alive)
    return FramedHead(b"".join((status_line, _date_and_server(), encoded)), framing, content_length, not keep_alive)


_MAX_KNOWN_HEADS = 256
_known_heads: dict[tuple, tuple] = {}


def encode_chunk(data: bytes) -> bytes:
    """Return ``data`` as one chunk of a chunked body (empty data gives nothing: an empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _handler_fields(response: Response, keep_alive: bool) -> tuple[list[tuple[str, str]], int | None, bool]:
    """Return the handler's header fields the server passes on, its Content-Length, and ``keep_alive`` updated by its
    ``Connection: close``. One pass: this runs for every response."""
    fields = []
    declared_length = None
    for name, value in response.headers:
        lowered = name.lower()
        if lowered == "content-length":
            if not value.strip().isdigit():
                raise ValueError(f"invalid Content-Length {value!r} from a handler")
            declared_length = int(value)
        elif lowered == "connection":
            keep_alive = keep_alive and "close" not in value.lower()
        elif lowered not in _SERVER_OWNED_HEADERS:
            fields.append((name, value))
    return fields, declared_length, keep_alive


def _encode_fields(fields: list[tuple[str, str]]) -> bytes:
    """Return the header lines after Date and Server, and the blank line that ends the head."""
    text = "".join([f"{name}: {value}\r\n" for name, value in fields])
    if text.count("\n") != len(fields) or text.count("\r") != len(fields):
        # A handler echoing client text into a header must not be able to split the response.
        name = next(name for name, value in fields if "\r" in name + value or "\n" in name + value)
        raise ValueError(f"header {name!r} contains a line break")
    return text.encode("latin-1") + b"\r\n"


_status_lines: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _status_lines.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} {reason_phrase(status)}\r\n".encode("ascii")
        if len(_status_lines) < 1000:
            _status_lines[status] = line
    return line


_date_cache: tuple[int, bytes] = (0, b"")


def _date_and_server() -> bytes:
    """Return the ``Date`` and ``Server`` lines; formatted at most once a second (they are on every response)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        date = email.utils.formatdate(now, usegmt=True).encode("ascii")
        _date_cache = (now, b"Date: " + date + b"\r\nServer: " + SERVER_NAME.encode() + b"\r\n")
    return _date_cache[1]
