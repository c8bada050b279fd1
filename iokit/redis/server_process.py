"""A throwaway ``redis-server``: on a free port, in a temporary directory, persisting nothing, for tests and benches.

The tests talk to a real Redis, not a mock: the point of the client is what a real server does (its replies, its
closing a connection when it dies, its coming back on the same port). ``kill()`` and ``start()`` again on the same
port are what a restart looks like to a client. Needs the ``redis-server`` binary (Debian's package of that name; the
Makefile's ``apt-test`` installs it).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Iterable

START_TIMEOUT = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class RedisServerProcess:
    """``redis-server`` in a child process. ``url`` is ``redis://127.0.0.1:PORT/0``; a context manager that starts it
    and, at the end, kills it and removes its directory. ``password`` makes it require ``AUTH``; ``durable`` makes it
    append every write to its log and fsync it before replying (``appendfsync always``), so that a write it
    acknowledged survives ``kill()`` and ``start()``. ``cpus`` pins it to those CPUs (the bench puts it on the core of
    the servers it serves, so that their figures include what Redis costs)."""

    def __init__(self, port: int | None = None, *, password: str | None = None, durable: bool = False,
                 executable: str = "redis-server", cpus: Iterable[int] | None = None):
        found = shutil.which(executable)
        if found is None:
            raise FileNotFoundError(f"{executable} is not installed (Debian: apt-get install redis-server)")
        self.executable = found
        self.host = "127.0.0.1"
        self.port = free_port() if port is None else port
        self.password = password
        self.durable = durable
        self.cpus = None if cpus is None else frozenset(cpus)
        self.directory = tempfile.mkdtemp(prefix="iokit-redis-")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def __enter__(self) -> "RedisServerProcess":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def start(self) -> None:
        """Start the server (again, on the same port after ``kill``) and return once it answers ``PING``."""
        command = [self.executable, "--port", str(self.port), "--bind", self.host, "--dir", self.directory,
                   "--save", "", "--appendonly", "yes" if self.durable else "no", "--appendfsync", "always",
                   "--daemonize", "no", "--logfile", "redis.log", "--maxclients", "20000"]
        if self.password is not None:
            command += ["--requirepass", self.password]
        pin = None if self.cpus is None else functools.partial(os.sched_setaffinity, 0, self.cpus)
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=pin)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}: {self.log_tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL: no goodbye to its clients but the kernel's closing of their sockets)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.directory, "redis.log"), errors="replace") as log:
                return log.read()[-2000:]
        except OSError:
            return ""

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as probe:
                probe.sendall(b"PING\r\n")
                reply = probe.recv(64)
        except OSError:
            return False
        return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
