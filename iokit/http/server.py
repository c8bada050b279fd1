"""The HTTP/1.1 server: the sans-IO parser and response framing, run on the iokit runtime, one task per connection.

One task serves one connection, one request at a time: read a head, run the handler, write its response, go on with the
next. That one loop gives the properties a server needs without any extra machinery:

* **Pipelining answered in order**: requests queued behind the current one wait, parsed or still in the socket.
* **Backpressure**: the socket is read only when the parser has nothing left to hand out, and a request body only as
  fast as the handler asks for it (``request.body()``). A client that sends faster than a handler consumes fills the
  kernel's buffers and is slowed down by TCP, not by our memory.
* **Every backend alike**: the loop is plain ``await stream.receive_some()`` / ``sendall()``; on ``blocking`` the task
  is a thread (thread per connection), elsewhere a coroutine on the loop thread.

Timeouts come from ``HttpLimits``: waiting for a request to start (idle keep-alive: close quietly; a stop request also
ends this wait at once), for a started head to finish (408 then close: slowloris), for the next piece of a body
(``BodyIncomplete``), for a write to make progress (close). After an error that breaks framing the server answers and
closes, half-closing first and draining a little so that the answer is not lost to a TCP reset.

A handler that *holds* its request (a long poll, an event stream) has two more things to wait for: the client leaving
and the server stopping. ``request.wait_disconnected()`` waits for the first without a receive buffer: a held
request may wait for minutes, and a thousand pending 64 KiB receives would be 64 MiB of buffers that hold nothing, so
it waits for readiness (a POLL op: POLLIN, and POLLRDHUP for a peer that shut down its side) and only then reads, a
little. ``request.interruptible()`` scopes a wait that the server's stop ends at once.
"""

from __future__ import annotations

import contextlib
import math
import select
import sys
import traceback
import urllib.parse
from typing import AsyncContextManager, AsyncIterator, Awaitable, Callable, ContextManager

import iokit

from ..serve import Shutdown, close_gracefully
from .errors import BodyIncomplete, HttpError
from .limits import DEFAULT_LIMITS, HttpLimits
from .messages import END_OF_MESSAGE, BodyChunk, Headers, RequestHead
from .parser import RequestParser
from .response import CONTINUE, LAST_CHUNK, BodyFraming, Response, encode_chunk, frame_response
from .routing import DEFAULT_BODY_CAP, App

# A write larger than this is sent in pieces, each with its own send timeout: the timeout is about progress.
_SEND_PIECE = 256 * 1024
# What a held request reads once its connection is readable: the end of the stream, or a pipelined request (kept).
_HELD_RECEIVE_SIZE = 4096


class Request:
    """One HTTP request, as a handler sees it.

    Attributes: ``method``, ``target`` (as sent), ``path`` (still percent-encoded, without the query), ``query`` (first
    value of each parameter, decoded), ``path_params`` (from the route pattern, decoded), ``version`` (``"1.1"``),
    ``headers`` (``Headers``), ``client`` (the peer's address), ``max_body_size`` (the route's cap, ``None`` for none).

    The body is read on demand, so a handler that streams it holds one piece at a time:
    ``await request.read_body()`` returns all of it; ``async for chunk in request.body()`` gives it piece by piece.
    Both raise ``HttpError(413)`` past ``max_body_size`` and ``BodyIncomplete`` when it is cut off.

    A handler that holds the request open (a long poll, a stream) waits in ``wait_disconnected()`` (or runs
    ``watching_disconnect()`` beside a longer body of work), inside ``interruptible()`` so that the server's stop ends
    the wait at once.
    """

    def __init__(self, head: RequestHead, connection: "_Connection", max_body_size: int | None):
        self.method = head.method
        self.target = head.target
        self.version = head.version
        self.headers: Headers = head.headers
        self.head = head
        self.path, self.query = _split_target(head.target)
        self.path_params: dict[str, str] = {}
        self.client = connection.peer
        self.max_body_size = max_body_size
        self.body_bytes_received = 0
        self.body_complete = False  # until the parser's END_OF_MESSAGE for it was taken
        self._connection = connection

    async def read_body(self) -> bytes:
        """Return the whole body. Raises ``HttpError(413)`` past ``max_body_size``, ``BodyIncomplete`` if cut off."""
        pieces = [chunk async for chunk in self.body()]
        return b"".join(pieces)

    async def body(self) -> AsyncIterator[bytes]:
        """Yield the body piece by piece as it arrives (nothing for a request without one).

        The socket is read only when the handler asks for the next piece. Raises ``HttpError(413)`` past
        ``max_body_size`` (the connection then closes), ``BodyIncomplete`` when the client closes, resets, or stops
        sending for ``HttpLimits.body_read_timeout``; ``bytes_received`` on it says how much arrived.
        """
        while (chunk := await self._connection.read_body_chunk(self)) is not None:
            yield chunk

    def wait_disconnected(self) -> Awaitable[None]:
        """Return when the client closes or resets the connection (for a handler that holds a request open).

        A body the handler has not read is read first, and dropped. Then it waits for the connection to become
        readable, holding no receive buffer while it waits; bytes that arrive meanwhile (a pipelined request) are kept
        for later. It returns only when the client leaves: a handler ends the wait with a cancel scope (a time limit,
        a wake-up, ``interruptible()``). Raises what ``body()`` raises while the body is read, except a client that
        closes during it: that is a disconnect, and it returns.
        """
        # The connection's coroutine itself, not one awaiting it: a held request keeps this frame ~10,000 times over.
        return self._connection.wait_disconnected(self)

    @contextlib.asynccontextmanager
    async def watching_disconnect(self, on_disconnect: Callable[[], None]):
        """Return an async context manager that calls ``on_disconnect()`` if the client closes or resets the connection
        while the block runs: a second task waits in ``wait_disconnected()`` beside it (for a stream that waits many
        times; a single wait can call ``wait_disconnected()`` itself). It reads an unread body first, as that does."""
        await self._connection.read_rest_of_body(self)

        async def watch() -> None:
            try:
                await self.wait_disconnected()
            except OSError:
                pass  # a reset: gone all the same
            on_disconnect()

        async with iokit.TaskGroup() as group:
            group.spawn(watch, name="disconnect-watch")
            try:
                yield
            finally:
                group.cancel_scope.cancel()

    def interruptible(self, timeout: float = math.inf) -> ContextManager[iokit.CancelScope]:
        """Return a context manager around a wait that the server's stop ends at once (and that ends after ``timeout``
        seconds); it yields the ``CancelScope``, whose ``cancelled_caught`` says the wait was cut short. A held request
        wraps its wait in it, so that SIGTERM answers it now rather than after the shutdown grace."""
        return self._connection.shutdown.interruptible(timeout)


class HttpServer:
    """Serves ``app`` with ``limits``; a service for ``iokit.serve.main`` (see there for the process around it).

    The keyword arguments are the service's options that ``iokit.serve.Service`` describes: ``lifespan`` (a function
    returning an async context manager, entered before serving and exited after: loading state, background tasks, a
    last flush), ``single_process`` (state in this process's memory: ``--workers`` must be 1) and
    ``send_buffer_bytes`` (SO_SNDBUF per connection). ``cors`` (a ``cors.CorsPolicy``) answers preflights before
    routing and marks every response for the origins it allows.
    """

    def __init__(self, app: App, limits: HttpLimits = DEFAULT_LIMITS, *,
                 lifespan: Callable[[], AsyncContextManager] | None = None, single_process: bool = False,
                 send_buffer_bytes: int | None = None, cors=None):
        self.app = app
        self.cors = cors
        self.limits = limits
        self.max_connections = limits.max_connections
        self.lifespan = lifespan
        self.single_process = single_process
        self.send_buffer_bytes = send_buffer_bytes

    async def handle_connection(self, stream, shutdown: Shutdown) -> None:
        """Serve requests on ``stream`` until either side closes, a limit is hit, or the server stops."""
        connection = _Connection(stream, self.limits, shutdown, allow=self.app.allowed_methods())
        try:
            while (head := await connection.next_request_head()) is not None:
                keep_going = await self._serve_request(connection, head)
                if not keep_going or shutdown.requested:
                    break
        finally:
            await connection.close()

    async def reject_connection(self, stream) -> None:
        """Answer a connection over ``max_connections`` with 503 and close it."""
        error = HttpError(503, f"the server is at its limit of {self.max_connections} connections; retry shortly",
                          headers=[("Retry-After", "1")], close=True)
        with iokit.move_on_after(self.limits.send_timeout):
            await stream.sendall(_error_bytes(error))
        await close_gracefully(stream, min(self.limits.linger_timeout, 0.5))

    async def _serve_request(self, connection: "_Connection", head: RequestHead) -> bool:
        """Run the handler for ``head`` and send its response. Return ``True`` to keep the connection."""
        request = Request(head, connection, self.limits.max_body_bytes)
        close = False
        try:
            preflight = self.cors.preflight(request.method, request.headers) if self.cors is not None else None
            response = preflight or await self._start_handler(request)
            if not isinstance(response, Response):
                raise TypeError(f"the handler of {request.method} {request.path} returned {response!r}, "
                                f"not a Response")
        except HttpError as error:
            response, close = Response.from_error(error), error.close
        except BodyIncomplete as cut:
            if cut.reason != BodyIncomplete.TIMEOUT:
                return False  # the client is gone: nobody to answer
            response, close = Response.from_error(HttpError(408, str(cut))), True
        except Exception:
            traceback.print_exc(file=sys.stderr)
            response, close = Response.from_error(HttpError(500, "the handler failed")), True
        if self.cors is not None:
            self.cors.decorate(request.headers, response)
        return await connection.send_response(request, response, close=close)

    def _start_handler(self, request: Request) -> Awaitable[Response]:
        """Check the request against its route and return the handler's coroutine (not awaited here: no frame of ours
        stays alive under a handler that holds its request)."""
        match = self.app.resolve(request.method, request.path)
        cap = match.route.max_body_size
        request.max_body_size = self.limits.max_body_bytes if cap is DEFAULT_BODY_CAP else cap
        request.path_params = match.path_params
        declared = request.head.content_length
        if declared is not None and request.max_body_size is not None and declared > request.max_body_size:
            raise HttpError(413, f"the body of {declared} bytes is over the limit of {request.max_body_size}",
                            close=True)
        return match.route.handler(request)


class _Connection:
    """The per-connection state: the stream, its parser, and the rules for reading and writing it."""

    def __init__(self, stream, limits: HttpLimits, shutdown: Shutdown, allow: str):
        self.stream = stream
        self.allow = allow                 # the Allow value for a method no route knows
        self.limits = limits
        self.shutdown = shutdown
        self.parser = RequestParser(limits)
        self.peer = _peer_address(stream)
        self.must_close = False            # framing can no longer be trusted, or the client is gone
        self.peer_closed = False
        self._head_started_at: float | None = None
        self._continue_sent = False

    # -- reading -------------------------------------------------------------------------------------------------------

    async def next_request_head(self) -> RequestHead | None:
        """Return the next request head, or ``None`` when the connection should close (after answering any error)."""
        self._continue_sent = False
        while not self.must_close:
            event = self.parser.next_event()
            if isinstance(event, RequestHead):
                self._head_started_at = None
                return event
            if isinstance(event, HttpError):
                await self._send_error(event)
                return None
            if event is not None:
                continue  # the rest of a body a handler did not read and we chose to discard
            if not await self._receive_more_head():
                return None
        return None

    async def _receive_more_head(self) -> bool:
        """Read more of a request head within its time limit. Return ``False`` when the connection should close."""
        if not self.parser.head_in_progress:
            with self.shutdown.interruptible(self.limits.idle_timeout):
                return self._feed(await self._receive())
            return False  # idle too long, or the server is stopping: close quietly, no request was started
        now = iokit.current_time()
        if self._head_started_at is None:
            self._head_started_at = now
        remaining = self._head_started_at + self.limits.header_timeout - now
        with iokit.move_on_after(max(remaining, 0.0)):
            return self._feed(await self._receive())
        await self._send_error(HttpError(408, f"the request head did not arrive within {self.limits.header_timeout} s",
                                         close=True))
        return False

    def _feed(self, data: bytes) -> bool:
        if not data:
            self.peer_closed = True
            return False
        self.parser.feed(data)
        if self.parser.head_in_progress and self._head_started_at is None:
            self._head_started_at = iokit.current_time()
        return True

    async def _receive(self, size: int | None = None) -> bytes:
        try:
            return await self.stream.receive_some(size or self.limits.receive_size)
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            return b""

    async def read_body_chunk(self, request: Request) -> bytes | None:
        """Return the next piece of ``request``'s body, or ``None`` at its end (see ``Request.body``)."""
        if request.body_complete:
            return None
        if request.head.expect_continue and request.head.has_body and not self._continue_sent:
            # The client waits for this before sending the body (RFC 9110 section 10.1.1); sent only when the handler
            # reads, so a request refused without reading (413, 404) never invites a body we would discard.
            self._continue_sent = True
            await self._send(CONTINUE)
        while True:
            event = self.parser.next_event()
            if event is END_OF_MESSAGE:
                request.body_complete = True
                return None
            if isinstance(event, BodyChunk):
                request.body_bytes_received += len(event.data)
                if request.max_body_size is not None and request.body_bytes_received > request.max_body_size:
                    self.must_close = True
                    raise HttpError(413, f"the body is over the limit of {request.max_body_size} bytes", close=True)
                return event.data
            if isinstance(event, HttpError):
                self.must_close = True
                raise event
            await self._receive_more_body(request)

    async def _receive_more_body(self, request: Request) -> None:
        data = None
        with iokit.move_on_after(self.limits.body_read_timeout):
            data = await self._receive()
        if data is None or not data:
            self.must_close = True
            self.peer_closed = data is not None
            raise BodyIncomplete(request.body_bytes_received,
                                 BodyIncomplete.TIMEOUT if data is None else BodyIncomplete.CLOSED)
        self.parser.feed(data)

    async def read_rest_of_body(self, request: Request) -> bool:
        """Read and drop what the handler left of ``request``'s body (for a request without one: take its
        end-of-message marker). Return ``False`` if the client closed the connection meanwhile; raises what
        ``read_body_chunk`` raises otherwise."""
        try:
            while await self.read_body_chunk(request) is not None:
                pass
        except BodyIncomplete as cut:
            if cut.reason != BodyIncomplete.CLOSED:
                raise
            return False
        return True

    async def wait_disconnected(self, request: Request) -> None:
        if self.peer_closed or not await self.read_rest_of_body(request):
            return
        fd = self.stream.fileno()
        buffered = 0
        while not self.peer_closed:
            # Wait with no buffer, then read a little: POLLIN covers data and the end of the stream, POLLRDHUP a peer
            # that shut down its side, and a reset shows as POLLERR/POLLHUP (the read then fails, as b"").
            await iokit.perform(iokit.ops.poll(fd, select.POLLIN | select.POLLRDHUP))
            data = await self._receive(_HELD_RECEIVE_SIZE)
            if not data:
                self.peer_closed = self.must_close = True
                return
            # A pipelined request: keep it for when this one is answered, but only so much of it.
            self.parser.feed(data)
            buffered += len(data)
            if buffered > self.limits.drain_body_bytes:
                # Keep no more, and still see the client leave: POLLRDHUP alone (a reset is POLLERR/POLLHUP, which
                # poll always reports) needs no read, while the rest waits in the kernel's buffer.
                await iokit.perform(iokit.ops.poll(fd, select.POLLRDHUP))
                self.peer_closed = self.must_close = True
                return

    async def _discard_rest_of_body(self, request: Request) -> bool:
        """Read and drop what the handler left of the body. Return ``False`` if that failed (then we close)."""
        try:
            return await self.read_rest_of_body(request)
        except (HttpError, BodyIncomplete):
            return False

    # -- writing -------------------------------------------------------------------------------------------------------

    async def send_response(self, request: Request, response: Response, *, close: bool = False) -> bool:
        """Send ``response`` to ``request``. Return ``True`` if the connection can serve another request."""
        keep_alive = (request.head.keep_alive and not close and not self.must_close and not self.shutdown.requested
                      and self._body_can_be_discarded(request))
        try:
            framed = frame_response(response, request_method=request.method, request_version=request.version,
                                    keep_alive=keep_alive)
        except ValueError as error:
            print(f"bad response from a handler: {error}", file=sys.stderr)
            await _close_body(response.body)
            response = Response.from_error(HttpError(500, "the handler produced an invalid response"))
            framed = frame_response(response, request_method=request.method, request_version=request.version,
                                    keep_alive=False)
        if isinstance(response.body, (bytes, bytearray, memoryview)):
            body = response.body if framed.framing is BodyFraming.LENGTH else b""
            await self._send(framed.data + body)  # one write for head and body: one syscall for small responses
        else:
            await self._send(framed.data)
            if not await self._send_streamed_body(response.body, framed):
                return False
        if framed.close:
            self.must_close = True
            return False
        return await self._discard_rest_of_body(request)

    async def _send_streamed_body(self, body, framed) -> bool:
        """Send an async-iterable body with the framing chosen; return ``False`` if the connection must now close."""
        sent = 0
        try:
            if framed.framing is BodyFraming.NONE:
                return True
            async for piece in body:
                if not piece:
                    continue
                sent += len(piece)
                if framed.framing is BodyFraming.CHUNKED:
                    await self._send(encode_chunk(piece))
                else:
                    await self._send(piece)
            if framed.framing is BodyFraming.CHUNKED:
                await self._send(LAST_CHUNK)
        finally:
            await _close_body(body)
        if framed.framing is BodyFraming.LENGTH and sent != framed.content_length:
            print(f"a handler declared Content-Length {framed.content_length} and sent {sent} bytes", file=sys.stderr)
            self.must_close = True
            return False
        return True

    def _body_can_be_discarded(self, request: Request) -> bool:
        """Decide, before answering, whether an unread body is small enough to read and drop after the response."""
        if request.body_complete or not request.head.has_body:
            return True  # nothing left, or only the end-of-message marker the parser already holds
        if request.head.expect_continue and not self._continue_sent:
            return False  # the client may not send it at all; it will learn from our Connection: close
        declared = request.head.content_length
        return declared is not None and declared - request.body_bytes_received <= self.limits.drain_body_bytes

    async def _send(self, data: bytes) -> None:
        """Send all of ``data``; raises ``ConnectionAbortedError`` when a piece makes no progress for send_timeout."""
        view = memoryview(data)
        for start in range(0, len(view), _SEND_PIECE):
            with iokit.move_on_after(self.limits.send_timeout) as scope:
                await self.stream.sendall(view[start:start + _SEND_PIECE])
            if scope.cancelled_caught:
                self.must_close = True
                raise ConnectionAbortedError(f"a write made no progress for {self.limits.send_timeout} s")

    async def _send_error(self, error: HttpError) -> None:
        """Answer with ``error`` outside any request (a parse error, a timeout); the connection then closes."""
        self.must_close = True
        if error.status == 405 and not error.headers:
            error.headers = [("Allow", self.allow)]
        try:
            await self._send(_error_bytes(error))
        except OSError:
            pass

    async def close(self) -> None:
        if self.peer_closed:
            await self.stream.aclose()
        else:
            await close_gracefully(self.stream, self.limits.linger_timeout, shutdown=self.shutdown)


def _error_bytes(error: HttpError) -> bytes:
    """Return the whole response (head and JSON body) for ``error`` on a connection about to close."""
    response = Response.from_error(error)
    framed = frame_response(response, request_method="GET", request_version="1.1", keep_alive=False)
    return framed.data + response.body


def _split_target(target: str) -> tuple[str, dict[str, str]]:
    """Return the path (percent-encoded) and the decoded query of a request target, in any of its forms."""
    if target.startswith("/") or target == "*":
        path, _, query = target.partition("?")
    else:
        parts = urllib.parse.urlsplit(target)  # absolute-form (RFC 9112 section 3.2.2), or CONNECT's authority-form
        path, query = parts.path or "/", parts.query
    parameters: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        parameters.setdefault(name, value)
    return path, parameters


def _peer_address(stream) -> tuple | None:
    try:
        return stream.socket.getpeername()
    except (OSError, AttributeError):
        return None


async def _close_body(body) -> None:
    close = getattr(body, "aclose", None)
    if close is not None:
        await close()
