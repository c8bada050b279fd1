"""A small HTTP/1.1 client on iokit's streams: one keep-alive connection, one request at a time, on every backend.

The upload server's replication needs a client that runs inside the server's own runtime (a primary talking to its
replicas), so it cannot be ``http.client`` (blocking) or a client of another event loop. What it needs is small: a
request with a body known in advance or streamed in pieces of known total size, a response whose body is read whole
(replication answers are a few hundred bytes), keep-alive, and a deadline on the whole exchange. That is all this is.

Responses are parsed by httptools' ``HttpResponseParser`` (llhttp, the parser of the server side, see ``parser.py``):
it frames the body by Content-Length, chunked coding or the end of the stream. A response to HEAD has no body whatever
its Content-Length says, and llhttp cannot be told so; the head is then the whole message and the parser is dropped.
Each response gets a fresh parser, so nothing of a broken exchange carries over to the next.

Errors are typed for what a caller does next: ``ConnectionFailed`` (could not connect, or the connection broke: the
request may or may not have been processed), ``ResponseMalformed`` (the peer does not speak HTTP as we do), and
``RequestTimedOut`` (the deadline passed: also undecided). Each closes the connection; the next request opens a new
one. On the epoll and uring engines ``sendall`` queues the bytes and returns at once, so a send's failure surfaces at
the next receive: both are the same ``ConnectionFailed`` here.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import AsyncIterable, Iterable

import httptools

import iokit

from .messages import Headers

DEFAULT_TIMEOUT = 10.0
MAX_RESPONSE_BODY_BYTES = 16 * 1024 * 1024
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
_RECEIVE_SIZE = 65536


class HttpClientError(Exception):
    """A request that got no usable answer. The connection is closed."""


class ConnectionFailed(HttpClientError):
    """Connecting failed, or the connection broke before the whole response arrived."""


class ResponseMalformed(HttpClientError):
    """The peer's answer is not an HTTP/1.1 response we can read (or is over our size limits)."""


class RequestTimedOut(HttpClientError):
    """The exchange did not finish within its timeout."""


@dataclasses.dataclass(frozen=True)
class ClientResponse:
    """A complete response: status, headers (lower-cased names) and the whole body."""

    status: int
    headers: Headers
    body: bytes


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where a server is: a numeric host and a port, from an ``http://HOST:PORT`` URL."""

    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> "Endpoint":
        """Return the endpoint of ``url``; raise ``ValueError`` unless it is ``http://`` with a host and a port."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"{url!r} is not an http://HOST:PORT URL")
        return cls(parts.hostname, parts.port)

    @property
    def host_header(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _ResponseReader:
    """The httptools callbacks for one response."""

    def __init__(self, head_only: bool):
        self.head_only = head_only
        self.fields: list[tuple[str, str]] = []
        self.body = bytearray()
        self.head_complete = False
        self.complete = False
        self.head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise ResponseMalformed("the response head is too large")
        self.fields.append((name.decode("latin-1").lower(), value.decode("latin-1").strip()))

    def on_headers_complete(self) -> None:
        self.head_complete = True
        if self.head_only:
            self.complete = True

    def on_body(self, data: bytes) -> None:
        if len(self.body) + len(data) > MAX_RESPONSE_BODY_BYTES:
            raise ResponseMalformed("the response body is too large")
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


class HttpConnection:
    """One keep-alive connection to ``endpoint``, opened on the first request and again after any failure.

    Use it from one task at a time; ``aclose()`` at the end (or ``async with``).
    """

    def __init__(self, endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT):
        self.endpoint = endpoint
        self.timeout = timeout
        self._stream: iokit.SocketStream | None = None

    async def __aenter__(self) -> "HttpConnection":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose(flush_seconds=0.0)

    async def request(self, method: str, path: str, headers: Iterable[tuple[str, str]] = (),
                      body: bytes | AsyncIterable[bytes] = b"", *, content_length: int | None = None,
                      timeout: float | None = None) -> ClientResponse:
        """Send one request and return the whole response.

        ``body`` is ``bytes``, or an async iterable of pieces adding up to ``content_length`` bytes (which must then be
        given). ``timeout`` (default: the connection's) bounds the whole exchange. Raises ``ConnectionFailed``,
        ``ResponseMalformed`` or ``RequestTimedOut``; after any of them the connection is closed.
        """
        if isinstance(body, (bytes, bytearray, memoryview)):
            content_length = len(body)
        elif content_length is None:
            raise ValueError("a streamed body needs its content_length")
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.endpoint.host_header}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if content_length or method in ("POST", "PATCH", "PUT"):
            lines.append(f"Content-Length: {content_length}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        seconds = self.timeout if timeout is None else timeout
        try:
            with iokit.fail_after(seconds):
                return await self._exchange(head, body, content_length, head_only=method == "HEAD")
        except TimeoutError:
            await self.aclose()
            raise RequestTimedOut(f"{method} {path} to {self.endpoint.host_header}: no answer in {seconds} s") from None
        except OSError as error:
            await self.aclose()
            raise ConnectionFailed(f"{method} {path} to {self.endpoint.host_header}: {error}") from error
        except HttpClientError:
            await self.aclose()
            raise
        except BaseException:  # cancelled mid-exchange: the connection is in an unknown state
            await self.aclose()
            raise

    async def _exchange(self, head: bytes, body, content_length: int, head_only: bool) -> ClientResponse:
        if self._stream is None:
            self._stream = await iokit.connect_tcp(self.endpoint.host, self.endpoint.port)
        stream = self._stream
        if isinstance(body, (bytes, bytearray, memoryview)):
            await stream.sendall(head + bytes(body) if len(body) < 65536 else head)
            if len(body) >= 65536:
                await stream.sendall(body)
        else:
            await stream.sendall(head)
            sent = 0
            async for piece in body:
                sent += len(piece)
                if sent > content_length:
                    raise ValueError(f"the body runs past its content_length of {content_length}")
                await stream.sendall(piece)
            if sent != content_length:
                raise ValueError(f"the body has {sent} bytes, not its content_length of {content_length}")
        return await self._read_response(stream, head_only)

    async def _read_response(self, stream: iokit.SocketStream, head_only: bool) -> ClientResponse:
        reader = _ResponseReader(head_only)
        parser = httptools.HttpResponseParser(reader)
        keep_alive = True
        raw_head_bytes = 0
        while not reader.complete:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                try:
                    parser.feed_data(b"")  # the end of the stream may end a body framed by the close
                except httptools.HttpParserError:
                    pass
                if reader.complete:
                    keep_alive = False
                    break
                raise ConnectionFailed("the server closed the connection before the whole response")
            if not reader.head_complete:
                raw_head_bytes += len(data)
                if raw_head_bytes > MAX_RESPONSE_HEAD_BYTES + _RECEIVE_SIZE:
                    raise ResponseMalformed("the response head is too large")
            try:
                parser.feed_data(data)
            except httptools.HttpParserCallbackError as error:
                cause = error.__context__
                raise cause if isinstance(cause, HttpClientError) else ResponseMalformed(str(error)) from None
            except httptools.HttpParserError as error:
                raise ResponseMalformed(f"not an HTTP response: {error}") from None
        status = parser.get_status_code()
        headers = Headers.from_lowercase(reader.fields)
        # llhttp's should_keep_alive() is reset once the message completes: decide from the version and Connection.
        if not keep_alive or parser.get_http_version() != "1.1" or "close" in headers.get_tokens("connection"):
            await self.aclose()
        return ClientResponse(status, headers, bytes(reader.body))
