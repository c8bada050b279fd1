"""Protocols and transports: the callback style asyncio users know, on every backend.

A protocol is an object with ``connection_made(transport)``, ``data_received(data)``, ``eof_received()``,
``connection_lost(exc)`` and, for flow control, ``pause_writing()``/``resume_writing()``; its transport has
``write``, ``writelines``, ``write_eof``, ``close``, ``abort``, ``pause_reading``/``resume_reading``,
``get_write_buffer_size`` and ``set_write_buffer_limits`` (asyncio's names and defaults: 64 KiB high, a quarter of
that low). ``drive(stream, protocol)`` runs one connection with a protocol until it is closed (any accept loop can
use it, ``iokit.serve``'s included); ``serve(listener, factory)`` runs one per accepted connection;
``connect(host, port, factory)`` one for an outgoing connection.

Two implementations, one behaviour:

* **On the native engine** (epoll, uring) the connection is handed to C (``engine.attach_protocol``): each chunk that
  arrives is one ``bytes`` and one call of the cached ``data_received``, straight from the completion (uring's
  multishot recv, or epoll's readiness); ``write`` queues, and the turn's flush sends everything one connection wrote
  in the turn as one send. No task, no Python frame of ours per message: this is uvloop's design.
* **Elsewhere** (blocking, threads) a ``StreamTransport`` runs the protocol over a stream with two tasks, a reader and
  a writer; on blocking each is an OS thread, so a connection's callbacks run on its own reader thread.

Callbacks run as the task that called ``serve`` (or ``connect``): ``iokit.current_task()`` works inside them. An
exception a callback raises is reported through ``sys.unraisablehook`` and ends that connection, whose
``connection_lost`` gets it; the others go on. When ``serve`` ends (cancelled, or its listener failed), every
connection still open is aborted, and ``serve`` returns only once each has had its ``connection_lost``.
"""

from __future__ import annotations

import socket
import sys
import threading
from typing import Any, Callable

from ._errors import Cancelled
from .runtime import CancelScope, Event, TaskGroup, current_task
from .streams import Listener, SocketStream, connect_tcp

__all__ = ["Connections", "Protocol", "StreamTransport", "attach", "connect", "drive", "serve"]

DEFAULT_HIGH_WATER = 64 * 1024
ProtocolFactory = Callable[[], Any]


class Protocol:
    """A base with do-nothing methods: override what you need (``data_received`` at least)."""

    def connection_made(self, transport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool | None:
        """The peer closed its side. Return True to keep the transport open (half-closed), else it is closed."""
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class Connections:
    """The transports a ``drive``, ``connect`` or server owns, until each has been closed; ``on_closed(transport)``,
    if given, is called as each closes."""

    __slots__ = ("open", "all_closed", "_on_closed", "_aborting")

    def __init__(self, on_closed: Callable[[Any], None] | None = None) -> None:
        self.open: set = set()
        self.all_closed = Event()
        self.all_closed.set()
        self._on_closed = on_closed
        self._aborting = False

    def add(self, transport) -> None:
        if transport.fileno() >= 0:  # an engine transport that connection_made closed at once has had its close
            self.open.add(transport)
            self.all_closed.clear()
            if self._aborting:  # added after abort_all began (an accept that completed as its task was cancelled)
                transport.abort()

    def closed(self, transport) -> None:
        self.open.discard(transport)
        if not self.open:
            self.all_closed.set()
        if self._on_closed is not None:
            self._on_closed(transport)

    async def abort_all(self) -> None:
        """Abort every transport, and any added from now on; return once all have closed."""
        self._aborting = True
        with CancelScope(shield=True):
            for transport in list(self.open):
                transport.abort()
            await self.all_closed.wait()


def _extra_info(sock: socket.socket) -> dict:
    extra = {"sockname": sock.getsockname()}
    try:
        extra["peername"] = sock.getpeername()
    except OSError:
        extra["peername"] = None
    return extra


def attach(stream: SocketStream, protocol, connections: Connections):
    """Hand the stream's socket to the engine (``stream`` must be on one: epoll, uring), which calls ``protocol``
    from now on, as the current task; return the transport, one of ``connections`` until it closes. No task waits
    for it: a server that attaches its connections in its accept loop spends no task on each (``drive`` is the
    same with a task that waits)."""
    extra = _extra_info(stream.socket)
    # The socket lets go of its fd only once the engine has it: if attach_protocol raises, it did not take it, and
    # the stream still closes it.
    transport = stream._engine.attach_protocol(stream.socket.fileno(), protocol, current_task(), extra,
                                               connections.closed)
    stream.socket.detach()
    connections.add(transport)
    return transport


async def drive(stream: SocketStream, protocol) -> None:
    """Run ``protocol`` on ``stream``'s connection until it is closed (by the protocol, the peer, or a failure);
    return after ``connection_lost``. Cancelling aborts the connection (and still waits for ``connection_lost``)."""
    connections = Connections()
    if stream._engine is None:
        transport = StreamTransport(stream, protocol, connections.closed)
        connections.add(transport)
        try:
            await transport._run()
        finally:
            await connections.abort_all()
        return
    attach(stream, protocol, connections)
    try:
        await connections.all_closed.wait()  # parked: no task runs per message, the engine calls the protocol
    finally:
        await connections.abort_all()


async def serve(listener: Listener, protocol_factory: ProtocolFactory) -> None:
    """Accept connections on ``listener`` until cancelled, each driven by a new ``protocol_factory()``. On the way
    out every open connection is aborted, and this returns once all have had ``connection_lost``."""
    async with TaskGroup() as group:
        while True:
            stream = await listener.accept()
            group.spawn(drive, stream, protocol_factory())


async def connect(host: str, port: int, protocol_factory: ProtocolFactory):
    """Connect to ``host:port`` and drive the connection with ``protocol_factory()``; return ``(transport,
    protocol)``. The connection lives until it is closed or lost (on blocking and threads its tasks belong to the
    runtime's root scope and end with it)."""
    stream = await connect_tcp(host, port)
    protocol = protocol_factory()
    if stream._engine is not None:
        return attach(stream, protocol, Connections()), protocol
    transport = StreamTransport(stream, protocol)
    runtime = current_task().runtime
    runtime.new_task(transport._run, (), "protocol", None, runtime.root_scope)
    return transport, protocol


def _report(callback, error: BaseException) -> None:
    """As the engine does for a callback that raised: to sys.unraisablehook, and the connection ends."""
    hook_argument = type("UnraisableHookArgs", (), {})()
    hook_argument.exc_type, hook_argument.exc_value = type(error), error
    hook_argument.exc_traceback, hook_argument.err_msg, hook_argument.object = error.__traceback__, None, callback
    sys.unraisablehook(hook_argument)


class StreamTransport:
    """A transport over a ``SocketStream`` driven by two tasks (reader, writer): the backends without an engine."""

    def __init__(self, stream: SocketStream, protocol, on_closed: Callable[[Any], None] | None = None) -> None:
        self._stream = stream
        self._protocol = protocol
        self._on_closed = on_closed
        self._extra = _extra_info(stream.socket)
        self._queue = bytearray()
        # On blocking, write() may come from another thread than the writer's: the queue changes under this lock.
        self._queue_lock = threading.Lock()
        self._high, self._low = DEFAULT_HIGH_WATER, DEFAULT_HIGH_WATER // 4
        self._writing_paused = False
        self._reading = True
        self._closing = False       # close() or abort() was called, or the connection failed
        self._closed_by_user = False
        self._send_scope: CancelScope | None = None
        # One sender at a time, the writer or the reader: the reader sends what its own data_received wrote before
        # it reads again (a response then costs no hand-off to the writer's thread on blocking), and while it runs
        # the callback a write() does not wake the writer (under the queue lock, both).
        self._sending = False
        self._in_callback = False
        self._aborting = False
        self._eof_to_send = False
        self._lost_error: BaseException | None = None
        self._lost = False
        self._to_write = Event()    # the writer's wake-up: bytes, a close, an abort
        self._may_read = Event()
        self._may_read.set()
        self._reader_scope = CancelScope()

    # --- driving it: this task writes, a child reads ---------------------------------------------------------------

    async def _run(self) -> None:
        self._call(self._protocol.connection_made, self)
        try:
            async with TaskGroup() as group:
                group.spawn(self._read_loop)
                await self._write_loop()
                self._reader_scope.cancel()
        finally:
            with CancelScope(shield=True):
                await self._stream.aclose(0 if self._aborting else 10.0)
            self._lost = True
            self._call_named("connection_lost", self._lost_error)
            if self._on_closed is not None:
                self._on_closed(self)

    async def _read_loop(self) -> None:
        with self._reader_scope:
            while not self._closing:
                if not self._reading:
                    await self._may_read.wait()
                    continue
                try:
                    data = await self._stream.receive_some()
                except OSError as error:
                    self._fail(error)
                    return
                while not self._reading:  # paused while the receive waited: this waits for resume_reading
                    await self._may_read.wait()
                if not data:
                    keep = self._call_named("eof_received")
                    if not keep:
                        self._close()
                    return
                self._in_callback = True
                try:
                    self._call(self._protocol.data_received, data)
                finally:
                    with self._queue_lock:
                        self._in_callback = False
                        data = self._take_queue()
                if data and not await self._send(data):
                    return

    def _take_queue(self) -> bytearray:
        """Under the queue lock: what is queued, for the caller to send, unless a send is in progress (then its
        sender looks again after it)."""
        if self._sending or self._aborting or not self._queue:
            return bytearray()
        data, self._queue = self._queue, bytearray()
        self._sending = True
        return data

    async def _send(self, data) -> bool:
        """Send ``data`` (taken with ``_take_queue``); return False when the connection is over."""
        self._send_scope = CancelScope()  # abort() cuts a send in progress short
        try:
            with self._send_scope:
                await self._stream.sendall(data)
        except OSError as error:
            self._fail(error)
            return False
        finally:
            with self._queue_lock:
                self._sending = False
                more = bool(self._queue)
            if more or self._closing or self._eof_to_send:
                self._to_write.set()  # queued meanwhile, or a close waits: the writer looks again
        if self._send_scope.cancelled_caught:
            return False
        if self._writing_paused and len(self._queue) <= self._low:
            self._writing_paused = False
            self._call_named("resume_writing")
        return True

    async def _write_loop(self) -> None:
        while True:
            self._to_write.clear()  # before looking: a write() from now on sets it again, and is not missed
            if self._aborting:
                return
            with self._queue_lock:
                data = self._take_queue()
                reader_sending = not data and self._sending
            if data:
                if not await self._send(data):
                    return
                continue
            if reader_sending:  # its send ends with a wake-up of ours; a close must not cut it short
                await self._to_write.wait()
                continue
            if self._eof_to_send:
                self._eof_to_send = False
                await self._stream.shutdown_write()
            if self._closing:
                return
            await self._to_write.wait()

    def _call(self, method, *args):
        if method is None:
            return None
        try:
            return method(*args)
        except Cancelled:
            raise
        except Exception as error:  # noqa: BLE001 - reported, and it ends this connection only
            self._callback_failed(method, error)
            return None

    def _call_named(self, name: str, *args):
        """Call the protocol's optional method ``name``, if it has one; looking it up may fail like a call."""
        try:
            method = getattr(self._protocol, name, None)
        except Exception as error:  # noqa: BLE001 - as the engine does: reported, and it ends this connection only
            self._callback_failed(self._protocol, error)
            return None
        return self._call(method, *args)

    def _callback_failed(self, where, error: Exception) -> None:
        _report(where, error)
        if self._lost_error is None:
            self._lost_error = error
        self.abort()

    def _fail(self, error: BaseException) -> None:
        if self._lost_error is None:
            self._lost_error = error
        self.abort()

    # --- the transport's methods ----------------------------------------------------------------------------------

    def write(self, data) -> None:
        if self._closed_by_user:
            raise RuntimeError("write() after close()")
        if self._aborting or self._lost:
            return  # the connection is gone: dropped, as asyncio does
        with self._queue_lock:
            self._queue += data
            queued = len(self._queue)
            reader_sends_it = self._in_callback
        if not reader_sends_it:
            self._to_write.set()
        if not self._writing_paused and queued > self._high:
            self._writing_paused = True
            self._call_named("pause_writing")

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self) -> None:
        self._eof_to_send = True
        self._to_write.set()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self._closed_by_user = True
        self._close()

    def _close(self) -> None:
        if not self._closing:
            self._closing = True
            self._to_write.set()
            self._reader_scope.cancel()

    def abort(self) -> None:
        self._aborting = True
        with self._queue_lock:
            self._queue.clear()
        if self._send_scope is not None:
            self._send_scope.cancel()
        self._close()

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def pause_reading(self) -> None:
        self._reading = False
        self._may_read.clear()

    def resume_reading(self) -> None:
        self._reading = True
        self._may_read.set()

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def get_write_buffer_size(self) -> int:
        return len(self._queue)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high}) must be >= low ({low}) must be >= 0")
        self._high, self._low = high, low

    def get_extra_info(self, name: str, default=None):
        return self._extra.get(name, default)

    def fileno(self) -> int:
        return -1 if self._lost else self._stream.fileno()
