"""Thousands of client connections from one test process, driven by one epoll: the load of the scale tests.

A thread or a process per connection would measure the client, not the server; one ``select.epoll`` over non-blocking
sockets holds 10,000 connections in a few MiB. The kernel facts it relies on:

* A non-blocking ``connect`` on loopback returns ``EINPROGRESS`` and the socket turns writable once the handshake is
  done, which is when the connection sits in the server's accept queue, not when the server has accepted it. The
  listener's backlog (1024 in ``iokit.streams``) is the bound: a SYN that finds the queue full is dropped and retried
  a second later. So connects are issued in a window and the swarm counts "held" from the server's side.
* Each socket costs a descriptor here: the caller raises ``RLIMIT_NOFILE`` first (``raise_open_file_limit``).
* ``SO_RCVBUF`` must be set before ``connect`` to shrink the advertised window (a slow reader that the server's writes
  fill quickly).

Every wait is bounded: a method that runs out of time raises ``AssertionError`` saying how far it got.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import select
import socket
import time
from typing import Callable

CONNECT_WINDOW = 512
READ_SIZE = 65536


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to ``wanted`` (at most the hard limit); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def http_response_complete(data: bytes) -> bool:
    """``True`` once ``data`` holds a whole HTTP response framed by Content-Length (what the example servers send)."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    for line in data[:head_end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(data) - head_end - 4 >= int(value)
    return True  # no body announced (a 204, or a head we only need to see)


def status_of(response: bytes) -> int:
    """The status code of an HTTP response (0 for none: the connection closed without a word)."""
    parts = response.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else 0


class Swarm:
    """``count`` connections to ``address``, all driven from the calling thread. Use it as a context manager.

    ``received[i]`` is what connection ``i`` got so far; ``closed_by_peer[i]`` says the server closed it.
    """

    def __init__(self, address: tuple[str, int], count: int, *, receive_buffer: int | None = None):
        self.address = address
        self.count = count
        self.receive_buffer = receive_buffer
        self.sockets: list[socket.socket] = []
        self.received: list[bytearray] = []
        self.closed_by_peer: list[bool] = []
        self._epoll = select.epoll()
        self._index_of_fd: dict[int, int] = {}

    def __enter__(self) -> "Swarm":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        self._epoll.close()

    # -- connecting ---------------------------------------------------------------------------------------------------

    def connect_all(self, timeout: float) -> float:
        """Open every connection (at most ``CONNECT_WINDOW`` handshakes at once); return the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        pending: set[int] = set()
        while len(self.sockets) < self.count or pending:
            while len(self.sockets) < self.count and len(pending) < CONNECT_WINDOW:
                pending.add(self._start_connect())
            for fd, _ in self._epoll.poll(max(0.0, min(0.5, deadline - time.monotonic()))):
                index = self._index_of_fd[fd]
                failure = self.sockets[index].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if failure:
                    raise AssertionError(f"connection {index} failed: {errno.errorcode.get(failure, failure)}")
                self._epoll.modify(fd, 0)  # connected: quiet until someone wants to read it
                pending.discard(index)
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.sockets) - len(pending)} of {self.count} connections after {timeout} s")
        return time.monotonic() - started

    def _start_connect(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.setblocking(False)
        index = len(self.sockets)
        self.sockets.append(sock)
        self.received.append(bytearray())
        self.closed_by_peer.append(False)
        self._index_of_fd[sock.fileno()] = index
        error = sock.connect_ex(self.address)
        if error not in (0, errno.EINPROGRESS):
            raise AssertionError(f"connect {index}: {errno.errorcode.get(error, error)}")
        self._epoll.register(sock, select.EPOLLOUT)
        return index

    # -- talking ------------------------------------------------------------------------------------------------------

    def send(self, data: bytes, indexes: range | list[int] | None = None) -> None:
        """Send ``data`` on each connection (all by default); each send is small enough to go out in one piece."""
        for index in (range(self.count) if indexes is None else indexes):
            sent = self.sockets[index].send(data)
            assert sent == len(data), f"connection {index}: a short send of a {len(data)}-byte request"

    def read_until(self, done: Callable[[int], bool], timeout: float,
                   indexes: range | list[int] | None = None) -> float:
        """Read the connections in ``indexes`` (all by default) until ``done(index)`` holds for each; return the
        seconds it took. A connection the server closes counts as done (see ``closed_by_peer``)."""
        started = time.monotonic()
        deadline = started + timeout
        chosen = range(self.count) if indexes is None else indexes
        with self._watching(chosen):
            waiting = {index for index in chosen if not done(index)}
            while waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{len(waiting)} connection(s) still waiting after {timeout} s, "
                                         f"e.g. {sorted(waiting)[:5]}")
                for index in self._poll_and_read(min(remaining, 0.5)):
                    if index in waiting and (done(index) or self.closed_by_peer[index]):
                        waiting.discard(index)
        return time.monotonic() - started

    def pump(self, seconds: float, indexes: range | list[int]) -> None:
        """Keep reading the connections in ``indexes`` for ``seconds`` (readers that keep up with a stream)."""
        end = time.monotonic() + seconds
        with self._watching(indexes):
            while (remaining := end - time.monotonic()) > 0:
                self._poll_and_read(min(remaining, 0.5))

    @contextlib.contextmanager
    def _watching(self, indexes):
        """Wake up for input on ``indexes`` inside the block; quiet again after it (the others stay unread)."""
        for index in indexes:
            if not self.closed_by_peer[index]:
                self._epoll.modify(self.sockets[index], select.EPOLLIN | select.EPOLLRDHUP)
        try:
            yield
        finally:
            for index in indexes:
                if not self.closed_by_peer[index]:
                    self._epoll.modify(self.sockets[index], 0)

    def _poll_and_read(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` for input; read what came; return the indexes that had some (or were closed)."""
        ready = [self._index_of_fd[fd] for fd, _ in self._epoll.poll(timeout)]
        for index in ready:
            self.read_available(index)
        return ready

    def read_available(self, index: int) -> None:
        """Take what connection ``index`` has now, without waiting; note when the server closed it."""
        sock = self.sockets[index]
        while not self.closed_by_peer[index]:
            try:
                data = sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed_by_peer[index] = True
                self._epoll.unregister(sock)
                return
            self.received[index] += data

    def responses_complete(self, index: int) -> bool:
        return http_response_complete(bytes(self.received[index]))

    def forget_received(self) -> None:
        for buffer in self.received:
            buffer.clear()
