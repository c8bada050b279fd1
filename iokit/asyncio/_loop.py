"""The event loop: asyncio's Unix selector loop, with iokit underneath.

What asyncio's own loop gives for free and we keep: the ready queue, timers, ``run_until_complete``, executors,
``getaddrinfo``, signal handlers (a self-pipe woken by ``signal.set_wakeup_fd``), subprocesses, datagram endpoints,
Unix sockets, the ``sock_*`` methods and ``add_reader``/``add_writer``. What we change is underneath:

* **The wait is the backend's** (``backend.wait``: on uring one ``io_uring_enter``, on epoll one ``epoll_wait``, both
  through the native engine's ``turn``, with the GIL released). During it the engine runs its connections'
  completions and calls their protocols from C.
* **Stream connections belong to the engine** (``_make_socket_transport``): every TCP and Unix stream transport that
  ``create_server``, ``create_connection``, ``create_unix_server``, ``connect_accepted_socket`` or ``start_tls``
  makes is an ``EngineTransport``, so data_received -> transport.write is C from the completion to the send.
* **Readiness for everything else** (``add_reader``/``add_writer``: listening sockets, the self-pipe, datagram and
  pipe transports, ``sock_*``): a level-triggered epoll set of our own (``selectors.EpollSelector``), whose fd is
  itself watched by one POLL op through the backend. When that op completes, the set is polled without blocking;
  otherwise a turn costs no extra syscall.
* **A flush that calls back.** The engine's turn flushes first (sends what protocols wrote, delivers what waited for
  ``resume_reading``, closes what was closed), then waits; when that flush called a protocol (``connection_lost``
  included) the engine's wait does not block, so what the callback scheduled runs in this iteration.
"""

from __future__ import annotations

import collections
import select
import selectors
from asyncio import unix_events

from .. import ops
from .._op import OpState
from ..backends import Backend, open_backend
from ._transport import EngineTransport, engine_can_drive

_ENGINE_BACKENDS = ("epoll", "uring")
_DONE = OpState.DONE


class _EngineHost:
    """What the engine needs of a runtime driver. This loop runs no iokit tasks on it, only protocols, so none of
    these is ever reached; they say so if they are."""

    def __init__(self) -> None:
        self._ready = collections.deque()

    def _handle(self, task, trap) -> None:
        raise RuntimeError("iokit.asyncio's loop runs no iokit tasks")

    def _finish_task(self, task, result, error) -> None:
        raise RuntimeError("iokit.asyncio's loop runs no iokit tasks")


class BackendSelector(selectors.EpollSelector):
    """asyncio's selector, whose ``select`` waits in an iokit backend (and runs the engine's connections there).

    The epoll set of ``selectors.EpollSelector`` holds the fds of ``add_reader``/``add_writer``; its own fd is watched
    by one POLL op in the backend, re-armed after it fires."""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        self.engine = backend.attach_engine(_EngineHost())
        self._watch = None  # the POLL op on our epoll fd, while it is in flight
        self._wait = self._engine_wait(backend) if self.engine is not None else backend.wait

    def _engine_wait(self, backend: Backend):
        """``backend.wait`` for a turn in which the backend itself has nothing to do: the engine's turn alone.

        ``Backend.wait`` and the backend's ``_wait_for_events`` are ~0.8 us of Python per call around a 0.5 us
        ``engine.turn`` (uring, nothing ready), and asyncio turns once per round of callbacks. When the backend has
        ops of its own to offer, deliver or time (only our POLL op here), its full wait runs."""
        turn = self.engine.turn
        if backend.name == "uring":
            def wait(timeout):
                if backend._completed or backend._backlog or backend._cancel_backlog or backend._deadline_timers:
                    backend.wait(timeout)
                    return
                count = turn(timeout)
                if count:  # CQEs of the backend's own ops (our POLL op) were reaped into its arrays
                    backend._process_completions(count)
        else:
            def wait(timeout):
                if backend._completed or backend._timers._heap:  # (its file pool wakes its own set: seen below)
                    backend.wait(timeout)
                    return
                if turn(timeout):  # the backend's own epoll set (our POLL op's fd, its wakeup) has events
                    backend.wait(0)
        return wait

    def select(self, timeout: float | None = None):
        watch = self._watch
        if watch is None and self._fd_to_key:
            watch = self._watch = ops.poll(self._selector.fileno(), select.POLLIN)
            self.backend.submit(watch)
        self._wait(timeout)
        if watch is not None and watch.state is _DONE:
            self._watch = None
            return super().select(0)
        return []

    def close(self) -> None:
        try:
            backend, self.backend = self.backend, None
            if backend is not None:
                backend.detach_engine()
                self.engine = None
                backend.close()  # cancels the POLL op and drains it
        finally:
            super().close()


class IokitEventLoop(unix_events.SelectorEventLoop):
    """An ``asyncio`` event loop over an iokit backend (``epoll`` or ``uring``); see ``iokit.asyncio``.

    ``backend`` is a name (``"auto"``: uring, else epoll, as ``iokit.open_backend``) or a ``Backend`` you made; the
    loop closes it in ``close()`` either way. ``backend_options`` go to ``open_backend``."""

    _closed = True  # until asyncio's __init__ has run: a refused backend leaves nothing for __del__ to close

    def __init__(self, backend: str | Backend = "auto", **backend_options) -> None:
        if not isinstance(backend, Backend):
            if backend in ("blocking", "threads"):
                raise NotImplementedError(
                    f"iokit.asyncio runs on epoll or uring, not {backend!r}: an asyncio loop is one thread waiting "
                    f"for readiness or completions, and the {backend} backend's model (a thread per blocking "
                    f"operation) has nothing for it to wait on; use backend='epoll' or 'uring'")
            backend = open_backend(backend, **backend_options)
        if backend.name not in _ENGINE_BACKENDS:
            backend.close()
            raise NotImplementedError(f"iokit.asyncio runs on epoll or uring, not {backend.name!r}")
        selector = BackendSelector(backend)
        self._engine = selector.engine  # None on a uring kernel without provided buffers: asyncio's transports then
        self.backend_name = backend.name
        super().__init__(selector)

    def _make_socket_transport(self, sock, protocol, waiter=None, *, extra=None, server=None):
        if self._engine is None or not engine_can_drive(sock):
            return super()._make_socket_transport(sock, protocol, waiter, extra=extra, server=server)
        return EngineTransport(self, self._engine, sock, protocol, waiter, extra, server)

    def _make_ssl_transport(self, rawsock, protocol, sslcontext, waiter=None, *, server_side=False,
                            server_hostname=None, extra=None, server=None, ssl_handshake_timeout=None,
                            ssl_shutdown_timeout=None):
        # asyncio's SSLProtocol over our transport (its base makes a selector transport by name, not through us).
        from asyncio import constants, sslproto
        ssl_protocol = sslproto.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout or constants.SSL_HANDSHAKE_TIMEOUT,
            ssl_shutdown_timeout=ssl_shutdown_timeout or constants.SSL_SHUTDOWN_TIMEOUT)
        self._make_socket_transport(rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} backend={self.backend_name} running={self.is_running()} "
                f"closed={self.is_closed()} debug={self.get_debug()}>")
