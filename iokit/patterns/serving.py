"""Running a server that holds requests open: what the polling and push servers need around ``iokit.serve``.

``iokit.serve.main`` runs a service of plain request/response handlers. A server that *holds* requests (long polls,
event streams) needs more, and this module adds it without changing ``iokit.serve``:

* **Handlers see the stop.** On SIGTERM a held request should be answered at once and a stream ended, not left to the
  shutdown grace. ``serve`` hands its ``Shutdown`` to each connection; ``HoldingService`` keeps it (there is one per
  process) in a ``ServerStop`` that handlers use: ``with stop.interruptible():`` around a wait ends it on stop.
* **Background tasks** next to the accept loop (the job runner): ``main`` runs ``serve.serve`` inside a task group with
  them, and cancels them once the server has stopped.
* **A connection limit and a thread pool sized for holding.** A held request is a connection and, for disconnect
  detection, a pending receive: on ``threads`` that receive occupies a pool worker, so the pool must have workers for
  every connection (``max_workers``), or held requests would starve everyone else; on ``blocking`` each is a thread. The
  open-file limit is raised to fit (each thread of ``blocking`` and worker of ``threads`` has an eventfd).
* **A bounded kernel send buffer** where the server keeps its own bounded queue per client (``send_buffer_bytes``).
* **Disconnect detection beside a long wait**: ``watching_disconnect`` runs ``request.wait_disconnected()`` in a second
  task for as long as a block runs (an event stream). A single held wait does without it: it waits in
  ``wait_disconnected()`` itself and is woken by a cancel (see ``examples/jobs_server.py``).

The state of these servers (jobs, subscribers) lives in one process, so ``--workers`` must stay 1.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import sys
from typing import Awaitable, Callable

import iokit
from iokit import serve
from iokit.http import HttpLimits, HttpServer

BackgroundTask = Callable[[], Awaitable[None]]
# Per connection, at most two ops wait in the pool at once on ``threads`` (the handler's send, the disconnect watch).
_POOL_WORKERS_PER_CONNECTION = 2
# Per connection, file descriptors at worst: the socket, and an eventfd for each of two threads (blocking) or workers.
_FDS_PER_CONNECTION = 3
_FDS_SPARE = 256


class ServerStop:
    """The server's stop request, as a handler sees it."""

    def __init__(self) -> None:
        self._shutdown: serve.Shutdown | None = None

    def attach(self, shutdown: serve.Shutdown) -> None:
        self._shutdown = shutdown

    @contextlib.contextmanager
    def interruptible(self):
        """Return a context manager around a wait that the stop ends at once (its scope's ``cancelled_caught`` says
        so). Outside a connection (no stop to wait for yet) it is a plain scope."""
        if self._shutdown is None:
            with iokit.CancelScope() as scope:
                yield scope
        else:
            with self._shutdown.interruptible() as scope:
                yield scope


class HoldingService:
    """An ``HttpServer`` as ``iokit.serve`` runs it, plus the stop for its handlers and its background tasks.
    ``send_buffer_bytes``, if given, bounds each connection's kernel send buffer (SO_SNDBUF)."""

    def __init__(self, http: HttpServer, stop: ServerStop, background: list[BackgroundTask],
                 send_buffer_bytes: int | None = None):
        self.http = http
        self.stop = stop
        self.background = background
        self.send_buffer_bytes = send_buffer_bytes
        self.max_connections = http.max_connections

    async def handle_connection(self, stream, shutdown: serve.Shutdown) -> None:
        self.stop.attach(shutdown)
        if self.send_buffer_bytes is not None:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
        await self.http.handle_connection(stream, shutdown)

    async def reject_connection(self, stream) -> None:
        await self.http.reject_connection(stream)


def argument_parser(description: str, limits_type: type, held: int) -> argparse.ArgumentParser:
    """Return the example servers' parser with every ``HttpLimits`` and ``limits_type`` field as a flag, and a
    connection limit that leaves room for ``held`` held requests (``limits.connections_for``)."""
    from .limits import connections_for
    parser = serve.argument_parser(description)
    serve.add_limit_arguments(parser, HttpLimits)
    serve.add_limit_arguments(parser, limits_type)
    parser.set_defaults(max_connections=connections_for(held))
    return parser


def main(make_service: Callable[[argparse.Namespace], HoldingService], parser: argparse.ArgumentParser,
         argv: list[str] | None, *, held: Callable[[argparse.Namespace], int]) -> int:
    """Parse ``argv``, serve until SIGINT/SIGTERM, return the exit code (0: clean stop, 2: backend unavailable).

    ``held(arguments)`` is how many requests the server may hold; the connection limit must exceed it.
    """
    arguments = parser.parse_args(argv)
    if arguments.workers != 1:
        parser.error("this server keeps its state in one process: --workers must be 1")
    if held(arguments) >= arguments.max_connections:
        parser.error(f"--max-connections ({arguments.max_connections}) must exceed the {held(arguments)} requests "
                     f"the server may hold")
    raise_open_file_limit(arguments.max_connections * _FDS_PER_CONNECTION + _FDS_SPARE)
    service = make_service(arguments)
    try:
        return iokit.run(_serve_with_background, service, arguments, backend=arguments.backend,
                         max_workers=arguments.max_connections * _POOL_WORKERS_PER_CONNECTION)
    except iokit.BackendUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


async def _serve_with_background(service: HoldingService, arguments: argparse.Namespace) -> int:
    async with iokit.TaskGroup() as tasks:
        for task in service.background:
            tasks.spawn(task, name=getattr(task, "__name__", None))
        code = await serve.serve(service, arguments)
        tasks.cancel_scope.cancel()
    return code


def raise_open_file_limit(wanted: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (never past the hard limit, never lower it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@contextlib.asynccontextmanager
async def watching_disconnect(request, on_disconnect: Callable[[], None]):
    """Return an async context manager that calls ``on_disconnect()`` if the client closes (or resets) the connection
    while the block runs. The request's body is read first (it must be, to see the end of the stream)."""
    await request.read_body()

    async def watch() -> None:
        try:
            await request.wait_disconnected()
        except OSError:
            pass  # a reset: gone all the same
        on_disconnect()

    async with iokit.TaskGroup() as group:
        group.spawn(watch, name="disconnect-watch")
        try:
            yield
        finally:
            group.cancel_scope.cancel()
