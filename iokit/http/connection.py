"""One HTTP/1.1 connection as a protocol (``iokit.protocols``): the parser fed from ``data_received``, handlers run
at once, a task only for a handler that waits.

On epoll and uring the engine calls ``data_received`` from C with what arrived, and ``transport.write`` queues into
the one send the engine makes per connection per turn; on blocking and threads ``protocols.StreamTransport`` calls the
same methods from its reader. A request flows like this:

1. ``data_received`` feeds the parser; each complete head is resolved to its route and the handler's coroutine is
   **stepped at once**, as a spare ``Task`` of this connection (made once, not started: ``current_task()``, scopes and
   events inside the handler see a task of their own). A handler that returns without waiting (a plain GET, a POST
   whose body has arrived) is answered right there: head and body framed into **one write**, with the ``Date`` and
   ``Server`` lines formatted once a second. No task runs, no scope is entered.
2. A handler that waits (a long poll, an upload reading its body, an event stream) yielded to the runtime: the spare
   task becomes its task, starting from where the handler stopped, and the connection makes another spare when it
   needs one. A streamed response body is sent by a task too (it waits for room to write).
3. Requests queued behind one in progress (pipelining) wait in the parser, parsed, and are answered in order when it
   is done. What the client sends meanwhile is fed to the parser but bounded: past ``receive_size`` bytes not yet
   taken, reading pauses (``pause_reading``), so the kernel's buffers and TCP slow the client down. A response the
   client does not read pauses our writes past the transport's high-water mark (``pause_writing``); no further
   request is started until it resumes.

**Timeouts without a scope per read.** Each connection has one deadline and what to do when it passes (idle:
close; head started: 408; body wait: ``BodyIncomplete``; linger: close), plus a send deadline while its writes are
paused (no progress for ``send_timeout``: abort). One timer task per server (``_Timers``) looks at them every tick
(an eighth of the shortest timeout, at most 0.25 s): setting a deadline is an attribute store.

On blocking, callbacks run on each connection's reader thread and handler tasks on their own threads, so the
connection's state changes under its lock (uncontended elsewhere).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import types

import iokit

from .._errors import Cancelled
from ..runtime import LOCK, CancelScope, Event, LoopDriver, current_task, set_current_task
from ..shutdown import STOP_LINGER
from .errors import BodyIncomplete, HttpError
from .messages import END_OF_MESSAGE, BodyChunk, RequestHead
from .parser import RequestParser
from .response import CONTINUE, LAST_CHUNK, BodyFraming, Response, encode_chunk, frame_response

log = logging.getLogger("iokit.http")

# What a closing connection reads and drops at most, so that our last answer is not lost to a reset.
_MAX_LINGER_DISCARD = 1024 * 1024
_MAX_TICK = 0.25
_MIN_TICK = 0.005
_WAITING = object()  # what running a handler at once returns when the handler waits (a task has it now)


@types.coroutine
def _resumed(coro, trap):
    """Go on running ``coro``, which has yielded ``trap`` already: the rest of an eagerly started handler, in a task.
    Each trap goes out as it is, each value or exception comes back in; returns what ``coro`` returns."""
    while True:
        try:
            value = yield trap
        except BaseException as error:  # noqa: BLE001 - the driver's exception (Cancelled...) is the handler's
            try:
                trap = coro.throw(error)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                trap = coro.send(value)
            except StopIteration as stop:
                return stop.value


async def _placeholder() -> None:
    pass


class HandlerTasks:
    """A server's handler tasks (the handlers that waited), from their start until they finish: ``all_finished()``
    waits for them, and each counts in its ``Shutdown`` meanwhile, so that the stop's grace is theirs too, even once
    their connection is gone. The runtime tells it of each end, as it tells a task group (``_child_finished``); but
    a handler that fails is logged, and nothing else is cancelled: each request is on its own."""

    __slots__ = ("running", "_none_running")

    def __init__(self) -> None:
        self.running: dict = {}  # task -> the Shutdown it counts in
        self._none_running = Event()
        self._none_running.set()

    def started(self, task, shutdown) -> None:
        shutdown._task_started()
        with LOCK:
            self.running[task] = shutdown
            self._none_running.clear()

    def _child_finished(self, task, error: BaseException | None) -> None:
        # Under LOCK, from the finishing task's thread (drivers.py).
        shutdown = self.running.pop(task, None)
        if error is not None and not isinstance(error, Cancelled):
            log.error("a request's task failed", exc_info=error)
        if not self.running:
            self._none_running.set()
        if shutdown is not None:
            shutdown._task_finished()

    async def all_finished(self) -> None:
        await self._none_running.wait()


def _forget_task(task) -> None:
    """Take a task that was made but never started out of its scope tree."""
    with LOCK:
        CancelScope._move_task(task, None)
        task.own_scope._detach()


class _Timers:
    """The deadlines of one server's connections, looked at every ``tick`` by one task. A connection's
    ``deadline``/``send_deadline`` are plain attributes: arming one costs a store, and no timer is made per request.

    The task runs in the server's lifespan (``run_in``); a server used without one (``handle_connection`` called
    directly) gets a task on the runtime's root scope, which ends when its last connection has."""

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self.connections: set[HttpConnection] = set()
        self._task = None
        self._nap = None  # the scope of the sleep between two looks

    def run_in(self, group) -> None:
        self._task = group.spawn(self._run, True, name="http-timers")

    def watch(self, connection: "HttpConnection") -> None:
        self.connections.add(connection)
        if self._task is None:
            runtime = current_task().runtime
            self._task = runtime.new_task(self._run, (False,), "http-timers", None, runtime.root_scope)

    def forget(self, connection: "HttpConnection") -> None:
        self.connections.discard(connection)

    def hurry(self) -> None:
        """The server is stopping: its connections' deadlines are STOP_LINGER away at most, so look that often, from
        now on (a tick of 0.25 s made the stop wait for it)."""
        self.tick = min(self.tick, STOP_LINGER)
        if self._nap is not None:
            self._nap.cancel()

    async def _run(self, forever: bool) -> None:
        try:
            while forever or self.connections:
                with iokit.CancelScope() as self._nap:
                    await iokit.sleep(self.tick)
                self._nap = None
                now = time.monotonic()
                for connection in list(self.connections):
                    if connection.deadline <= now or connection.send_deadline <= now:
                        connection.expire(now)
        finally:
            self._task = None


class HttpConnection:
    """The protocol serving one connection for an ``HttpServer`` (see the module's description)."""

    # Slots: one of these lives as long as its connection (an instance dict was ~1.5 KiB of every held request).
    __slots__ = ("_gone", "_spare", "_wakeup", "_writable", "backlog", "body_timed_out", "closing", "continue_sent",
                 "deadline", "discarded", "head_started_at", "limits", "lingering", "lock", "lost", "must_close",
                 "on_deadline", "parent_scope", "parser", "peer", "peer_closed", "reading_paused", "request",
                 "send_deadline", "server", "shutdown", "task", "transport", "write_left", "write_paused",
                 "write_progress_at")

    def __init__(self, server, shutdown, scope=None) -> None:
        self.server = server
        self.limits = server.limits
        self.shutdown = shutdown
        self.parser = RequestParser(server.limits)
        self.lock = threading.RLock()
        self.transport = None
        self.peer = None
        self.parent_scope = scope     # where this connection's handler tasks hang in the scope tree
        self.request = None           # the request in progress: from its head until its response is written
        self.task = None              # the task running it, when its handler waited or its body streams
        self._spare = None            # a Task made but not started: the next handler runs as it
        self.must_close = False       # framing can no longer be trusted, or the client is gone, or we answered close
        self.closing = False          # on the way out: no further request is started
        self.lingering = False        # half-closed by us, reading and dropping what the client still sends
        self.peer_closed = False
        self.lost = False
        self.continue_sent = False
        self.write_paused = False
        self.reading_paused = False
        self.backlog = 0              # bytes fed while nobody takes events (a request in progress, writes paused)
        self.discarded = 0
        self.head_started_at: float | None = None
        self.deadline = math.inf
        self.on_deadline = None
        self.send_deadline = math.inf
        self.write_left = 0           # bytes queued at the last progress seen while writes are paused
        self.write_progress_at = 0.0
        self.body_timed_out = False
        self._wakeup = None           # the Event a task waits on for more of the body (or the end of the stream)
        self._writable = None         # the Event a streamed body waits on for room to write
        self._gone = None             # the Event wait_disconnected waits on

    # -- the protocol's callbacks ---------------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        if self.parent_scope is None:  # driven by a task of its own: under it
            self.parent_scope = current_task().scope
        self.server._timers.watch(self)
        with self.lock:
            self._await_next()

    def data_received(self, data: bytes) -> None:
        with self.lock:
            if self.lingering:
                self.discarded += len(data)
                if self.discarded > _MAX_LINGER_DISCARD:
                    self.transport.close()
                return
            if self.must_close:
                return
            self.parser.feed(data)
            if self.request is None and not self.write_paused:
                self._serve_buffered()
                return
            self.backlog += len(data)
            if self.backlog > self.limits.receive_size:
                if self._gone is not None:
                    # A held request waits for its client to leave: keep no more (the connection closes after its
                    # answer), but go on reading, to see the end of the stream.
                    self.must_close = True
                elif not self.reading_paused:
                    self.reading_paused = True
                    self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool:
        with self.lock:
            self.peer_closed = True
            self._wake_gone()
            self._wake()
            if self.closing or (self.request is None and not self.parser.has_events()):
                self.must_close = self.closing = True
                return False  # the transport closes once what we wrote has gone
            return True  # half-open: the request in progress (or queued) is still answered

    def connection_lost(self, exc) -> None:
        with self.lock:
            self.lost = self.peer_closed = self.must_close = self.closing = True
            self.deadline = self.send_deadline = math.inf
            self._wake()
            self._wake_gone()
            self._wake_writer()
            spare, self._spare = self._spare, None
        self.server._timers.forget(self)
        if spare is not None:
            _forget_task(spare)

    def pause_writing(self) -> None:
        with self.lock:
            self.write_paused = True
            self.write_left = self.transport.get_write_buffer_size()
            self.write_progress_at = now = time.monotonic()
            self.send_deadline = now + self.server._timers.tick  # looked at every tick while paused

    def resume_writing(self) -> None:
        with self.lock:
            self.write_paused = False
            self.send_deadline = math.inf
            self._wake_writer()
            if self.request is None and not self.closing:
                self._serve_buffered()

    # -- serving what the parser has --------------------------------------------------------------------------------

    def _serve_buffered(self) -> None:
        """Answer the requests the parser holds, in order, until one waits (or writes are paused)."""
        parser = self.parser
        while self.request is None and not self.write_paused and not self.must_close:
            event = parser.next_event()
            if event is None:
                break
            if event.__class__ is RequestHead:
                self._start(event)
            elif event.__class__ is BodyChunk or event is END_OF_MESSAGE:
                continue  # the rest of a body its handler left unread, small enough to read and drop
            else:
                self._send_error(event)
                return
        if self.request is None and not self.must_close and not self.write_paused:
            self._await_next()

    def _await_next(self) -> None:
        """Nothing to answer now: arm the deadline for what comes next, and read again if reading was paused."""
        if self._resume_reading() and (self.request is not None or self.must_close):
            return  # what resuming handed over at once was served already, and armed what comes next
        if self.peer_closed:
            self._close()
            return
        now = time.monotonic()
        parser = self.parser
        if parser.head_in_progress:
            if self.head_started_at is None:
                self.head_started_at = now
            self.deadline, self.on_deadline = self.head_started_at + self.limits.header_timeout, self._head_too_slow
            return
        self.head_started_at = None
        if parser.body_in_progress:  # the unread rest of a body we chose to drop
            self.deadline, self.on_deadline = now + self.limits.body_read_timeout, self._close
        elif self.shutdown.requested:
            self._close()
        else:
            self.deadline, self.on_deadline = now + self.limits.idle_timeout, self._close

    def _start(self, head: RequestHead) -> None:
        server = self.server
        self.continue_sent = False
        self.deadline, self.on_deadline = math.inf, None
        request = self.request = server.request_type(head, self)
        try:
            preflight = server.cors.preflight(request.method, request.headers) if server.cors is not None else None
            if preflight is not None:
                response = preflight
            else:
                response = self._run_at_once(request, server._start_handler(request))
                if response is _WAITING:
                    return
                if not isinstance(response, Response):
                    raise TypeError(f"the handler of {request.method} {request.path} returned {response!r}, "
                                    f"not a Response")
            close = False
        except BaseException as error:  # noqa: BLE001 - sorted out by _outcome
            outcome = self._outcome(request, error)
            if outcome is None:
                return
            response, close = outcome
        self._respond(request, response, close)

    def _run_at_once(self, request, coro):
        """Step the handler's coroutine as this connection's spare task. Return its response, or ``_WAITING`` when it
        waited (the spare task then runs the rest). Raises what the handler raised."""
        task = self._spare
        if task is None:
            task = self._new_spare()
        previous = current_task()
        set_current_task(task)
        try:
            trap = coro.send(None)
        except StopIteration as stop:
            return stop.value
        finally:
            set_current_task(previous)
        self._spare = None
        self._hand_to_task(task, self._finish_in_task(request, coro, trap), trap)
        return _WAITING

    def _new_spare(self):
        runtime = current_task().runtime
        task = self._spare = runtime.new_task(_placeholder, (), "http-request", self.server.handlers,
                                              self.parent_scope, start=False)
        task.coro.close()  # its coroutine is set when it starts
        return task

    def _hand_to_task(self, task, coro, trap=None) -> None:
        """Run ``coro`` as ``task`` (made by ``_new_spare``). With ``trap``, ``coro`` goes on with a handler that
        yielded ``trap`` already: on the loop driver it is handled now, as if the task had just yielded it; on the
        thread driver the task's thread yields it first."""
        self.task = task
        task.coro = coro
        self.server.handlers.started(task, self.shutdown)
        runtime = task.runtime
        if trap is not None and isinstance(runtime, LoopDriver):
            previous = current_task()
            set_current_task(task)
            try:
                coro.send(None)  # runs up to _resumed's first yield: the trap the handler yielded
            finally:
                set_current_task(previous)
            runtime._handle(task, trap)
        else:
            runtime.start_task(task)

    async def _finish_in_task(self, request, coro, trap) -> None:
        try:
            response = await _resumed(coro, trap)
            if not isinstance(response, Response):
                raise TypeError(f"the handler of {request.method} {request.path} returned {response!r}, "
                                f"not a Response")
            close = False
        except Cancelled:
            self._abandon()
            raise
        except BaseException as error:  # noqa: BLE001 - sorted out by _outcome
            with self.lock:
                outcome = self._outcome(request, error)
            if outcome is None:
                return
            response, close = outcome
        await self._respond_in_task(request, response, close)

    def _outcome(self, request, error: BaseException):
        """What a handler's exception answers: ``(response, close)``, or ``None`` when nobody is left to answer."""
        if isinstance(error, HttpError):
            return Response.from_error(error), error.close
        if isinstance(error, BodyIncomplete):
            if error.reason != BodyIncomplete.TIMEOUT:
                self._abandon()  # the client is gone
                return None
            return Response.from_error(HttpError(408, str(error))), True
        if isinstance(error, Cancelled):
            self._abandon()
            return None
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not ours to answer, but not left open
            self._abandon()
            raise error
        log.error("the handler of %s %s failed", request.method, request.path, exc_info=error)
        return Response.from_error(HttpError(500, "the handler failed")), True

    def _abandon(self) -> None:
        with self.lock:
            self.request = None
            self.must_close = True
            if not self.lost:
                self.transport.close()

    # -- answering ------------------------------------------------------------------------------------------------------

    def _frame(self, request, response, close: bool):
        if self.server.cors is not None:
            self.server.cors.decorate(request.headers, response)
        keep_alive = (request.head.keep_alive and not close and not self.must_close and not self.shutdown.requested
                      and self._body_can_be_discarded(request))
        return frame_response(response, request_method=request.method, request_version=request.version,
                              keep_alive=keep_alive)

    def _respond(self, request, response, close: bool) -> None:
        """Answer ``request`` now if its body is in hand (one write); a streamed body goes to a task."""
        body = response.body
        if not isinstance(body, (bytes, bytearray, memoryview)):
            task = self._spare or self._new_spare()
            self._spare = None
            self._hand_to_task(task, self._respond_in_task(request, response, close, serve_next=True))
            return
        try:
            framed = self._frame(request, response, close)
        except ValueError as error:
            log.error("bad response from a handler: %s", error)
            response = Response.from_error(HttpError(500, "the handler produced an invalid response"))
            framed = self._frame(request, response, True)
            body = response.body
        self._write(framed.data + body if framed.framing is BodyFraming.LENGTH else framed.data)
        self._request_done(request, framed.close)

    async def _respond_in_task(self, request, response, close: bool, serve_next: bool = True) -> None:
        try:
            if isinstance(response.body, (bytes, bytearray, memoryview)):
                with self.lock:
                    self._respond(request, response, close)
            else:
                await self._respond_streamed(request, response, close)
        except Cancelled:
            self._abandon()
            raise
        except OSError:
            self._abandon()
            return
        except Exception as error:  # noqa: BLE001 - a streamed body that failed: the response can only be cut short
            log.error("the body of the response to %s %s failed", request.method, request.path, exc_info=error)
            self._abandon()  # closing without the last chunk (or short of Content-Length) tells the client
            return
        except BaseException:
            self._abandon()
            raise
        finally:
            if self.task is current_task():
                self.task = None
        if serve_next:
            with self.lock:
                if self.request is None and not self.closing:
                    self._serve_buffered()

    async def _respond_streamed(self, request, response, close: bool) -> None:
        body = response.body
        try:
            with self.lock:
                framed = self._frame(request, response, close)
        except ValueError as error:
            log.error("bad response from a handler: %s", error)
            await _close_body(body)
            with self.lock:
                self._respond(request, Response.from_error(HttpError(500, "the handler produced an invalid response")),
                              True)
            return
        self._write(framed.data)
        complete = await self._send_streamed_body(body, framed)
        with self.lock:
            self._request_done(request, framed.close or not complete)

    async def _send_streamed_body(self, body, framed) -> bool:
        """Send an async-iterable body with the framing chosen; return ``False`` if the connection must now close."""
        sent = 0
        try:
            if framed.framing is BodyFraming.NONE:
                return True
            chunked = framed.framing is BodyFraming.CHUNKED
            async for piece in body:
                if not piece:
                    continue
                sent += len(piece)
                self._write(encode_chunk(piece) if chunked else piece)
                await self._room_to_write()
            if chunked:
                self._write(LAST_CHUNK)
        finally:
            await _close_body(body)
        if framed.framing is BodyFraming.LENGTH and sent != framed.content_length:
            log.error("a handler declared Content-Length %s and sent %s bytes", framed.content_length, sent)
            return False
        return True

    async def _room_to_write(self) -> None:
        """Return once the transport takes more (raises ``ConnectionResetError`` once the connection is gone)."""
        while True:
            with self.lock:
                if self.lost:
                    raise ConnectionResetError("the client is gone (or stopped reading for send_timeout)")
                if not self.write_paused:
                    return
                writable = self._writable = iokit.Event()
            await writable.wait()

    def _request_done(self, request, close: bool) -> None:
        self.request = None
        if close:
            self._close()
        # An unread body, small enough (decided before answering), is dropped as it comes: _serve_buffered skips it.

    def _body_can_be_discarded(self, request) -> bool:
        """Decide, before answering, whether an unread body is small enough to read and drop after the response."""
        head = request.head
        if request.body_complete or not head.has_body:
            return True
        if head.expect_continue and not self.continue_sent:
            return False  # the client may not send it at all; it will learn from our Connection: close
        declared = head.content_length
        return declared is not None and declared - request.body_bytes_received <= self.limits.drain_body_bytes

    def _write(self, data) -> None:
        if not self.lost and not self.lingering:
            self.transport.write(data)

    def _send_error(self, error: HttpError) -> None:
        """Answer with ``error`` outside any request (a parse error, a timeout); the connection then closes."""
        if error.status == 405 and not error.headers:
            error.headers = [("Allow", self.server.allow)]
        self._write(error_bytes(error))
        self._close()

    def _head_too_slow(self) -> None:
        self._send_error(HttpError(408, f"the request head did not arrive within {self.limits.header_timeout} s",
                                   close=True))

    # -- closing ------------------------------------------------------------------------------------------------------

    def _close(self) -> None:
        """Half-close after what was written, drop what the client still sends (for linger_timeout), then close."""
        self.must_close = True
        if self.closing and (self.lingering or self.lost):
            return
        self.closing = True
        self.request = None
        if self.lost:
            return
        if self.peer_closed:
            self.transport.close()
            return
        self.lingering = True
        self.transport.write_eof()
        linger = self.limits.linger_timeout
        if self.shutdown.requested:
            linger = min(linger, STOP_LINGER)
        self.deadline, self.on_deadline = time.monotonic() + linger, self._linger_over

    def _linger_over(self) -> None:
        self.transport.close()
        # close() waits for the queue to drain: a client that reads nothing gets send_timeout more, then the cut.
        self.deadline, self.on_deadline = time.monotonic() + self.limits.send_timeout, self._cut

    def _cut(self) -> None:
        """Abort the connection (the engine cancels a send stuck in the kernel for a client who reads nothing)."""
        self.must_close = True
        self.transport.abort()

    def stop_if_idle(self) -> None:
        """The server is stopping: close now if no request is in progress or queued (the rest close after theirs)."""
        with self.lock:
            if self.lost:
                return
            if self.lingering:
                self.transport.close()
            elif self.request is None and not self.parser.head_in_progress and not self.parser.has_events():
                self._close()

    def expire(self, now: float) -> None:
        """The timer task found a deadline passed."""
        with self.lock:
            if self.send_deadline <= now:
                left = self.transport.get_write_buffer_size() if not self.lost else 0
                if left < self.write_left:  # progress: the client reads, if slowly
                    self.write_left, self.write_progress_at = left, now
                if not self.write_paused or self.lost:
                    self.send_deadline = math.inf
                elif now - self.write_progress_at < self.limits.send_timeout:
                    self.send_deadline = now + self.server._timers.tick
                else:
                    log.info("a write to %s made no progress for %s s: closing", self.peer, self.limits.send_timeout)
                    self.send_deadline = math.inf
                    self._cut()
            if self.deadline <= now:
                action, self.deadline, self.on_deadline = self.on_deadline, math.inf, None
                if action is not None and not self.lost:
                    action()

    # -- what a handler's request waits on ----------------------------------------------------------------------------

    async def read_body_chunk(self, request) -> bytes | None:
        """Return the next piece of ``request``'s body, or ``None`` at its end (see ``Request.body``)."""
        if request.body_complete:
            return None
        head = request.head
        if head.expect_continue and head.has_body and not self.continue_sent:
            # The client waits for this before sending the body (RFC 9110 section 10.1.1); sent only when the handler
            # reads, so a request refused without reading (413, 404) never invites a body we would discard.
            self.continue_sent = True
            self._write(CONTINUE)
        while True:
            with self.lock:
                event = self.parser.next_event()
                if event is None:
                    wakeup = self._body_wait(request)
            if event is None:
                if wakeup is None:
                    continue
                try:
                    await wakeup.wait()
                finally:
                    with self.lock:
                        if self.on_deadline == self._body_wait_over:
                            self.deadline, self.on_deadline = math.inf, None
                continue
            if event is END_OF_MESSAGE:
                request.body_complete = True
                return None
            if event.__class__ is BodyChunk:
                data = event.data
                request.body_bytes_received += len(data)
                if request.max_body_size is not None and request.body_bytes_received > request.max_body_size:
                    self.must_close = True
                    raise HttpError(413, f"the body is over the limit of {request.max_body_size} bytes", close=True)
                return data
            if isinstance(event, HttpError):
                self.must_close = True
                raise event
            # a request head: cannot come before this body's end (the parser ends a body first)

    def _resume_reading(self) -> bool:
        """Everything fed was taken: read again if reading was paused. Return ``True`` if it was: the engine may hand
        over what it held back at once, from inside ``resume_reading`` (``data_received``, even ``eof_received``)."""
        self.backlog = 0
        if not self.reading_paused:
            return False
        self.reading_paused = False
        self.transport.resume_reading()
        return True

    def _body_wait(self, request):
        """No more body in hand (under the lock): raise if none will come, else arm the wait and return its Event
        (``None`` when resuming the reads handed over more at once)."""
        if self._resume_reading() and self.parser.has_events():
            return None
        if self.peer_closed:
            self.must_close = True
            raise BodyIncomplete(request.body_bytes_received, BodyIncomplete.CLOSED)
        if self.body_timed_out:
            self.body_timed_out = False
            self.must_close = True
            raise BodyIncomplete(request.body_bytes_received, BodyIncomplete.TIMEOUT)
        wakeup = self._wakeup = iokit.Event()
        self.deadline, self.on_deadline = time.monotonic() + self.limits.body_read_timeout, self._body_wait_over
        return wakeup

    def _body_wait_over(self) -> None:
        self.body_timed_out = True
        self._wake()

    async def read_rest_of_body(self, request) -> bool:
        """Read and drop what the handler left of ``request``'s body. Return ``False`` if the client closed the
        connection meanwhile; raises what ``read_body_chunk`` raises otherwise."""
        try:
            while await self.read_body_chunk(request) is not None:
                pass
        except BodyIncomplete as cut:
            if cut.reason != BodyIncomplete.CLOSED:
                raise
            return False
        return True

    async def wait_disconnected(self, request) -> None:
        if self.peer_closed or not await self.read_rest_of_body(request):
            return
        while True:
            with self.lock:
                if self.peer_closed:
                    return
                gone = self._gone
                if gone is None:
                    gone = self._gone = iokit.Event()
                if self.reading_paused:  # over the bound already: keep no more, and read to see the client leave
                    self.must_close = True
                    self.reading_paused = False
                    self.transport.resume_reading()
            await gone.wait()

    # -- wake-ups (under the lock) ----------------------------------------------------------------------------------

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    def _wake_gone(self) -> None:
        if self._gone is not None:
            self._gone.set()

    def _wake_writer(self) -> None:
        writable = self._writable
        if writable is not None:
            self._writable = None
            writable.set()

    def forget_spare(self) -> None:
        with self.lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            _forget_task(spare)


def timer_tick(limits) -> float:
    """How often a server's timer task looks at its connections' deadlines: an eighth of the shortest timeout."""
    shortest = min(limits.header_timeout, limits.idle_timeout, limits.body_read_timeout, limits.send_timeout,
                   limits.linger_timeout)
    return max(_MIN_TICK, min(_MAX_TICK, shortest / 8))


def error_bytes(error: HttpError) -> bytes:
    """Return the whole response (head and JSON body) for ``error`` on a connection about to close."""
    response = Response.from_error(error)
    framed = frame_response(response, request_method="GET", request_version="1.1", keep_alive=False)
    return framed.data + response.body


async def _close_body(body) -> None:
    close = getattr(body, "aclose", None)
    if close is not None:
        await close()
