"""The two exceptions a handler meets: ``HttpError`` (answer with this status) and ``BodyIncomplete`` (the body stopped).

Every error an HTTP server of ours sends is a JSON body ``{"error": ..., "detail": ...}``: ``error`` is a short, stable,
machine-readable code (by default the status's reason phrase in snake case), ``detail`` says to a person what was wrong.
The parser reports a malformed request as an ``HttpError`` with ``close=True``: after a framing error nothing that follows
on the connection can be trusted, so the server answers and closes.
"""

from __future__ import annotations

from typing import Iterable

from .status import error_code


class HttpError(Exception):
    """An error response: raise it from a handler, or find it among the parser's events.

    ``status`` is the HTTP status, ``detail`` a sentence for people, ``error`` a short code (default: from the status),
    ``headers`` extra response headers (``Allow`` for 405, ``Retry-After`` for 503...), and ``close`` asks the server to
    close the connection after the response.
    """

    def __init__(self, status: int, detail: str = "", *, error: str | None = None,
                 headers: Iterable[tuple[str, str]] = (), close: bool = False):
        super().__init__(f"{status} {detail}")
        self.status = status
        self.detail = detail
        self.error = error or error_code(status)
        self.headers = list(headers)
        self.close = close

    def __eq__(self, other: object) -> bool:
        # Events compare by value, so tests can assert on parser output; identity is meaningless for them.
        if not isinstance(other, HttpError):
            return NotImplemented
        return (self.status, self.error, self.detail, self.headers, self.close) == (
            other.status, other.error, other.detail, other.headers, other.close)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"HttpError({self.status}, {self.detail!r}, error={self.error!r}, close={self.close})"


class BodyIncomplete(Exception):
    """The request body ended before its declared end: the client closed, reset, or stopped sending for too long.

    ``bytes_received`` is how many body bytes arrived (and were handed to the handler) before that; an upload handler
    keeps them. ``reason`` says which of the three happened: ``CLOSED`` (closed or reset) or ``TIMEOUT``.
    """

    CLOSED = "connection closed"
    TIMEOUT = "timeout"

    def __init__(self, bytes_received: int, reason: str):
        super().__init__(f"request body cut off after {bytes_received} bytes: {reason}")
        self.bytes_received = bytes_received
        self.reason = reason
