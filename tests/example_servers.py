"""Running an example server as a real process, for the tests that drive it from outside.

Each example prints ``listening on HOST:PORT backend=NAME`` once it accepts connections; ``ServerProcess`` starts one with
``--port 0``, waits for that line (with a deadline, so a server that dies or hangs fails the test instead of blocking it),
and stops it with SIGTERM at the end, failing if it does not exit cleanly (code 0) in time. Its stderr goes to a file that
is shown when something goes wrong. The upload, jobs and push tests use it too.

``backend_name`` is a module-scoped fixture over the four backends, so each test module starts one server per backend;
``uring`` is skipped, with the reason, where ``iokit.backends()`` says the kernel or the build cannot run it.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import iokit
from iokit.bench.processes import stop_process

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples' shared modules (binproto.py) import from there

_LISTENING = re.compile(r"^listening on (?P<host>[^\s]+):(?P<port>\d+) backend=(?P<backend>[\w:]+)$")  # faulty:epoll under IOKIT_FAULTS


def _backend_params() -> list:
    params = []
    for info in iokit.backends():
        marks = [] if info.available else [pytest.mark.skip(reason=f"{info.name} unavailable here: {info.reason}")]
        params.append(pytest.param(info.name, id=info.name, marks=marks))
    return params


@pytest.fixture(scope="module", params=_backend_params())
def backend_name(request) -> str:
    return request.param


class ServerProcess:
    """An example server in a child process. ``address`` is ``(host, port)`` once started; use it as a context manager.

    ``start()`` runs it and waits for its line (raising ``AssertionError`` if it dies or stays silent); as a context
    manager it starts, and at the end stops it with SIGTERM and fails the test unless it exits with code 0.
    """

    def __init__(self, script: Path, backend: str, *arguments: str, env: dict[str, str] | None = None,
                 start_timeout: float = 20.0):
        self.command = [sys.executable, str(script), "--backend", backend, "--port", "0", *arguments]
        self.backend = backend
        self._env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self._start_timeout = start_timeout
        self._stderr = tempfile.TemporaryFile()
        self.process: subprocess.Popen | None = None
        self.address: tuple[str, int] = ("", 0)
        self.listening_line = ""

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        code = self.stop()
        stderr = self.stderr_text
        self.close()
        if exc_info[0] is None:
            assert code == 0, f"server exited with {code} on SIGTERM\n{stderr}"

    def close(self) -> int:
        """Stop the server (SIGTERM) if it still runs, release its stderr file, and return its exit code."""
        code = self.stop()
        self._stderr.close()
        return code

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._stderr, env=self._env,
                                        text=True, bufsize=1)
        line = self._read_line(self._start_timeout)
        found = _LISTENING.match(line.rstrip("\n"))
        if not found:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"no 'listening on' line, got {line!r}\n{self.stderr_text}")
        self.listening_line = line.rstrip("\n")
        self.address = (found["host"].strip("[]"), int(found["port"]))  # an IPv6 host is printed in brackets
        if self.backend != "auto" and found["backend"] != self.backend:
            self.close()  # never leave a running server behind a failed start
            raise AssertionError(f"asked for backend {self.backend!r}, the server says {line!r}")

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        host = self.address[0]
        return f"http://[{host}]:{self.address[1]}" if ":" in host else f"http://{host}:{self.address[1]}"

    @property
    def stderr_text(self) -> str:
        if self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and return the exit code (killing the process, and returning -9, if it outlives ``timeout``)."""
        if self.process is None:
            return 0
        return stop_process(self.process, sig, timeout)

    def _read_line(self, timeout: float) -> str:
        assert self.process and self.process.stdout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"server not listening after {timeout} s\n{self.stderr_text}")
        return self.process.stdout.readline()


def run_example_client(script: Path, server: ServerProcess, *arguments: str, timeout: float = 60.0) -> str:
    """Run an example client against ``server``; return its stdout. Fails the test on a non-zero exit."""
    command = [sys.executable, str(script), "--host", server.address[0], "--port", str(server.port), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"{command} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true (return ``True``) or ``timeout`` passes (return ``False``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
