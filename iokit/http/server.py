"""The HTTP/1.1 server: routes, the ``Request`` a handler sees, and the service ``iokit.serve`` runs.

Each accepted connection is driven by an ``HttpConnection`` protocol (``connection.py``: how a request flows, how
timeouts and backpressure work without a task or a scope per read). The properties a server needs hold as before:

* **Pipelining answered in order**: requests queued behind the current one wait, parsed, in the parser.
* **Backpressure**: a request body reaches the handler as fast as it asks for it (``request.body()``); what the client
  sends past ``receive_size`` bytes not taken pauses reading, and TCP slows the client down, not our memory.
* **Every backend alike**: the engine calls the protocol on epoll and uring, ``protocols.StreamTransport`` on
  blocking and threads.

Timeouts come from ``HttpLimits``: waiting for a request to start (idle keep-alive: close quietly; a stop request also
ends this wait at once), for a started head to finish (408 then close: slowloris), for the next piece of a body
(``BodyIncomplete``), for a write to make progress (close). After an error that breaks framing the server answers and
closes, half-closing first and draining a little so that the answer is not lost to a TCP reset.

A handler that *holds* its request (a long poll, an event stream) has two more things to wait for: the client leaving
and the server stopping. ``request.wait_disconnected()`` waits for the first, holding no receive buffer (the engine
reads into its shared buffers only when bytes come); ``request.interruptible()`` scopes a wait that the server's stop
ends at once.
"""

from __future__ import annotations

import contextlib
import math
import urllib.parse
from typing import AsyncContextManager, AsyncIterator, Awaitable, Callable, ContextManager

import iokit

from .. import protocols
from ..shutdown import Shutdown, close_gracefully
from .connection import HandlerTasks, HttpConnection, _Timers, error_bytes, timer_tick
from .errors import HttpError
from .limits import DEFAULT_LIMITS, HttpLimits
from .messages import Headers, RequestHead
from .response import Response
from .routing import DEFAULT_BODY_CAP, App


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

    __slots__ = ("method", "target", "version", "headers", "head", "path", "_query", "path_params", "max_body_size",
                 "body_bytes_received", "body_complete", "_connection")

    def __init__(self, head: RequestHead, connection: HttpConnection, max_body_size: int | None = None):
        self.method = head.method
        self.target = target = head.target
        self.version = head.version
        self.headers: Headers = head.headers
        self.head = head
        if target.startswith("/") and "?" not in target:
            self.path, self._query = target, None
        else:
            self.path, self._query = _split_target(target)
        self.path_params: dict[str, str] = {}
        self.max_body_size = max_body_size
        self.body_bytes_received = 0
        self.body_complete = False  # until the parser's END_OF_MESSAGE for it was taken
        self._connection = connection

    @property
    def query(self) -> dict[str, str]:
        query = self._query
        if query is None:
            query = self._query = {}
        return query

    @property
    def client(self) -> tuple | None:
        return self._connection.peer

    async def read_body(self) -> bytes:
        """Return the whole body. Raises ``HttpError(413)`` past ``max_body_size``, ``BodyIncomplete`` if cut off."""
        read = self._connection.read_body_chunk
        first = await read(self)
        if first is None:
            return b""
        pieces = [first]
        while (chunk := await read(self)) is not None:
            pieces.append(chunk)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def body(self) -> AsyncIterator[bytes]:
        """Yield the body piece by piece as it arrives (nothing for a request without one).

        The socket is read only as fast as the handler asks for pieces. Raises ``HttpError(413)`` past
        ``max_body_size`` (the connection then closes), ``BodyIncomplete`` when the client closes, resets, or stops
        sending for ``HttpLimits.body_read_timeout``; ``bytes_received`` on it says how much arrived.
        """
        while (chunk := await self._connection.read_body_chunk(self)) is not None:
            yield chunk

    def wait_disconnected(self) -> Awaitable[None]:
        """Return when the client closes or resets the connection (for a handler that holds a request open).

        A body the handler has not read is read first, and dropped. Then it waits, holding no receive buffer; bytes
        that arrive meanwhile (a pipelined request) are kept for later. It returns only when the client leaves: a
        handler ends the wait with a cancel scope (a time limit, a wake-up, ``interruptible()``). Raises what
        ``body()`` raises while the body is read, except a client that closes during it: that is a disconnect, and it
        returns.
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
        self._lifespan = lifespan
        self.single_process = single_process
        self.send_buffer_bytes = send_buffer_bytes
        self.allow = app.allowed_methods()  # the Allow value for a method no route knows
        self.request_type = Request          # what a connection makes of each head
        self._timers = _Timers(timer_tick(limits))
        self.handlers = HandlerTasks()       # the handlers that waited, as tasks: a stop waits for them
        self._stops_watched: list[Shutdown] = []

    @contextlib.asynccontextmanager
    async def lifespan(self):
        """The service's lifespan (``iokit.serve.Service``): the timer task of the connections' deadlines runs in it,
        around the application's own ``lifespan``, if it gave one. It ends once every handler task has (those of
        attached connections have no connection task to wait for them)."""
        async with iokit.TaskGroup() as group:
            self._timers.run_in(group)
            try:
                async with self._lifespan() if self._lifespan is not None else contextlib.nullcontext():
                    try:
                        yield
                    finally:
                        with iokit.CancelScope(shield=True):
                            await self.handlers.all_finished()
            finally:
                group.cancel_scope.cancel()

    async def handle_connection(self, stream, shutdown: Shutdown) -> None:
        """Serve requests on ``stream`` until either side closes, a limit is hit, or the server stops."""
        self._watch(shutdown)
        connection = HttpConnection(self, shutdown)
        try:
            await protocols.drive(stream, connection)
        finally:
            connection.forget_spare()
            task = connection.task
            if task is not None and not task.finished:
                await task.wait()  # a handler still running (its client left, or the server is cancelling it)

    def attach_connection(self, stream, shutdown: Shutdown, connections, scope) -> None:
        """Serve requests on ``stream`` as ``handle_connection`` does, from the engine's callbacks alone: no task
        waits for the connection (``iokit.serve``'s accept loop calls this on epoll and uring). A handler that waits
        becomes a task in ``scope``; ``connections`` has the transport until it closes."""
        self._watch(shutdown)
        protocols.attach(stream, HttpConnection(self, shutdown, scope), connections)

    def _watch(self, shutdown: Shutdown) -> None:
        if shutdown not in self._stops_watched:
            self._stops_watched.append(shutdown)
            shutdown.on_stop(self._stop_idle_connections)

    def _stop_idle_connections(self) -> None:
        self._timers.hurry()
        for connection in list(self._timers.connections):
            connection.stop_if_idle()

    async def reject_connection(self, stream) -> None:
        """Answer a connection over ``max_connections`` with 503 and close it."""
        error = HttpError(503, f"the server is at its limit of {self.max_connections} connections; retry shortly",
                          headers=[("Retry-After", "1")], close=True)
        with iokit.move_on_after(self.limits.send_timeout):
            await stream.sendall(error_bytes(error))
        await close_gracefully(stream, min(self.limits.linger_timeout, 0.5))

    def _start_handler(self, request: Request) -> Awaitable[Response]:
        """Check the request against its route and return the handler's coroutine (not awaited here: the connection
        steps it, and no frame of ours stays alive under a handler that holds its request)."""
        match = self.app.resolve(request.method, request.path)
        route = match.route
        cap = route.max_body_size
        request.max_body_size = self.limits.max_body_bytes if cap is DEFAULT_BODY_CAP else cap
        if match.path_params:
            request.path_params = match.path_params
        declared = request.head.content_length
        if declared is not None and request.max_body_size is not None and declared > request.max_body_size:
            raise HttpError(413, f"the body of {declared} bytes is over the limit of {request.max_body_size}",
                            close=True)
        return route.handler(request)


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


