"""Every limit of the HTTP core, in one place.

A server on the open network has to bound what a client can make it hold: the bytes of a request head, the number of header
fields, the body it buffers, the time it waits for a head to finish (slowloris) or for the next request on an idle
keep-alive connection, and the number of connections. Each bound here is the one ``docs/patterns.md`` (section 1) names,
with the status a client gets when it crosses it. The server reads them from one frozen ``HttpLimits``; a test or a
command-line flag builds another with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses

KIB = 1024
MIB = 1024 * KIB

MAX_NUMBER_DIGITS = 19
"""The most digits a number from a client may have (query, header, JSON field): 19 fit in 63 bits. Longer is 400."""

MAX_JSON_DEPTH = 32
"""How deeply arrays and objects may nest in a JSON body; deeper is 400 (parsing recurses once per level)."""


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """The bounds one HTTP server enforces. Sizes are in bytes, times in seconds."""

    max_request_line_bytes: int = 8 * KIB
    """Method, target and version together; longer gets 414 and the connection closes."""

    max_header_bytes: int = 16 * KIB
    """All header fields together (names, values and their separators); more gets 431 and close."""

    max_header_fields: int = 100
    """More fields than this gets 431 and close."""

    max_body_bytes: int = 1 * MIB
    """The default body cap (413). A route may raise it, or lift it and stream the body (the upload server does)."""

    header_timeout: float = 10.0
    """The whole header section must arrive within this time of its first byte, or 408 and close (slowloris)."""

    idle_timeout: float = 15.0
    """A keep-alive connection with no request started for this long is closed (no response: nothing was asked)."""

    max_connections: int = 1024
    """Connections served at once per process; one more gets 503 and close."""

    body_read_timeout: float = 60.0
    """A body that stops arriving for this long counts as cut off (the handler sees ``BodyIncomplete``)."""

    send_timeout: float = 10.0
    """A response write that makes no progress for this long ends the connection (a client that stopped reading)."""

    drain_body_bytes: int = 64 * KIB
    """A body the handler left unread is read and discarded to keep the connection, up to this size; past it we close."""

    linger_timeout: float = 2.0
    """Before closing, how long we read and discard what the client still sends, so our last response is not lost to a
    TCP reset (the kernel resets a connection closed with unread input)."""

    max_chunk_line_bytes: int = 4 * KIB
    """A chunk-size line of a chunked body, extensions included (RFC 9112 section 7.1.1); longer gets 400 and close."""

    receive_size: int = 64 * KIB
    """Bytes asked for per read of the socket; also how far the parser may run ahead of the handler."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and value <= 0:
                raise ValueError(f"HttpLimits.{field.name} must be positive, not {value!r}")


DEFAULT_LIMITS = HttpLimits()
