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

A connection's failure is its own: the accept loop logs it and goes on serving the others.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from typing import Any, Callable, Protocol

import iokit

from .shutdown import MAX_CONCURRENT_REJECTIONS, Shutdown, close_gracefully  # noqa: F401 - close_gracefully: examples

WORKER_START_TIMEOUT = 30.0
SIGNAL_CHECK_INTERVAL = 0.1  # seconds; see _wait_for_stop


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


# -- command line -----------------------------------------------------------------------------------------------------

class UsageError(Exception):
    """A flag the server cannot run with, found after parsing (a port in use, a host that cannot be bound): ``main``
    says it in one line and exits 2, as for a flag argparse refused."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error told in one line: the usage of a server with thirty limits is a screenful, and the
    line that matters would scroll away."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {text!r}")
    return int(text)


def _number_type(value_type: type) -> Callable[[str], Any]:
    """Return an argparse type for a limit or a duration: ``value_type`` (int or float), not negative, not NaN. Zero
    passes here; the limits dataclasses refuse it where it makes no sense."""
    def parse(text: str):
        try:
            value = value_type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if value_type is int else 'a number'}, "
                                             f"not {text!r}") from None
        if value != value or value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, not {text!r}")
        return value
    parse.__name__ = value_type.__name__  # argparse names the type in its messages
    return parse


def argument_parser(description: str, *limits_types: type) -> argparse.ArgumentParser:
    """Return a parser with the flags every example server takes, and a flag for each field of each ``limits_types``
    (``add_limit_arguments``); an example adds its own, then calls ``main``."""
    parser = _ArgumentParser(description=description)
    parser.add_argument("--backend", default="auto", choices=["blocking", "threads", "epoll", "uring", "auto"],
                        help="the I/O backend (default: auto, which prefers uring and says why it fell back)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="numeric address to listen on, IPv4 or IPv6 (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000,
                        help="port to listen on, 0 to 65535; 0 picks a free one (default: 8000)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes sharing the port with SO_REUSEPORT (default: 1; servers that keep their state "
                             "in one process refuse more)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="set SO_REUSEPORT on the listening socket, to share the port with other processes "
                             "(refused where --workers is)")
    parser.add_argument("--shutdown-grace", type=_number_type(float), default=5.0,
                        help="seconds requests in progress get to finish on SIGTERM/SIGINT (default: 5)")
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # set by the worker parent
    for limits_type in limits_types:
        add_limit_arguments(parser, limits_type)
    return parser


def add_limit_arguments(parser: argparse.ArgumentParser, limits_type: type) -> None:
    """Add one flag per field of the frozen dataclass ``limits_type`` (``max_body_bytes`` -> ``--max-body-bytes``),
    under the parser's one ``limits`` heading, each with the field's description and unit."""
    group = getattr(parser, "_iokit_limits_group", None)
    if group is None:
        group = parser._iokit_limits_group = parser.add_argument_group(
            "limits", "what the server bounds, and the status a client gets past each bound")
    descriptions = field_descriptions(limits_type)
    for field in dataclasses.fields(limits_type):
        default = field.default
        value_type = type(default) if default is not None else float
        unit = limit_unit(field.name, value_type)
        shown_default = f"{default:g}" if isinstance(default, float) else f"{default}"
        text = descriptions.get(field.name, "").replace("%", "%%")
        group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=_number_type(value_type),
                           default=default, metavar=unit.upper().replace(" ", "_") if unit else "N",
                           help=f"{text} (default: {shown_default}{' ' + unit if unit else ''})")


def limit_unit(name: str, value_type: type) -> str:
    """Return the unit of a limit, from the naming rule the limits dataclasses follow (sizes in bytes, times in
    seconds), or ``""`` for a count."""
    for suffix, unit in (("_bytes", "bytes"), ("_size", "bytes"), ("_ms", "milliseconds"), ("_chars", "characters"),
                         ("_jitter", "fraction")):
        if name.endswith(suffix):
            return unit
    return "seconds" if value_type is float else ""


def field_descriptions(limits_type: type) -> dict[str, str]:
    """Return each field's description: the string literal under it in the class body (what the source says; Python
    keeps no such attribute docstrings at run time), on one line."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(limits_type)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body
    found = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            found[statement.target.id] = " ".join(following.value.value.split()).replace("``", "")
    return found


def limits_from_arguments(arguments: argparse.Namespace, limits_type: type):
    """Return a ``limits_type`` built from the flags ``add_limit_arguments`` added."""
    return limits_type(**{field.name: getattr(arguments, field.name) for field in dataclasses.fields(limits_type)})


def format_address(host: str, port: int) -> str:
    """Return ``host:port`` as a URL writes it: an IPv6 address in brackets (``[::1]:8000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    _STOP_SIGNALS.install()
    try:
        if arguments.workers > 1:
            return _supervise_workers(arguments)
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
    Return 0. Raises ``UsageError`` when it cannot listen on ``--host``/``--port``."""
    stop = iokit.signal_event(signal.SIGINT, signal.SIGTERM)
    if _STOP_SIGNALS.requested.is_set():  # a signal before the runtime's handlers were in place
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
                await _wait_for_stop(stop)
                shutdown.begin()
                with iokit.move_on_after(shutdown_grace):
                    await shutdown.wait_all_closed()
                tasks.cancel_scope.cancel()
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


# -- worker processes -------------------------------------------------------------------------------------------------

def _supervise_workers(arguments: argparse.Namespace) -> int:
    """Run ``arguments.workers`` copies of this program on one port; stop them together. Return the exit code."""
    placeholder = socket.socket(socket.AF_INET6 if ":" in arguments.host else socket.AF_INET, socket.SOCK_STREAM)
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        _refuse_a_port_in_use(arguments.host, arguments.port)
        placeholder.bind((arguments.host, arguments.port))  # holds the port (bound, not listening: no connections)
    except OSError as error:
        placeholder.close()
        raise UsageError(f"cannot listen on {format_address(arguments.host, arguments.port)}: "
                         f"{error.strerror or error}") from None
    port = placeholder.getsockname()[1]
    ready_read, ready_write = os.pipe()
    # The workers run this same program (interpreter options and all) with these flags last, and argparse keeps the last.
    command = [sys.executable, *sys.orig_argv[1:], "--workers", "1", "--port", str(port), "--reuse-port",
               "--ready-fd", str(ready_write)]
    stop_requested = _STOP_SIGNALS.requested
    workers = [subprocess.Popen(command, pass_fds=(ready_write,)) for _ in range(arguments.workers)]
    os.close(ready_write)
    try:
        backend_names = _wait_until_ready(ready_read, workers, arguments.workers, stop_requested)
        placeholder.close()
        if backend_names is None:
            return 1
        print(f"listening on {format_address(arguments.host, port)} backend={backend_names[0]}", flush=True)
        while not stop_requested.is_set():
            if any(worker.poll() is not None for worker in workers):
                print("a worker exited on its own; stopping the others", file=sys.stderr)
                return 1
            stop_requested.wait(0.05)
        return 0 if _stop_workers(workers, arguments.shutdown_grace + 5.0) else 1
    finally:
        if any(worker.poll() is None for worker in workers):  # an early return, or an error
            _stop_workers(workers, arguments.shutdown_grace + 5.0)
        os.close(ready_read)
        placeholder.close()


def _refuse_a_port_in_use(host: str, port: int) -> None:
    """Raise ``OSError(EADDRINUSE)`` if another socket listens on ``host:port``. A placeholder bound with SO_REUSEPORT
    shares the port with any listener of the same user that set it too (an earlier ``--workers`` server), which would
    then get half of our connections: try a plain bind as well."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


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
    failed = [worker for worker in workers if worker.returncode != 0]
    for worker in failed:
        print(f"worker {worker.pid} exited with {worker.returncode}", file=sys.stderr)
    return not failed
