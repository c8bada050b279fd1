"""A server's stop and a connection's last moments: ``Shutdown`` (the stop request as connections see it) and
``close_gracefully`` (half-close, drain, close, so the last answer is not lost to a reset).

Both are shared by every server of ours, the HTTP core included, without the command line and the process around it
(``iokit.serve``), so the core depends on this small module only.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import iokit

# Rejecting a connection over the limit costs a task; past this many rejections at once we close without a word.
MAX_CONCURRENT_REJECTIONS = 64
STOP_LINGER = 0.05  # seconds: the linger of a connection closed while the server stops (close_gracefully)


class _Interruptible:
    """What ``Shutdown.interruptible()`` returns: a small class rather than a ``@contextmanager`` generator, because a
    server holding 10,000 waits holds 10,000 of these (a generator and its wrapper are ~0.5 KiB more each)."""

    __slots__ = ("shutdown", "scope")

    def __init__(self, shutdown: "Shutdown", scope) -> None:
        self.shutdown = shutdown
        self.scope = scope

    def __enter__(self):
        self.shutdown._register(self.scope)
        try:
            return self.scope.__enter__()
        except BaseException:
            self.shutdown._unregister(self.scope)
            raise

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            return self.scope.__exit__(exc_type, exc, tb)
        finally:
            self.shutdown._unregister(self.scope)


class Shutdown:
    """The stop request, as connections see it, and the count of connections still open (and of requests' tasks
    still running: a handler whose client is gone still gets the grace).

    A connection wraps each wait that may be abandoned at once on stop (the wait for its next request) in
    ``with shutdown.interruptible() as scope:``; ``begin()`` cancels every such scope, and one entered after ``begin()``
    is cancelled from the start. Tasks on the ``blocking`` backend are threads, so the bookkeeping takes a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scopes: set = set()
        self._requested = False
        self._open_connections = 0
        self._running_tasks = 0   # handlers that waited, as tasks (HTTP): the grace is theirs too
        self._rejecting = 0
        self._all_closed = iokit.Event()
        self._stop_callbacks: list[Callable[[], None]] = []

    @property
    def requested(self) -> bool:
        """``True`` once the server is stopping: a connection should finish its current request and close."""
        return self._requested

    def interruptible(self, timeout: float = math.inf) -> "_Interruptible":
        """Return a context manager around a wait that stop interrupts, and that ends after ``timeout`` seconds.

        It yields the ``CancelScope``: ``scope.cancelled_caught`` says the wait was cut short (by either). One scope
        for both, since entering a scope is not free and this wraps every wait for a next request.
        """
        return _Interruptible(self, iokit.CancelScope(deadline=iokit.current_time() + timeout))

    def _register(self, scope) -> None:
        # Nothing that takes the runtime's LOCK (scope.cancel does) runs under our lock: a task's end takes ours
        # under LOCK (_task_finished), so the other order could deadlock threads on blocking.
        with self._lock:
            self._scopes.add(scope)
            requested = self._requested
        if requested:
            scope.cancel()  # begin() may cancel it too: a second cancel is nothing

    def _unregister(self, scope) -> None:
        with self._lock:
            self._scopes.discard(scope)

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the stop begins (at once if it has): for connections that wait without a scope
        (the HTTP core's protocol connections close their idle ones from it)."""
        with self._lock:
            self._stop_callbacks.append(callback)
            requested = self._requested
        if requested:
            callback()

    def begin(self) -> None:
        """Start stopping: interrupt every interruptible wait, now and from now on."""
        with self._lock:
            self._requested = True
            scopes = list(self._scopes)
            callbacks = list(self._stop_callbacks)
            all_closed = self._all_closed_now()
        if all_closed:
            self._all_closed.set()
        for scope in scopes:
            scope.cancel()
        for callback in callbacks:
            callback()

    async def wait_all_closed(self) -> None:
        """Return once ``begin()`` was called and no connection is open, nor a request's task running."""
        await self._all_closed.wait()

    @property
    def open_connections(self) -> int:
        return self._open_connections

    def _opened(self) -> None:
        self._count(connections=1)

    def _closed(self) -> None:
        self._count(connections=-1)

    def _task_started(self) -> None:
        self._count(tasks=1)

    def _task_finished(self) -> None:
        self._count(tasks=-1)

    def _count(self, connections: int = 0, tasks: int = 0) -> None:
        # A task's end calls this under the runtime's LOCK: the Event, which takes LOCK, is set outside our lock, so
        # the two locks are only ever taken in that order.
        with self._lock:
            self._open_connections += connections
            self._running_tasks += tasks
            all_closed = self._all_closed_now()
        if all_closed:
            self._all_closed.set()

    def _all_closed_now(self) -> bool:  # under the lock
        return self._requested and self._open_connections == 0 and self._running_tasks == 0

    def _try_start_rejection(self) -> bool:
        with self._lock:
            if self._rejecting >= MAX_CONCURRENT_REJECTIONS:
                return False
            self._rejecting += 1
            return True

    def _rejection_done(self) -> None:
        with self._lock:
            self._rejecting -= 1


async def close_gracefully(stream, linger_timeout: float, max_discard: int = 1024 * 1024,
                           shutdown: Shutdown | None = None) -> None:
    """Half-close ``stream``, read and discard what the peer still sends (for ``linger_timeout`` at most), then close.

    Closing a socket with unread input makes the kernel send a reset, and a reset can destroy our last reply in the
    peer's receive buffer before it reads it. Shutting down our side first and draining theirs avoids that. Never raises
    ``OSError`` (the peer may be gone already).

    With ``shutdown``, the server's stop cuts the wait short: a connection closing once the stop has begun lingers at
    most ``STOP_LINGER`` seconds, and one lingering when it begins stops at once. A client that was told (the last
    chunk of its event stream, ``Connection: close``) need not close its side: a browser keeps such a connection for
    seconds, and the stop of a server with one idle ``EventSource`` took the whole 2 s linger.
    """
    try:
        await stream.shutdown_write()
        with _linger_scope(linger_timeout, shutdown):
            discarded = 0
            while discarded < max_discard:
                data = await stream.receive_some(65536)
                if not data:
                    break
                discarded += len(data)
    except OSError:
        pass
    finally:
        await stream.aclose()


def _linger_scope(linger_timeout: float, shutdown: Shutdown | None):
    if shutdown is None:
        return iokit.move_on_after(linger_timeout)
    if shutdown.requested:
        return iokit.move_on_after(min(linger_timeout, STOP_LINGER))
    return shutdown.interruptible(linger_timeout)
