"""What every example server shares: the command line, the accept loop, worker processes, and a clean stop.

An example is a *service*: an object with ``max_connections``, ``handle_connection(stream, shutdown)`` and
``reject_connection(stream)`` (what a client over the connection limit gets), and optionally ``lifespan()`` (what runs
around the serving: loading state, background tasks, a last flush), ``single_process`` and ``send_buffer_bytes`` (see
``Service``). ``main(make_service, parser)`` does the rest:

* ``--backend NAME --host HOST --port PORT`` (0: any free port), and prints exactly one line
  ``listening on HOST:PORT backend=NAME`` (flushed) once connections are accepted. Scripts and tests wait for it.
* **Stopping** on SIGINT or SIGTERM: accept no more; connections that are idle (waiting for their next request inside
  ``shutdown.interruptible()``) close at once; requests in progress get ``--shutdown-grace`` seconds to finish, then are
  cancelled; then everything is closed and the process exits 0.
* **Workers**: ``--workers N`` starts N processes that each listen on the same port with ``SO_REUSEPORT`` (the kernel
  spreads new connections across them; the way to use more than one core). The parent picks the port, waits until every
  worker listens, prints the one line, and on SIGTERM/SIGINT stops them all together; if one worker dies on its own, the
  parent stops the others and exits non-zero, so a supervisor sees the failure. A service whose state lives in one
  process's memory (``single_process``) refuses ``--workers`` above 1 with a usage error.
* **The process is sized for the service**: the open-file limit is raised to fit ``max_connections``, and the
  ``threads`` backend's pool gets a worker for every blocking call a connection may have in progress.
* **Limits as flags**: ``add_limit_arguments`` turns each field of a frozen limits dataclass into a flag
  (``HttpLimits.header_timeout`` -> ``--header-timeout``), so the limits stay defined in one place.

A connection's failure is its own: the accept loop logs it and goes on serving the others.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Protocol

import iokit

# Rejecting a connection over the limit costs a task; past this many rejections at once we close without a word.
MAX_CONCURRENT_REJECTIONS = 64
WORKER_START_TIMEOUT = 30.0


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
    """

    max_connections: int

    async def handle_connection(self, stream: Any, shutdown: "Shutdown") -> None: ...

    async def reject_connection(self, stream: Any) -> None: ...


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
    """The stop request, as connections see it, and the count of connections still open.

    A connection wraps each wait that may be abandoned at once on stop (the wait for its next request) in
    ``with shutdown.interruptible() as scope:``; ``begin()`` cancels every such scope, and one entered after ``begin()``
    is cancelled from the start. Tasks on the ``blocking`` backend are threads, so the bookkeeping takes a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scopes: set = set()
        self._requested = False
        self._open_connections = 0
        self._rejecting = 0
        self._all_closed = iokit.Event()

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
        with self._lock:
            self._scopes.add(scope)
            if self._requested:
                scope.cancel()

    def _unregister(self, scope) -> None:
        with self._lock:
            self._scopes.discard(scope)

    def begin(self) -> None:
        """Start stopping: interrupt every interruptible wait, now and from now on."""
        with self._lock:
            self._requested = True
            scopes = list(self._scopes)
            if self._open_connections == 0:
                self._all_closed.set()
        for scope in scopes:
            scope.cancel()

    async def wait_all_closed(self) -> None:
        """Return once ``begin()`` was called and no connection is open."""
        await self._all_closed.wait()

    @property
    def open_connections(self) -> int:
        return self._open_connections

    def _opened(self) -> None:
        with self._lock:
            self._open_connections += 1

    def _closed(self) -> None:
        with self._lock:
            self._open_connections -= 1
            if self._open_connections == 0 and self._requested:
                self._all_closed.set()

    def _try_start_rejection(self) -> bool:
        with self._lock:
            if self._rejecting >= MAX_CONCURRENT_REJECTIONS:
                return False
            self._rejecting += 1
            return True

    def _rejection_done(self) -> None:
        with self._lock:
            self._rejecting -= 1


# -- command line -----------------------------------------------------------------------------------------------------

def argument_parser(description: str, *limits_types: type) -> argparse.ArgumentParser:
    """Return a parser with the flags every example server takes, and a flag for each field of each ``limits_types``
    (``add_limit_arguments``); an example adds its own, then calls ``main``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backend", default="auto", choices=["blocking", "threads", "epoll", "uring", "auto"],
                        help="the I/O backend (default: auto, which prefers uring and says why it fell back)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes sharing the port with SO_REUSEPORT (default: 1)")
    parser.add_argument("--reuse-port", action="store_true", help="set SO_REUSEPORT on the listening socket")
    parser.add_argument("--shutdown-grace", type=float, default=5.0,
                        help="seconds requests in progress get to finish on SIGTERM/SIGINT (default: 5)")
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # set by the worker parent
    for limits_type in limits_types:
        add_limit_arguments(parser, limits_type)
    return parser


def add_limit_arguments(parser: argparse.ArgumentParser, limits_type: type) -> None:
    """Add one flag per field of the frozen dataclass ``limits_type`` (``max_body_bytes`` -> ``--max-body-bytes``)."""
    group = parser.add_argument_group("limits")
    for field in dataclasses.fields(limits_type):
        default = field.default
        value_type = type(default) if default is not None else float
        group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=value_type, default=default,
                           help=f"(default: {default})")


def limits_from_arguments(arguments: argparse.Namespace, limits_type: type):
    """Return a ``limits_type`` built from the flags ``add_limit_arguments`` added."""
    return limits_type(**{field.name: getattr(arguments, field.name) for field in dataclasses.fields(limits_type)})


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
    if arguments.workers > 1:
        if getattr(service, "single_process", False):
            parser.error("this server keeps its state in one process's memory (requests must all see it): "
                         "--workers must be 1")
        return _supervise_workers(arguments)
    return run_service(service, arguments)


def run_service(service: Service, arguments: argparse.Namespace) -> int:
    """Run ``await serve(service, arguments)`` on ``arguments.backend``, in a process set up for
    ``service.max_connections``. Return its exit code, or 2 when the backend cannot run here (the reason on stderr)."""
    raise_open_file_limit(4 * service.max_connections + 256)
    try:
        # The threads backend holds a worker for every blocking call in progress, and a connection waits in at most two
        # (a read and a write; a held request's wait for the client to leave is one). A pool smaller than that would
        # let idle or held connections take every worker and starve the rest (the model's limit: see
        # backends/threads.py); workers start on demand, so the bound costs nothing idle. The other backends ignore it.
        return iokit.run(serve, service, arguments, backend=arguments.backend,
                         max_workers=2 * service.max_connections + MAX_CONCURRENT_REJECTIONS)
    except iokit.BackendUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def raise_open_file_limit(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (within the hard limit).

    Each connection is a descriptor, and on the blocking backend its thread has a wake-up eventfd too; the default soft
    limit (often 1024) would cap a server below its own ``max_connections``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))


# -- one process ------------------------------------------------------------------------------------------------------

async def serve(service: Service, arguments: argparse.Namespace) -> int:
    """Listen, enter the service's lifespan, announce, serve until SIGINT or SIGTERM, then stop as the module says.
    Return 0."""
    stop = iokit.signal_event(signal.SIGINT, signal.SIGTERM)
    listener = await iokit.open_tcp_listener(arguments.host, arguments.port, reuse_port=arguments.reuse_port)
    backend_name = iokit.current_backend().name
    await serve_listener(listener, service, stop, arguments.shutdown_grace,
                         ready=lambda: _announce(listener.address, backend_name, arguments.ready_fd))
    return 0


async def serve_listener(listener, service: Service, stop, shutdown_grace: float,
                         ready: Callable[[], None] | None = None) -> None:
    """Accept connections on ``listener`` for ``service`` until the ``iokit.Event`` ``stop`` is set; then close idle
    connections at once, give busy ones ``shutdown_grace`` seconds, cancel the rest, and close the listener.

    The service's ``lifespan()``, if it has one, is entered first and exited last, once every connection is closed;
    ``ready()`` is called in between, just before the first accept. This is the server without the process around it,
    for embedding one in a program or a test.
    """
    shutdown = Shutdown()
    lifespan = getattr(service, "lifespan", None)
    try:
        async with lifespan() if lifespan is not None else contextlib.nullcontext():
            async with iokit.TaskGroup() as tasks:
                tasks.spawn(_accept_loop, listener, service, shutdown, tasks, name="accept")
                if ready is not None:
                    ready()
                await stop.wait()
                shutdown.begin()
                with iokit.move_on_after(shutdown_grace):
                    await shutdown.wait_all_closed()
                tasks.cancel_scope.cancel()
    finally:
        await listener.aclose()  # the accept loop closes it as the stop begins; this is for a lifespan that failed


def _announce(address: tuple, backend_name: str, ready_fd: int | None) -> None:
    host, port = address[0], address[1]
    if ready_fd is None:
        print(f"listening on {host}:{port} backend={backend_name}", flush=True)
    else:
        os.write(ready_fd, f"{backend_name}\n".encode())
        os.close(ready_fd)


async def _accept_loop(listener, service: Service, shutdown: Shutdown, tasks) -> None:
    send_buffer_bytes = getattr(service, "send_buffer_bytes", None)
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
                print(f"accept failed: {error}", file=sys.stderr)
                await iokit.sleep(0.05)
    return None


async def _run_connection(service: Service, stream, shutdown: Shutdown) -> None:
    try:
        await service.handle_connection(stream, shutdown)
    except OSError:
        pass  # the peer reset or went away: nothing to tell anyone
    except Exception:
        traceback.print_exc(file=sys.stderr)
    finally:
        try:
            await stream.aclose()
        finally:
            shutdown._closed()


async def _reject(service: Service, stream, shutdown: Shutdown) -> None:
    try:
        await service.reject_connection(stream)
    except OSError:
        pass
    finally:
        try:
            await stream.aclose()
        finally:
            shutdown._rejection_done()


async def close_gracefully(stream, linger_timeout: float, max_discard: int = 1024 * 1024) -> None:
    """Half-close ``stream``, read and discard what the peer still sends (for ``linger_timeout`` at most), then close.

    Closing a socket with unread input makes the kernel send a reset, and a reset can destroy our last reply in the
    peer's receive buffer before it reads it. Shutting down our side first and draining theirs avoids that. Never raises
    ``OSError`` (the peer may be gone already).
    """
    try:
        await stream.shutdown_write()
        with iokit.move_on_after(linger_timeout):
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


# -- worker processes -------------------------------------------------------------------------------------------------

def _supervise_workers(arguments: argparse.Namespace) -> int:
    """Run ``arguments.workers`` copies of this program on one port; stop them together. Return the exit code."""
    placeholder = socket.socket(socket.AF_INET6 if ":" in arguments.host else socket.AF_INET, socket.SOCK_STREAM)
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    placeholder.bind((arguments.host, arguments.port))  # holds the port (bound, not listening: gets no connections)
    port = placeholder.getsockname()[1]
    ready_read, ready_write = os.pipe()
    # The workers run this same program (interpreter options and all) with these flags last, and argparse keeps the last.
    command = [sys.executable, *sys.orig_argv[1:], "--workers", "1", "--port", str(port), "--reuse-port",
               "--ready-fd", str(ready_write)]
    stop_requested = threading.Event()
    previous_handlers = {sig: signal.signal(sig, lambda *_: stop_requested.set())
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    workers = [subprocess.Popen(command, pass_fds=(ready_write,)) for _ in range(arguments.workers)]
    os.close(ready_write)
    try:
        backend_names = _wait_until_ready(ready_read, workers, arguments.workers, stop_requested)
        placeholder.close()
        if backend_names is None:
            return 1
        print(f"listening on {arguments.host}:{port} backend={backend_names[0]}", flush=True)
        while not stop_requested.is_set():
            if any(worker.poll() is not None for worker in workers):
                print("a worker exited on its own; stopping the others", file=sys.stderr)
                return 1
            stop_requested.wait(0.05)
        return 0 if _stop_workers(workers, arguments.shutdown_grace + 5.0) else 1
    finally:
        _stop_workers(workers, arguments.shutdown_grace + 5.0)
        os.close(ready_read)
        placeholder.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def _wait_until_ready(ready_read: int, workers: list, count: int, stop_requested: threading.Event) -> list | None:
    """Return each worker's backend name once all have said they listen, or ``None`` if one died or time ran out."""
    received = b""
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while received.count(b"\n") < count:
        if stop_requested.is_set() or time.monotonic() > deadline or any(w.poll() is not None for w in workers):
            print("the workers did not all start", file=sys.stderr)
            return None
        readable, _, _ = select.select([ready_read], [], [], 0.05)
        if readable:
            received += os.read(ready_read, 4096)
    return received.decode().split()


def _stop_workers(workers: list, timeout: float) -> bool:
    """SIGTERM every worker still running, wait ``timeout`` (then SIGKILL). Return ``True`` if all exited with 0."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return all(worker.returncode == 0 for worker in workers)
