"""``--workers N``: N copies of the server on one port (SO_REUSEPORT), started, watched and stopped together."""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from .flags import UsageError, format_address

WORKER_START_TIMEOUT = 30.0
log = logging.getLogger("iokit.serve")


def supervise_workers(arguments: argparse.Namespace, stop_requested: threading.Event) -> int:
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
                log.error("a worker exited on its own; stopping the others")
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
            log.error("the workers did not all start")
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
        log.error("worker %s exited with %s", worker.pid, worker.returncode)
    return not failed
