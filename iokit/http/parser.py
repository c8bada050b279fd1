"""A sans-IO HTTP/1.1 request parser: bytes in, request events out, over httptools (llhttp, the parser uvicorn uses).

llhttp does the byte-level work (request line, header syntax, chunked decoding) and already refuses the classic smuggling
shapes: Content-Length with Transfer-Encoding, a repeated Content-Length, ``chunked`` that is not the final coding. This
module adds what a server must decide on top of it, each a rule of RFC 9112 or a limit of ``HttpLimits``:

* **Limits on the head** (request line 414; header bytes or field count 431; a chunk-size line, extensions included,
  400). llhttp has no limits, and httptools keeps a header value that is still arriving in its own buffer, so besides
  counting what the callbacks hand us we count the bytes fed while a head (or a chunk-size line) is incomplete: that
  bounds memory even against one endless header line or chunk extension.
* **A request line without a version** (``GET /`` then CRLF) is 400 at once: llhttp would take it for HTTP/0.9 and wait
  for a header section that never comes, until the header timeout.
* **Framing the server can trust**: exactly one Host on HTTP/1.1 (400); a transfer coding other than ``chunked`` is 501
  (we implement no other); Transfer-Encoding on HTTP/1.0 is faulty framing (RFC 9112 section 6.1: 400); only versions 1.0
  and 1.1 (505; llhttp is told to accept any digit so that we, not it, answer that case).
* **Unknown methods**: llhttp rejects a method it does not know at its first wrong byte. A line shaped like a request
  (``TOKEN SP target SP HTTP/x.y``) with such a method gets 405, anything else (TLS, binary noise) 400. To tell them apart
  the parser keeps the bytes of a head that is still being read.
* **The same answer whatever the reads.** httptools hands over a token still arriving (a target, a header name, whose
  start reports the field before it) only where its buffer ends, and a syntax error later in the same buffer hides it;
  so httptools is fed in pieces cut where the bytes say, never where the reads do: at the end of each message (each
  head is then known from its first byte), at the end and at the bound of each chunk-size line, at the head bound. A
  head llhttp refuses is replayed with a cut after every line end and at the request-line bound, so that the first
  problem in byte order, a limit or a syntax error, is the one answered.

Every error is an ``HttpError`` event with ``close=True`` and ends the parser: after a framing error nothing later on the
connection can be trusted. Events come out in order through ``next_event()``; ``None`` means "feed me more bytes".

httptools parses everything it is fed in one call (it cannot pause between pipelined requests), so the caller bounds how far
the parser runs ahead of the handler by feeding only when ``next_event()`` returns ``None``.
"""

from __future__ import annotations

import enum
import re

import httptools

from .client_input import read_integer
from .errors import HttpError
from .limits import DEFAULT_LIMITS, HttpLimits
from .messages import END_OF_MESSAGE, BodyChunk, Headers, RequestHead, comma_separated

SUPPORTED_VERSIONS = ("1.0", "1.1")

# A request line whose method llhttp did not know, but which is otherwise well formed: the client asked for something we
# do not do (405), rather than speaking another protocol (400).
_REQUEST_LINE_SHAPE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/[0-9]\.[0-9]\r?\n")
_LEADING_BLANK_LINES = re.compile(rb"[\r\n]*")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]*")
_METHOD_CHARACTER = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]")
# The header fields the framing checks read; they are gathered as they arrive rather than searched for afterwards.
_FRAMING_FIELDS = frozenset({"host", "content-length", "transfer-encoding", "expect"})
# Bytes the request line of a message adds around its target: method and the " HTTP/1.1\r\n" after the target.
_REQUEST_LINE_OVERHEAD = len(b"  HTTP/1.1\r\n")
_LONGEST_METHOD = 32
_FRAMING_NAME_LENGTHS = frozenset(len(name) for name in _FRAMING_FIELDS)
_FRAMING_FIELD_BYTES = frozenset(name.encode("ascii") for name in _FRAMING_FIELDS)


class _State(enum.Enum):
    BETWEEN_MESSAGES = "between messages"
    HEAD = "reading a head"
    BODY = "reading a body"
    UNKNOWN_METHOD = "reading a request line with an unknown method"
    FAILED = "failed"


class _ChunkPhase(enum.Enum):
    LINE = "a chunk-size line"
    DATA = "chunk data and its CRLF"
    TRAILERS = "the trailer section"


class _ParserFailure(Exception):
    """Raised inside an httptools callback to stop the parse; the reason is in ``RequestParser._failure``."""


class RequestParser:
    """Turns the bytes of one connection into ``RequestHead``, ``BodyChunk``, ``END_OF_MESSAGE`` and ``HttpError`` events.

    ``feed(data)`` parses what it is given; ``next_event()`` returns the next event or ``None`` when more bytes are needed.
    After an ``HttpError`` event the parser is finished: it ignores further input and ``next_event()`` returns ``None``.
    """

    def __init__(self, limits: HttpLimits = DEFAULT_LIMITS):
        self._limits = limits
        self._max_header_fields, self._max_header_bytes = limits.max_header_fields, limits.max_header_bytes
        self._parser = httptools.HttpRequestParser(_Callbacks(self))
        # Let any digit version through llhttp so that *we* answer 1.2 or 3.0 with 505 rather than llhttp with 400.
        self._parser.set_dangerous_leniencies(lenient_version=True)
        self._events: list = []  # rarely more than a few: a list costs a tenth of a deque per connection
        self._state = _State.BETWEEN_MESSAGES
        self._failure: HttpError | None = None
        self._start_head()
        self._start_chunks()
        self._request_line_prefix: bytes | None = b""  # the head so far (405 vs 400, the replay of a failing head)
        self._request_line: bytes | None = b""  # the request line so far, until its end (None: its start is unknown)
        self._tail = b""  # the last two bytes fed to httptools (a blank line may straddle two pieces)
        self._fine = False  # cut heads after every line end and at the request-line bound (a replay; see _feed_part)

    # -- what the caller uses ------------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Parse ``data`` (the next bytes of the connection); the events it completes queue up for ``next_event()``."""
        if data and self._state is _State.BETWEEN_MESSAGES and not self._fine and \
                self._whole_head_end(data, 0) == len(data):
            # One whole head and nothing after it: the commonest read of all, one piece (see _feed_part).
            self._request_line = None
            taken = self._feed_piece(data)
            if taken < len(data):
                self._feed_part(data[taken:])  # after an upgrade request: HTTP again
            return
        self._feed_part(data)

    def _feed_part(self, data: bytes) -> None:
        # httptools hands over a token still being read (a target, a header name, whose start reports the field
        # before it) only when its buffer ends, and an error later in the same buffer hides it: where the buffers end
        # would decide whether a limit or a syntax error is seen first. So the buffers end where the bytes say, never
        # where the reads do: at each message's end (so each head's bytes are known from its start), at each
        # chunk-size line's end and at its bound; an error in a head is replayed in fine cuts (_first_head_error).
        # A request line without a version is judged here too, for every message, also one that starts inside the
        # piece that ended the message before it (pipelined): see _versionless_line_end.
        start = 0
        versionless = -1  # where (in data) a request line without a version ends, while it is being fed up to there
        while start < len(data) and self._state is not _State.FAILED:
            if self._state is _State.BETWEEN_MESSAGES and not self._fine:
                whole = self._whole_head_end(data, start)
                if whole:  # the common case, cut where the general path below would cut it, found in fewer steps
                    self._request_line = None
                    start += self._feed_piece(data[start:whole])
                    continue
            if self._state is _State.UNKNOWN_METHOD:
                self._classify_unknown_method(self._request_line_prefix + data[start:])
                return
            if self._state is _State.HEAD and self._head_bytes_fed >= self._head_bound():
                self._fail(431, "the header section is too large", report=True)
                return
            if versionless < 0 and (start == 0 or self._state is _State.BETWEEN_MESSAGES):
                versionless = self._versionless_line_end(data, start)
            end = self._next_cut(data, start)
            if versionless == start:  # the line without a version was fed up to its end, and llhttp took it all
                if self._state is _State.HEAD:
                    self._fail(400, "malformed request: the request line has no HTTP version", report=True)
                    return
                versionless, end = -1, start + 1  # a blank line before a request: its LF on its own, as llhttp skips it
            elif versionless > start:
                end = min(end, versionless)  # so that an error llhttp finds earlier in the line wins
            start += self._feed_piece(data[start:end])

    def _whole_head_end(self, data: bytes, start: int) -> int:
        """Where in ``data`` the head that starts at ``start`` ends, if all of it is there, within its bound, with a
        request line that has a version and no blank line before it; else 0 (the general path decides)."""
        first = data[start]
        if first == 13 or first == 10:
            return 0
        line_end = data.find(b"\n", start)
        if line_end < 0:
            return 0
        blank = data.find(b"\n\r\n", line_end)
        if blank < 0 or blank + 3 > start + self._head_bound():
            return 0
        if not (line_end - 10 >= start and data.startswith(b" HTTP/", line_end - 10)) and \
                not data[start:line_end].rstrip(b"\r").rpartition(b" ")[2].startswith(b"HTTP/"):
            return 0
        return blank + 3

    def _versionless_line_end(self, data: bytes, start: int) -> int:
        """Follow the request line of the message at ``start`` (or in progress there); return where in ``data`` it
        ends (its LF) if it has no HTTP version, else -1 (it has one, it has not ended yet, or its start is unknown).

        llhttp takes a request line without a version for HTTP/0.9 and waits for headers that never come, so each
        request line whose start we know is looked at when its end arrives. Called for the start of ``data`` and for
        every position between messages, so that each byte of a line is counted once whatever the reads."""
        if self._state is _State.BETWEEN_MESSAGES:
            self._request_line = b""
        elif self._state is not _State.HEAD or self._request_line is None:
            return -1
        line_end = data.find(b"\n", start)
        if line_end < 0:
            self._request_line = (self._request_line + data[start:])[: self._limits.max_request_line_bytes + 2]
            return -1
        line, self._request_line = self._request_line + data[start:line_end], None
        return -1 if line.rstrip(b"\r").rpartition(b" ")[2].startswith(b"HTTP/") else line_end

    def _head_bound(self) -> int:
        return self._limits.max_request_line_bytes + self._limits.max_header_bytes

    def _next_cut(self, data: bytes, start: int) -> int:
        """Where the next piece of ``data`` from ``start`` ends: at the next point the bytes (not the reads) fix."""
        state = self._state
        if state is _State.BODY and not self._chunked:
            remaining = (self._content_length or 0) - self._body_bytes
            return start + remaining if remaining > 0 else len(data)
        if state is _State.BODY:
            if self._chunk_phase is not _ChunkPhase.TRAILERS:
                return self._walk_chunks(data, start)
            return min(self._blank_line_end(data, start, self._tail), self._line_cut(data, start, self._tail))
        if state is _State.HEAD:
            lead, fed, tail = start, self._head_bytes_fed, self._tail
        else:  # between messages: llhttp skips blank lines before a request line
            lead, fed, tail = _LEADING_BLANK_LINES.match(data, start).end(), 0, b""
        end = min(lead + self._head_bound() - fed, self._blank_line_end(data, lead, tail))
        if self._fine:
            end = min(end, self._line_cut(data, lead, tail))
            request_line_bound = self._limits.max_request_line_bytes - _REQUEST_LINE_OVERHEAD + 2  # the first byte 414
            if request_line_bound > fed:
                end = min(end, lead + request_line_bound - fed)
        return max(end, start + 1)

    @staticmethod
    def _blank_line_end(data: bytes, start: int, tail: bytes) -> int:
        """Where the first blank line in ``data`` from ``start`` on ends (a head's end: llhttp wants CRLF), counting
        one that straddles ``tail`` (the last bytes fed) and ``data``; else ``len(data)``."""
        if tail:
            at = (tail + data[start:start + 2]).find(b"\n\r\n")
            if at >= 0:
                return start + at + 3 - len(tail)
        at = data.find(b"\n\r\n", start)
        return at + 3 if at >= 0 else len(data)

    @staticmethod
    def _line_cut(data: bytes, start: int, tail: bytes) -> int:
        """A cut after each line end and after the first byte of each line: a field is reported before its successor
        can fail, as the successor's first byte (when it starts a name) makes httptools hand the field over."""
        if tail.endswith(b"\n"):
            return start + 1
        line_end = data.find(b"\n", start)
        return line_end + 1 if line_end >= 0 else len(data)

    def _feed_piece(self, piece: bytes) -> int:
        """Feed one piece to httptools and keep the counts; return how many bytes it took (fewer after an upgrade:
        the rest is HTTP again, a piece of its own)."""
        state = self._state
        if state is _State.BETWEEN_MESSAGES:
            self._request_line_prefix = piece.lstrip(b"\r\n")
        elif state is _State.HEAD and self._request_line_prefix is not None:
            self._request_line_prefix += piece
        elif state is not _State.HEAD:
            self._request_line_prefix = None
        chunk_headers, chunks_completed = self._chunk_headers, self._chunks_completed
        taken = self._feed_httptools(piece)
        fed = piece if taken == len(piece) else piece[:taken]
        self._tail = fed[-2:] if len(fed) >= 2 else (self._tail + fed)[-2:]
        if self._state is _State.HEAD:
            if state is _State.HEAD:
                self._head_bytes_fed += taken
            else:  # the head started in this piece, after the blank lines llhttp skips
                self._head_bytes_fed = len(fed.lstrip(b"\r\n"))
        elif state is _State.BODY and self._chunked and self._chunk_phase is not _ChunkPhase.TRAILERS \
                and self._state is not _State.FAILED:
            self._count_chunks(chunk_headers, chunks_completed)
        return max(taken, 1)

    def _walk_chunks(self, data: bytes, start: int) -> int:
        """Follow the chunked framing from ``start`` (the positions are ours, the verdicts llhttp's) and return where
        the piece to feed ends: at the end of ``data``, at the last chunk's size line (the trailers get fine cuts), or
        where a chunk-size line reaches its bound, so that it is refused there whatever the reads. What the walk
        finds is kept in ``_walked`` until ``_count_chunks`` checks it against llhttp's callbacks."""
        bound = self._limits.max_chunk_line_bytes + 2  # CRLF included
        phase, line, line_bytes, left = self._chunk_phase, self._chunk_line, self._chunk_line_bytes, self._chunk_data_left
        lines = chunks = 0
        position, end = start, len(data)
        while position < end:
            if phase is _ChunkPhase.DATA:
                taken = min(end - position, left)
                position, left = position + taken, left - taken
                if left:
                    break
                phase, chunks = _ChunkPhase.LINE, chunks + 1
                continue
            line_end = data.find(b"\n", position, position + bound - line_bytes)
            if line_end < 0:
                taken = min(end - position, bound - line_bytes)
                line, line_bytes, position = line + data[position:position + taken], line_bytes + taken, position + taken
                break
            size = _CHUNK_SIZE.match(line + data[position:line_end])[0]
            position, lines, line, line_bytes = line_end + 1, lines + 1, b"", 0
            if not size or not int(size, 16):
                phase = _ChunkPhase.TRAILERS  # the last chunk (or a malformed line, which llhttp refuses)
                break
            phase, left = _ChunkPhase.DATA, int(size, 16) + 2
        self._walked = (phase, line, line_bytes, left, lines, chunks)
        return position

    def _count_chunks(self, chunk_headers: int, chunks_completed: int) -> None:
        """Take what ``_walk_chunks`` found for the piece just fed, once llhttp saw the same chunk boundaries."""
        phase, line, line_bytes, left, lines, chunks = self._walked
        if self._chunk_headers != chunk_headers + lines or self._chunks_completed != chunks_completed + chunks:
            self._fail(400, "malformed body: the chunked framing is not what it seemed", report=True)
            return
        self._chunk_phase, self._chunk_line, self._chunk_line_bytes, self._chunk_data_left = phase, line, line_bytes, left
        step = self._limits.max_chunk_line_bytes
        if phase is _ChunkPhase.LINE and line_bytes >= step + 2:
            self._fail(400, f"a chunk-size line is longer than {step} bytes", report=True)

    def next_event(self) -> RequestHead | BodyChunk | object | HttpError | None:
        """Return the next event in arrival order, or ``None`` when the parser needs more bytes (or has failed)."""
        if self._events:
            return self._events.pop(0)
        return None

    def has_events(self) -> bool:
        """``True`` while ``next_event()`` has something to hand out."""
        return bool(self._events)

    @property
    def head_in_progress(self) -> bool:
        """``True`` while some bytes of a request head have arrived but not the whole head (the header timeout runs)."""
        return self._state in (_State.HEAD, _State.UNKNOWN_METHOD)

    @property
    def body_in_progress(self) -> bool:
        """``True`` between a head with a body and the end of that body."""
        return self._state is _State.BODY

    @property
    def failed(self) -> bool:
        """``True`` once the parser has reported an ``HttpError``."""
        return self._state is _State.FAILED

    # -- feeding httptools ---------------------------------------------------------------------------------------------

    def _feed_httptools(self, data: bytes) -> int:
        """Feed ``data``; return how many bytes were taken (up to the end of an upgrade request; the caller feeds the
        rest as HTTP again)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # A request with "Connection: Upgrade" (or CONNECT) is complete; llhttp stopped after it, expecting another
            # protocol to follow. We never switch protocols (RFC 9110 section 7.8 lets a server ignore Upgrade), so
            # what follows is parsed as HTTP again.
            return upgrade.args[0]
        except httptools.HttpParserCallbackError:
            self._report_failure()
        except httptools.HttpParserInvalidMethodError:
            self._on_unknown_method()
        except httptools.HttpParserError as error:
            self._on_llhttp_error(str(error))
        return len(data)

    def _on_llhttp_error(self, reason: str) -> None:
        if self._state is _State.HEAD and not self._fine and self._request_line_prefix is not None:
            failure = self._first_head_error(self._request_line_prefix)
            if failure is not None:
                self._failure = failure
                self._report_failure()
                return
        if self._state is _State.HEAD and self._method() == "PRI":
            self._fail(400, "HTTP/2 is not supported here (connection preface received); use HTTP/1.1", report=True)
        elif self._state is _State.BODY:
            self._fail(400, f"malformed body: {reason}", report=True)
        else:
            self._fail(400, f"malformed request: {reason}", report=True)

    def _first_head_error(self, head: bytes) -> HttpError | None:
        """The error a head gets when fed in fine cuts (see ``_line_cut``): the first problem in byte order, a limit
        or llhttp's, the same whatever the reads. Only a failing head pays for it."""
        replay = RequestParser(self._limits)
        replay._fine = True
        replay.feed(head)
        return replay._failure

    def _on_unknown_method(self) -> None:
        if self._request_line_prefix is None:
            self._fail(400, "malformed request: invalid method", report=True)
            return
        self._state = _State.UNKNOWN_METHOD
        self._classify_unknown_method(self._request_line_prefix)

    def _classify_unknown_method(self, prefix: bytes) -> None:
        """Decide 405 (a request line with a method we do not know) or 400 (not HTTP), or wait for more of the line."""
        self._request_line_prefix = prefix
        method_end = prefix.find(b" ")
        method = prefix if method_end < 0 else prefix[:method_end]
        if not method or not all(_METHOD_CHARACTER.fullmatch(method[i:i + 1]) for i in range(len(method))):
            self._fail(400, "malformed request: not an HTTP request line", report=True)
        elif _REQUEST_LINE_SHAPE.match(prefix):
            self._fail(405, f"method {method.decode('ascii')!r} is not supported", report=True)
        elif b"\n" in prefix or len(prefix) > self._limits.max_request_line_bytes:
            self._fail(400, "malformed request: not an HTTP request line", report=True)
        # else: the line is still arriving; the header timeout bounds how long we wait for it.

    # -- checks and events (called from the httptools callbacks) ------------------------------------------------------

    def _start_head(self) -> None:
        self._target_parts: list[bytes] = []
        self._target_bytes = 0
        self._header_fields: list[tuple[bytes, bytes]] = []  # as received; Headers decodes them when asked
        self._framing_fields: dict[str, list[str]] = {}  # the fields the checks below read, gathered on arrival
        self._header_bytes = 0
        self._head_bytes_fed = 0
        self._method_name = ""
        self._body_bytes = 0           # body bytes delivered (where a Content-Length body ends)
        self._chunked = False
        self._content_length: int | None = None

    def _start_chunks(self) -> None:
        """The chunked framing's state (set for each chunked body only)."""
        self._chunk_headers = 0        # chunk-size lines finished,
        self._chunk_line_bytes = 0     # bytes of the current one so far (CRLF included), and those bytes,
        self._chunk_line = b""
        self._chunk_phase = _ChunkPhase.LINE  # where in the chunked framing the next byte is,
        self._chunk_data_left = 0      # the bytes of the current chunk still to come (its CRLF included),
        self._chunks_completed = 0     # and how many chunks llhttp ended (to check that we follow it)

    def _method(self) -> str:
        if not self._method_name:
            self._method_name = self._parser.get_method().decode("ascii")
        return self._method_name

    def _on_message_begin(self) -> None:
        self._state = _State.HEAD
        self._start_head()

    def _on_target_part(self, part: bytes) -> None:
        self._target_parts.append(part)
        self._target_bytes += len(part)
        # No method llhttp knows is longer than _LONGEST_METHOD: only near the bound is the method looked up.
        if self._target_bytes + _LONGEST_METHOD + _REQUEST_LINE_OVERHEAD > self._limits.max_request_line_bytes \
                and self._target_bytes + len(self._method()) + _REQUEST_LINE_OVERHEAD > self._limits.max_request_line_bytes:
            self._fail(414, f"the request line is longer than {self._limits.max_request_line_bytes} bytes")

    def _on_header(self, name: bytes, value: bytes) -> None:
        # After the head, httptools reports the trailer fields of a chunked body here too; they count against the same
        # limits (a trailer flood is a header flood) and are otherwise ignored, as RFC 9112 section 7.1.2 allows.
        fields = self._header_fields
        fields.append((name, value))  # decoded only if a handler asks (Headers.from_raw)
        self._header_bytes += len(name) + len(value) + 4
        if len(fields) > self._max_header_fields or self._header_bytes > self._max_header_bytes:
            if len(fields) > self._max_header_fields:
                self._fail(431, f"more than {self._max_header_fields} header fields")
            self._fail(431, f"the header fields are larger than {self._max_header_bytes} bytes")
        if len(name) in _FRAMING_NAME_LENGTHS:
            lowered = name.lower()
            if lowered in _FRAMING_FIELD_BYTES:
                lowered = lowered.decode("ascii")
                self._framing_fields.setdefault(lowered, []).append(value.decode("latin-1").strip(" \t"))

    def _on_headers_complete(self) -> None:
        head = self._check_head()
        self._events.append(head)
        self._state = _State.BODY
        self._header_fields = []  # from here on, _on_header counts trailers

    def _check_head(self) -> RequestHead:
        method = self._method()
        version = self._parser.get_http_version()
        if version not in SUPPORTED_VERSIONS:
            self._fail(505, f"HTTP/{version} is not supported; use HTTP/1.1 or HTTP/1.0")
        framing = self._framing_fields
        if version == "1.1" and len(framing.get("host", ())) != 1:
            self._fail(400, "an HTTP/1.1 request needs exactly one Host header")
        chunked = "transfer-encoding" in framing and self._check_transfer_encoding(framing, version)
        if chunked:
            self._chunked = True
            self._start_chunks()
        content_length = self._content_length = (
            self._check_content_length(framing, chunked) if "content-length" in framing else None)
        keep_alive = self._parser.should_keep_alive() and method != "CONNECT"
        expect_continue = version == "1.1" and "expect" in framing and \
            "100-continue" in comma_separated(framing["expect"])
        parts = self._target_parts
        target = (parts[0] if len(parts) == 1 else b"".join(parts)).decode("latin-1")
        return RequestHead(method, target, version, Headers.from_raw(self._header_fields), keep_alive,
                           content_length, chunked, expect_continue)

    def _check_transfer_encoding(self, framing: dict[str, list[str]], version: str) -> bool:
        if "transfer-encoding" not in framing:
            return False
        if version == "1.0":
            self._fail(400, "Transfer-Encoding in an HTTP/1.0 request is faulty framing")
        if "content-length" in framing:
            self._fail(400, "Content-Length together with Transfer-Encoding")
        codings = comma_separated(framing["transfer-encoding"])
        unknown = [coding for coding in codings if coding != "chunked"]
        if unknown:
            self._fail(501, f"transfer coding {unknown[0]!r} is not implemented; only 'chunked' is")
        if codings != ["chunked"]:
            self._fail(400, "Transfer-Encoding must be exactly 'chunked'")
        return True

    def _check_content_length(self, framing: dict[str, list[str]], chunked: bool) -> int | None:
        values = framing.get("content-length", ())
        if chunked or not values:
            return None
        if len(values) > 1:
            self._fail(400, "more than one Content-Length")
        length = read_integer(values[0])
        if length is None:
            self._fail(400, f"invalid Content-Length {values[0][:40]!r}")
        return length

    def _on_body(self, data: bytes) -> None:
        self._body_bytes += len(data)
        self._events.append(BodyChunk(data))

    def _on_chunk_header(self) -> None:
        self._chunk_headers += 1

    def _on_chunk_complete(self) -> None:
        self._chunks_completed += 1

    def _on_message_complete(self) -> None:
        self._events.append(END_OF_MESSAGE)
        self._state = _State.BETWEEN_MESSAGES
        self._request_line_prefix = None  # the next piece starts the next message (_next_cut)

    def _fail(self, status: int, detail: str, *, report: bool = False) -> None:
        """Record an error; from a callback, stop httptools (it raises ``HttpParserCallbackError`` to ``feed``)."""
        self._failure = HttpError(status, detail, close=True)
        if report:
            self._report_failure()
        else:
            raise _ParserFailure()

    def _report_failure(self) -> None:
        assert self._failure is not None
        self._events.append(self._failure)
        self._state = _State.FAILED


class _Callbacks:
    """The object httptools calls back; it forwards to the parser, so the parser's public surface stays small."""

    __slots__ = ("on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body", "on_message_complete",
                 "on_chunk_header", "on_chunk_complete")

    def __init__(self, parser: RequestParser):
        self.on_message_begin = parser._on_message_begin
        self.on_url = parser._on_target_part
        self.on_header = parser._on_header
        self.on_headers_complete = parser._on_headers_complete
        self.on_body = parser._on_body
        self.on_message_complete = parser._on_message_complete
        self.on_chunk_header = parser._on_chunk_header
        self.on_chunk_complete = parser._on_chunk_complete
