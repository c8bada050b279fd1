"""What every example server shares: the command line, the accept loop, worker processes, and a clean stop.

An example is a *service*: an object with ``max_connections``, ``handle_connection(stream, shutdown)`` and
``reject_connection(stream)`` (what a client over the connection limit gets), and optionally ``lifespan()`` (what runs
around the serving: loading state, background tasks, a last flush), ``single_process`` and ``send_buffer_bytes`` (see
``Service``). ``main(make_service, parser)`` does the rest:

* ``--backend NAME --host HOST --port PORT`` (0: any free port), and prints exactly one line
  ``listening on HOST:PORT backend=NAME`` (flushed) once connections are accepted (an IPv6 host in brackets:
  ``[::1]:8000``). Scripts and tests wait for it.
* **Bad flags are usage errors**: one line on stderr (``prog: error: ...``), exit 2, no traceback; that includes a port
  out of range, a port in use and a host that cannot be bound, found when the server tries to listen.
* The HTTP servers add ``--cors-origin ORIGIN`` (``iokit.http.cors``): pages from those origins may use them.
* **Stopping** on SIGINT or SIGTERM: accept no more; connections that are idle (waiting for their next request inside
  ``shutdown.interruptible()``) close at once; requests in progress get ``--shutdown-grace`` seconds to finish, then are
  cancelled; then everything is closed and the process exits 0. From the first signal on, SIGINT and SIGTERM only
  ask for the stop (``_StopSignals``): a second one during the teardown (a terminal's Ctrl-C reaches every process of
  the group, then the ``--workers`` parent sends SIGTERM) changes nothing, and the exit is still 0.
* **Workers**: ``--workers N`` starts N processes that each listen on the same port with ``SO_REUSEPORT`` (the kernel
  spreads new connections across them; the way to use more than one core). The parent picks the port, waits until every
  worker listens, prints the one line, and on SIGTERM/SIGINT stops them all together; if one worker dies on its own, the
  parent stops the others and exits non-zero, so a supervisor sees the failure. A service whose state lives in one
  process's memory (``single_process``) refuses ``--workers`` above 1 with a usage error.
* **The process is sized for the service**: the open-file limit is raised to fit ``max_connections``, and the
  ``threads`` backend's pool gets a worker for every blocking call a connection may have in progress.
* **Limits as flags**: ``add_limit_arguments`` turns each field of a frozen limits dataclass into a flag
  (``HttpLimits.header_timeout`` -> ``--header-timeout``), so the limits stay defined in one place.

A connection's failure is its own: the accept loop logs it and goes on serving the others. Messages go through
``logging`` (the ``iokit`` loggers), at the level ``--log-level`` sets (default: warning).

The parts: ``flags`` (the command line), ``accept`` (one process: listen, accept, stop), ``sizing`` (the open-file
limit and the threads backend's pool, fitted to ``max_connections``), ``workers`` (the ``--workers`` supervisor);
``iokit.shutdown`` has the stop as connections see it. This module is the service contract and ``main``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any, Callable, Protocol

import iokit

from ..shutdown import MAX_CONCURRENT_REJECTIONS, Shutdown, close_gracefully
from .accept import serve, serve_listener
from .flags import (UsageError, add_limit_arguments, argument_parser, field_descriptions, format_address, limit_unit,
                    limits_from_arguments)
from .sizing import raise_open_file_limit, threads_pool_size
from .workers import supervise_workers

__all__ = ["MAX_CONCURRENT_REJECTIONS", "Service", "Shutdown", "UsageError", "add_limit_arguments",
           "argument_parser", "close_gracefully", "field_descriptions", "format_address", "limit_unit",
           "limits_from_arguments", "main", "raise_open_file_limit", "run_service", "serve", "serve_listener"]

log = logging.getLogger("iokit.serve")


class Service(Protocol):
    """What ``serve`` runs. Beyond these members a service may have, read with ``getattr`` (absent: the default):

    * ``lifespan()`` -> an async context manager (default: none). It is entered before the first connection is accepted
      (and before ``main`` says it listens), and exited once the server has stopped and every connection is closed, so
      that it can load state first, run background tasks inside (a ``TaskGroup`` around its ``yield``, cancelled on
      the way out), and make durable what the requests accepted last. An error it raises stops the server.
    * ``single_process`` (default ``False``): ``True`` when the service keeps state that every request must see in one
      process's memory; ``main`` then refuses ``--workers`` above 1.
    * ``send_buffer_bytes`` (default ``None``: the kernel's autotuning): ``SO_SNDBUF`` for every accepted connection,
      for a service that bounds what it queues per client and must not have the kernel queue megabytes more.
    * ``attach_connection(stream, shutdown, connections, scope)`` (default: none): on epoll and uring, called from the
      accept loop instead of a task running ``handle_connection``, for a service that hands its connections to the
      engine as protocols (``iokit.protocols.attach`` into ``connections``). It spends no task on a connection;
      ``HttpServer`` has it. Tasks it starts go in ``scope``, which is cancelled once the grace is over; nothing in
      ``serve`` waits for them, so the service's ``lifespan`` must (``HttpServer``'s does), and a task counted in the
      ``Shutdown`` meanwhile (``_task_started``/``_task_finished``) gets the grace as a connection does.
    """

    max_connections: int

    async def handle_connection(self, stream: Any, shutdown: "Shutdown") -> None: ...

    async def reject_connection(self, stream: Any) -> None: ...


def main(make_service: Callable[[argparse.Namespace], Service], parser: argparse.ArgumentParser,
         argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), then serve until SIGINT/SIGTERM. Return the exit code (0: clean).

    ``make_service(arguments)`` builds the service; it may raise ``ValueError`` for flags that do not fit together,
    which becomes a usage error (exit 2). It is called in the parent of ``--workers`` too (to read
    ``single_process``), so it must not do I/O: that belongs in the service's ``lifespan()``.
    """
    arguments = parser.parse_args(argv)
    if arguments.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        service = make_service(arguments)
    except ValueError as error:
        parser.error(str(error))
    if getattr(service, "single_process", False) and (arguments.workers > 1 or arguments.reuse_port):
        # Two such processes on one port would each answer for half of the clients from half of the state.
        parser.error(f"this server keeps its state in one process's memory (requests must all see it): "
                     f"{'--workers must be 1' if arguments.workers > 1 else '--reuse-port is refused'}")
    logging.basicConfig(level=arguments.log_level.upper(), format="%(name)s: %(levelname)s: %(message)s")
    _STOP_SIGNALS.install()
    try:
        if arguments.workers > 1:
            return supervise_workers(arguments, _STOP_SIGNALS.requested)
        return run_service(service, arguments)
    except UsageError as error:
        parser.error(str(error))
    finally:
        _STOP_SIGNALS.ignore_from_now_on()


class _StopSignals:
    """SIGINT and SIGTERM as the process sees them outside ``iokit.run``: each only sets ``requested``.

    ``iokit.run`` puts back the handlers it found when it returns, and the backend and the interpreter are then still
    tearing down. With Python's defaults back, a second signal in that window (a terminal's Ctrl-C reaches every
    worker, and the ``--workers`` parent then sends each one SIGTERM; or a user who presses it twice) killed the
    process with 143 or a ``KeyboardInterrupt`` traceback. With these, the stop already under way goes on, and a signal
    that came before the runtime had its own handlers still stops the server (``serve`` looks at ``requested``).

    Once the server has stopped, both are ignored outright: the interpreter's own finalization puts Python's default
    action back for every signal that has a Python handler (it leaves an ignored one alone), and a SIGTERM in those
    last milliseconds would still end the process with 143. So ``main`` is for a process's main thread, on its way
    out when ``main`` returns."""

    def __init__(self) -> None:
        self.requested = threading.Event()

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested.set()

    def ignore_from_now_on(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


_STOP_SIGNALS = _StopSignals()


def run_service(service: Service, arguments: argparse.Namespace) -> int:
    """Run ``await serve(service, arguments)`` on ``arguments.backend``, in a process set up for
    ``service.max_connections``. Return its exit code, or 2 when the backend cannot run here (the reason on stderr)."""
    raise_open_file_limit(4 * service.max_connections + 256)
    try:
        return iokit.run(serve, service, arguments, _STOP_SIGNALS.requested, backend=arguments.backend,
                         max_workers=threads_pool_size(service.max_connections))
    except iokit.BackendUnavailable as error:
        log.error("%s", error)
        return 2
