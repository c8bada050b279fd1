"""Small helpers shared by the suites (no fixtures here: see conftest.py)."""

from __future__ import annotations

import os
import socket
import time


def idle_socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected, non-blocking AF_UNIX stream pair on which nothing is sent (every backend expects non-blocking
    sockets)."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def unused_fd() -> int:
    """An fd number that is surely closed and will not be handed out again soon (fds are allocated lowest-first, and
    the backends open eventfds lazily: a freshly closed low number could be reused under the test's feet)."""
    fd = os.open(os.devnull, os.O_RDONLY)
    high = 4000
    os.dup2(fd, high)
    os.close(fd)
    os.close(high)
    return high


def collect(backend, wanted, timeout: float = 10.0) -> list:
    """Call ``backend.wait`` until every op in ``wanted`` has been returned; return everything returned, in order.
    Fails if an op is returned twice or the time runs out."""
    wanted = list(wanted)
    pending = {id(op) for op in wanted}
    returned = []
    end = time.monotonic() + timeout
    while pending:
        remaining = end - time.monotonic()
        assert remaining > 0, f"timed out: {len(pending)} of {len(wanted)} ops never came back from wait()"
        for op in backend.wait(min(remaining, 0.5)):
            assert id(op) not in {id(o) for o in returned}, f"{op!r} returned twice by wait()"
            returned.append(op)
            pending.discard(id(op))
    return returned


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.005) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= end:
            return False
        time.sleep(interval)
    return True
