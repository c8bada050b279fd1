"""Sockets and files for tasks: thin objects over ops, so that a server reads the same on every backend.

Sockets are created non-blocking (every backend expects that: see ``backends/_syscalls.py``) and are closed through
the backend (a CLOSE op), so that the epoll backend drops its registration and io_uring closes in order with the ops
before it. ``sendall`` loops over ``send`` and reports partial progress: when it fails or is cancelled, the
exception carries ``bytes_sent``, as curio does, so a caller can tell what the peer may have received.

On the loop backends with a native engine (epoll, uring) a stream's socket methods return the engine's awaitables
directly: a receive, a send or an accept is then one small C object and no Python frame, and the engine resumes the
task itself when it completes (csrc/iokit_engine.c). ``sendall`` there *queues* the bytes and returns at once unless
the connection's queue is over its bound (backpressure): the writes of one turn leave together, in one vectored
send, and an error of the connection surfaces at its next operation. Everywhere else each method is one Op.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from typing import Any

from . import _op as ops
from .runtime import CancelScope, current_task, current_time, perform

DEFAULT_RECEIVE_SIZE = 65536
# On an engine, sendall returns once the bytes are queued, so a close may find some still waiting to leave: it gives
# them this long, then drops them (a peer that has not taken them by then is not reading).
CLOSE_FLUSH_SECONDS = 10.0


async def _close_fd(fd: int) -> None:
    # Shielded: closing is cleanup and often runs in a task being cancelled; a skipped close would leak the fd.
    with CancelScope(shield=True):
        await perform(ops.close(fd))


async def _close_fd_of(sock: socket.socket, engine=None, flush_seconds: float = CLOSE_FLUSH_SECONDS) -> None:
    fd = sock.detach()
    if fd < 0:
        return
    if engine is None:
        await _close_fd(fd)
        return
    with CancelScope(shield=True):  # shielded from the caller's cancels, as on the Op path
        with CancelScope(deadline=current_time() + flush_seconds):
            await engine.close(fd)  # at the deadline the queued bytes are dropped; it returns once the fd is closed
    # Ops of the Backend API may have left a registration for this fd (epoll: a connect that waited): drop it before
    # the number is reused. Nothing ran between the close and here, so the number is still ours.
    current_task().runtime.backend.forget(fd)


def _current_engine():
    """The native engine of the runtime this task runs on, or None (blocking, threads, outside a runtime)."""
    try:
        return current_task().runtime.engine
    except RuntimeError:
        return None


class _AsyncClosing:
    """``async with x:`` closes ``x`` at the end of the block."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


class SocketStream(_AsyncClosing):
    """A connected socket. Methods raise the ``OSError`` subclasses the kernel's errors map to."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._engine = _current_engine()

    def fileno(self) -> int:
        return self.socket.fileno()

    # Plain methods that return an awaitable (the engine's, or a coroutine for the Op path): ``await`` them.

    def receive_some(self, max_bytes: int = DEFAULT_RECEIVE_SIZE):
        """Receive up to ``max_bytes``; ``b""`` when the peer has closed its side. No buffer is held while waiting:
        the backend takes one only once data has arrived (``ops.receive``; the engine's provided buffers or its
        loop-wide buffer), so an idle connection costs no buffer."""
        if self._engine is not None:
            return self._engine.receive(self.socket.fileno(), max_bytes)
        return self._receive_some_op(max_bytes)

    async def _receive_some_op(self, max_bytes: int) -> bytes:
        op = ops.receive(self.fileno(), max_bytes)
        await perform(op)
        return op.data

    def recv_into(self, buffer: Any):
        """Receive into ``buffer``; return the byte count (0 at end of stream)."""
        if self._engine is not None:
            return self._engine.recv_into(self.socket.fileno(), buffer)
        return perform(ops.recv_into(self.fileno(), buffer))

    async def send(self, data: Any) -> int:
        """Send some of ``data``; return how many bytes went out (on an engine: all of them were queued)."""
        if self._engine is not None:
            await self._engine.send_all(self.socket.fileno(), data)
            return memoryview(data).nbytes
        return await perform(ops.send(self.fileno(), data))

    def sendall(self, data: Any):
        """Send all of ``data``. On failure or cancel, the exception raised has ``bytes_sent`` set."""
        if self._engine is not None:
            return self._engine.send_all(self.socket.fileno(), data)
        return self._sendall_op(data)

    async def _sendall_op(self, data: Any) -> None:
        view = ops.as_byte_view(data, writable=False)
        fd = self.socket.fileno()
        sent = 0
        try:
            total = view.nbytes
            if total:
                sent = await perform(ops.send(fd, view))  # the usual case: one send takes it all
            while sent < total:
                sent += await perform(ops.send(fd, view[sent:]))
        except BaseException as exc:
            exc.bytes_sent = sent
            raise

    async def wait_readable(self) -> None:
        """Return once data (or the end of the stream) can be received, without taking any of it."""
        if self._engine is not None:
            await self._engine.wait_readable(self.socket.fileno())
        else:
            await perform(ops.poll(self.fileno(), select.POLLIN))

    async def shutdown_write(self) -> None:
        """Send end-of-stream to the peer (its reads return ``b""``), after anything queued; it can still receive."""
        if self._engine is not None:
            await self._engine.shutdown_write(self.socket.fileno())
        else:
            await perform(ops.shutdown(self.fileno(), socket.SHUT_WR))

    async def aclose(self, flush_seconds: float = CLOSE_FLUSH_SECONDS) -> None:
        """Close the socket (idempotent). On an engine, bytes still queued get ``flush_seconds`` to leave, then are
        dropped (at once if a send on this connection was cancelled or failed: the stream is cut anyway)."""
        if self.socket.fileno() >= 0:
            await _close_fd_of(self.socket, self._engine, flush_seconds)


class Listener(_AsyncClosing):
    """A listening TCP socket. ``address`` is the ``(host, port)`` it is bound to."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.address = sock.getsockname()[:2]
        self._engine = _current_engine()

    async def accept(self) -> SocketStream:
        """Wait for the next connection."""
        if self._engine is not None:
            fd = await self._engine.accept(self.socket.fileno())
        else:
            fd = await perform(ops.accept(self.socket.fileno()))
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX:
            # As connect_tcp does: without it, Nagle plus delayed ACKs hold small replies back by ~40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return SocketStream(sock)

    async def aclose(self) -> None:
        if self.socket.fileno() >= 0:
            await _close_fd_of(self.socket, self._engine)


def _family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def open_tcp_listener(host: str, port: int, *, backlog: int = 1024, reuse_port: bool = False) -> Listener:
    """Bind and listen on ``host:port`` (a numeric IPv4 or IPv6 address; port 0 picks a free one).
    ``reuse_port`` lets several processes share the port (SO_REUSEPORT), the kernel spreading connections."""
    sock = socket.socket(_family_of(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return Listener(sock)


async def connect_tcp(host: str, port: int) -> SocketStream:
    """Connect to ``host:port`` (numeric address) and return the stream (TCP_NODELAY on)."""
    sock = socket.socket(_family_of(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await perform(ops.connect(sock.fileno(), (host, port)))
    except BaseException:
        # The connect that waited left a registration for this fd (epoll): drop it before the number is reused, or
        # the next socket given that number never sees its readiness.
        current_task().runtime.backend.forget(sock.fileno())
        sock.close()
        raise
    return SocketStream(sock)


class File(_AsyncClosing):
    """An open file. Every method is one op: reads and writes at explicit offsets, syncs, close."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    async def read_at(self, size: int, offset: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` (fewer at end of file)."""
        buffer = bytearray(size)
        count = await perform(ops.read_at(self.fd, buffer, offset))
        return memoryview(buffer)[:count].tobytes()

    async def read_into_at(self, buffer: Any, offset: int) -> int:
        return await perform(ops.read_at(self.fd, buffer, offset))

    async def write_at(self, data: Any, offset: int) -> int:
        """Write ``data`` at ``offset``; return the count (may be short, e.g. on a full disk)."""
        return await perform(ops.write_at(self.fd, data, offset))

    async def write_all_at(self, data: Any, offset: int) -> None:
        """Write all of ``data`` at ``offset``, continuing after short writes; ``bytes_written`` on the exception."""
        view = ops.as_byte_view(data, writable=False)
        done = 0
        try:
            while done < view.nbytes:
                written = await perform(ops.write_at(self.fd, view[done:], offset + done))
                if written == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += written
        except BaseException as exc:
            exc.bytes_written = done
            raise

    async def fsync(self) -> None:
        await perform(ops.fsync(self.fd))

    async def fdatasync(self) -> None:
        await perform(ops.fdatasync(self.fd))

    async def aclose(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            await _close_fd(fd)


async def open_file(path: str | bytes | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o666) -> File:
    """Open ``path`` through the backend (io_uring: IORING_OP_OPENAT) and return a ``File``."""
    return File(await perform(ops.open_file(path, flags, mode)))
