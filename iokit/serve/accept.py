"""One server process: listen, enter the service's lifespan, say ``listening on``, accept until SIGINT/SIGTERM, stop
(idle connections at once, busy ones after ``--shutdown-grace``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
from typing import Callable

import iokit

from .. import protocols
from ..shutdown import Shutdown
from .flags import UsageError, format_address

SIGNAL_CHECK_INTERVAL = 0.1  # seconds; see _wait_for_stop
log = logging.getLogger("iokit.serve")


async def serve(service, arguments: argparse.Namespace, stop_requested=None) -> int:
    """Listen, enter the service's lifespan, announce, serve until SIGINT or SIGTERM, then stop as the module says.
    Return 0. Raises ``UsageError`` when it cannot listen on ``--host``/``--port``."""
    stop = iokit.signal_event(signal.SIGINT, signal.SIGTERM)
    if stop_requested is not None and stop_requested.is_set():  # a signal before the runtime's handlers were in place
        stop.set()
    listener = await _listen(arguments.host, arguments.port, reuse_port=arguments.reuse_port)
    backend_name = iokit.current_backend().name
    await serve_listener(listener, service, stop, arguments.shutdown_grace,
                         ready=lambda: _announce(listener.address, backend_name, arguments.ready_fd))
    return 0


async def _listen(host: str, port: int, reuse_port: bool):
    try:
        return await iokit.open_tcp_listener(host, port, reuse_port=reuse_port)
    except OSError as error:  # in use, not an address of this machine, not an address at all (gaierror)
        raise UsageError(f"cannot listen on {format_address(host, port)}: {error.strerror or error}") from None


async def serve_listener(listener, service, stop, shutdown_grace: float,
                         ready: Callable[[], None] | None = None) -> None:
    """Accept connections on ``listener`` for ``service`` until the ``iokit.Event`` ``stop`` is set; then close idle
    connections at once, give busy ones ``shutdown_grace`` seconds, cancel the rest, and close the listener.

    The service's ``lifespan()``, if it has one, is entered first and exited last, once every connection is closed;
    ``ready()`` is called in between, just before the first accept. This is the server without the process around it,
    for embedding one in a program or a test.

    Each connection is served by a task running ``service.handle_connection(stream, shutdown)``; on the native engine
    a service with ``attach_connection(stream, shutdown, connections, scope)`` instead attaches it to the engine from
    the accept loop, and no task waits for it (a held request then costs no task for its connection: its handler, if
    it waits, is a task in ``scope``). Those connections are aborted as the serving ends, as a task's would be.
    """
    shutdown = Shutdown()
    attached = protocols.Connections(on_closed=lambda transport: shutdown._closed())
    lifespan = getattr(service, "lifespan", None)
    try:
        async with lifespan() if lifespan is not None else contextlib.nullcontext():
            async with iokit.TaskGroup() as tasks:
                tasks.spawn(_accept_loop, listener, service, shutdown, tasks, attached, name="accept")
                try:
                    if ready is not None:
                        ready()
                    await _wait_for_stop(stop)
                    shutdown.begin()
                    with iokit.move_on_after(shutdown_grace):
                        await shutdown.wait_all_closed()
                finally:
                    tasks.cancel_scope.cancel()
                    await attached.abort_all()
    finally:
        await listener.aclose()  # the accept loop closes it as the stop begins; this is for a lifespan that failed


async def _wait_for_stop(stop) -> None:
    """Return once ``stop`` is set, looking every ``SIGNAL_CHECK_INTERVAL`` whether a signal is waiting for its handler.

    Python runs a signal's handler on the main thread, the next time that thread runs Python code. The kernel may
    deliver a process's signal to any of its threads (another one when the main thread has one pending already, as
    with a terminal's SIGINT and then the ``--workers`` parent's SIGTERM): then the main thread, asleep in its wait,
    is not interrupted, and nothing runs the handler. Seen: ``--workers 2`` on ``blocking`` hung after Ctrl-C until
    the parent's SIGKILL, one time in three. Waking the main thread now and then runs it."""
    while not stop.is_set():
        with iokit.move_on_after(SIGNAL_CHECK_INTERVAL):
            await stop.wait()


def _announce(address: tuple, backend_name: str, ready_fd: int | None) -> None:
    if ready_fd is None:
        print(f"listening on {format_address(address[0], address[1])} backend={backend_name}", flush=True)
    else:
        os.write(ready_fd, f"{backend_name}\n".encode())
        os.close(ready_fd)


async def _accept_loop(listener, service, shutdown: Shutdown, tasks, attached) -> None:
    send_buffer_bytes = getattr(service, "send_buffer_bytes", None)
    attach = getattr(service, "attach_connection", None)
    try:
        while (stream := await _accept_one(listener, shutdown)) is not None:
            if shutdown.open_connections >= service.max_connections:
                if shutdown._try_start_rejection():
                    tasks.spawn(_reject, service, stream, shutdown, name="reject")
                else:
                    await stream.aclose()
                continue
            # Replies are often small and written in pieces (a head, then chunks; a batch of binary replies): without
            # TCP_NODELAY, Nagle holds a second small write until the first is acknowledged, and the client's delayed
            # ACK makes that about 40 ms.
            stream.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if send_buffer_bytes is not None:
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
            shutdown._opened()
            if attach is not None and stream._engine is not None:
                _attach_connection(attach, stream, shutdown, attached, tasks.cancel_scope)
            else:
                tasks.spawn(_run_connection, service, stream, shutdown, name="connection")
    finally:
        await listener.aclose()


async def _accept_one(listener, shutdown: Shutdown):
    """Return the next connection, or ``None`` once the server is stopping."""
    while not shutdown.requested:
        with shutdown.interruptible():
            try:
                return await listener.accept()
            except OSError as error:
                # EMFILE/ENFILE, ECONNABORTED: this connection is lost, the listener is fine. Pause a little so that
                # running out of descriptors does not become a busy loop.
                log.warning("accept failed: %s", error)
                await iokit.sleep(0.05)
    return None


def _attach_connection(attach, stream, shutdown: Shutdown, attached, scope) -> None:
    try:
        attach(stream, shutdown, attached, scope)
    except Exception:  # noqa: BLE001 - this connection is lost, the server goes on
        log.exception("a connection failed")
        if stream.socket.fileno() >= 0:  # never handed to the engine, so its close is not counted yet
            stream.socket.close()
            shutdown._closed()


async def _run_connection(service, stream, shutdown: Shutdown) -> None:
    try:
        await service.handle_connection(stream, shutdown)
    except OSError:
        pass  # the peer reset or went away: nothing to tell anyone
    except Exception:
        log.exception("a connection failed")
    finally:
        try:
            await stream.aclose()
        finally:
            shutdown._closed()


async def _reject(service, stream, shutdown: Shutdown) -> None:
    try:
        await service.reject_connection(stream)
    except OSError:
        pass
    finally:
        try:
            await stream.aclose()
        finally:
            shutdown._rejection_done()
