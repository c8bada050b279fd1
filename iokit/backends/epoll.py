"""The ``epoll`` backend: readiness. Try the non-blocking call first; only if it says EAGAIN, wait for epoll to report
the fd ready, then try again.

The kernel facts this relies on:

* A socket op on a non-blocking fd either makes progress or fails with EAGAIN at once. Most ops on a busy connection
  succeed on the first try and never touch epoll at all.
* **Edge-triggered registration, kept for the fd's life.** An fd is added once, with EPOLLIN | EPOLLOUT | EPOLLRDHUP |
  EPOLLET, the first time an op on it has to wait; it is never modified or removed per op. With EPOLLET the kernel
  reports a *change* to ready. That is safe here because an op only waits after it saw EAGAIN: the buffer was empty
  (or full) at that moment, so the next arrival (or drain) is a change and produces an event. When an event comes, the
  waiting ops are retried in order until one sees EAGAIN again. No epoll_ctl per op, no event for fds nobody waits on.
* The registration belongs to the open file, not the number: a CLOSE op through this backend removes it (and fails
  the ops still waiting on that fd with EBADF). An fd closed behind the backend's back must be reported with
  ``forget(fd)`` before its number is reused; ``iokit.streams`` always closes through the backend.
* **Regular files are always "ready"** (epoll_ctl refuses them with EPERM), so readiness cannot help a disk read:
  a pread on a cold page cache, or an fsync, blocks whoever calls it for milliseconds. By default file ops (read/write
  at an offset, vectored, fsync, fdatasync, open, batches) therefore go to a worker pool, as libuv does, and complete
  through an eventfd in the same epoll set; the event loop never stalls on the disk. The pool may grow to
  ``DEFAULT_FILE_WORKERS`` threads: with O_DIRECT each worker keeps one request at the device, so the bound is the
  deepest queue the device sees (4 workers gave 26k O_DIRECT reads/s at QD32 where 32 threads gave 75k); workers
  start on demand and leave when idle, so a server that reads little holds few. ``file_ops="inline"`` performs
  them in the loop thread instead, which is faster when the page cache is warm (no hand-off) and is what the
  benchmarks compare.
"""

from __future__ import annotations

import errno
import os
import select
import time

from .. import _engine
from .._kinds import FILE_KINDS
from .._op import Op, OpKind
from ._base import Backend
from ._pool import WorkerPool
from ._syscalls import EAGAIN, attempt, drain_eventfd, wants_writable
from ._timers import TimerHeap

_EPOLL_FLAGS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
_WRITABLE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
DEFAULT_FILE_WORKERS = 32


class _Waiters:
    """The ops parked on one fd until it is ready, in arrival order."""

    __slots__ = ("readers", "writers")

    def __init__(self) -> None:
        # Lists, not deques: nearly always zero or one op long, and an fd's entry lives as long as the connection
        # (a deque costs ~600 bytes, times 10,000 connections).
        self.readers: list[Op] = []
        self.writers: list[Op] = []


class EpollBackend(Backend):
    name = "epoll"

    def __init__(self, file_ops: str = "pool", file_workers: int = DEFAULT_FILE_WORKERS) -> None:
        if file_ops not in ("pool", "inline"):
            raise ValueError(f"file_ops must be 'pool' or 'inline', got {file_ops!r}")
        super().__init__()
        self._epoll = select.epoll(flags=select.EPOLL_CLOEXEC)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._fds: dict[int, _Waiters] = {}  # every fd registered with epoll, with its waiting ops
        self._file_ops = file_ops
        self._pool = WorkerPool(file_workers, self._wake_fd, self.name) if file_ops == "pool" else None
        self._timers = TimerHeap()
        self._syscalls = 0  # epoll_wait calls and non-blocking attempts
        self._engine = None  # the native engine, while a runtime runs on this backend

    def attach_engine(self, driver):
        """The engine keeps an epoll set of its own for its sockets, with this backend's set inside it, so one
        epoll_wait per turn sees both (this set holds the wakeup eventfd, the file pool's and the rare ops' fds)."""
        if self._engine is not None:
            raise RuntimeError("an engine is attached to this backend already")
        self._engine = _engine.Loop(driver, "epoll", python_epoll_fd=self._epoll.fileno())
        return self._engine

    def detach_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.drain()
            engine.detach()

    def forget(self, fd: int) -> None:
        """Drop the registration of ``fd`` (closed outside this backend) so its number can be reused safely."""
        if self._engine is not None:
            self._engine.forget(fd)
        waiters = self._fds.pop(fd, None)
        if waiters is None:
            return
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # already closed: the kernel dropped the registration with the file
        for op in (*waiters.readers, *waiters.writers):
            self._finish(op, -errno.EBADF)

    # --- starting ops -----------------------------------------------------------------------------------------------

    def _start(self, op: Op) -> None:
        if op.deadline is not None:
            self._timers.add(op.deadline, op, is_deadline=True)
        kind = op.kind
        if kind is OpKind.TIMEOUT:
            self._timers.add(time.monotonic() + op.timeout, op, is_deadline=False)
            return
        if self._pool is not None and kind in FILE_KINDS:
            self._pool.start(op)
            return
        if kind is OpKind.CLOSE:
            self.forget(op.fd)
        self._syscalls += 1
        result = attempt(op)
        if result != EAGAIN:
            self._finish(op, result)
            return
        waiters = self._fds.get(op.fd)
        if waiters is None:
            try:
                self._epoll.register(op.fd, _EPOLL_FLAGS)
            except OSError as exc:
                self._finish(op, -exc.errno)
                return
            waiters = self._fds[op.fd] = _Waiters()
        (waiters.writers if wants_writable(op) else waiters.readers).append(op)

    def _request_cancel(self, op: Op) -> None:
        waiters = self._fds.get(op.fd)
        if waiters is not None:
            queue = waiters.writers if wants_writable(op) else waiters.readers
            if op in queue:
                queue.remove(op)
                self._finish(op, -errno.ECANCELED)
                return
        if op.kind is OpKind.TIMEOUT:
            self._finish(op, -errno.ECANCELED)
        elif self._pool is not None and self._pool.cancel(op):
            self._finish(op, -errno.ECANCELED)
        # else: a worker runs it and will report the outcome

    # --- completing ops ---------------------------------------------------------------------------------------------

    def _wait_for_events(self, timeout: float | None) -> None:
        timeout = self._timers.timeout(timeout)
        self._syscalls += 1
        if self._engine is not None:
            # The engine waits on its set (ours inside it) and runs its own completions; ours are then ready now.
            events = self._epoll.poll(0) if self._engine.turn(timeout) else ()
        else:
            events = self._epoll.poll(-1 if timeout is None else timeout)
        for fd, mask in events:
            if fd == self._wake_fd:
                drain_eventfd(self._wake_fd)
                continue
            waiters = self._fds.get(fd)
            if waiters is None:
                continue
            if mask & _READABLE:
                self._retry(waiters.readers)
            if mask & _WRITABLE:
                self._retry(waiters.writers)
        if self._pool is not None:
            self._pool.deliver(self)
        self._timers.fire(self)

    def _retry(self, queue: list[Op]) -> None:
        # Edge-triggered: keep trying the parked ops, in order, until one finds the fd not ready again.
        while queue:
            op = queue[0]
            self._syscalls += 1
            result = attempt(op)
            if result == EAGAIN:
                return
            del queue[0]
            self._finish(op, result)

    def wakeup(self) -> None:
        os.eventfd_write(self._wake_fd, 1)

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._timers.clear()
        self._fds.clear()
        self._epoll.close()
        os.close(self._wake_fd)

    def _extra_statistics(self) -> dict:
        extra = {"registered_fds": len(self._fds), "file_ops": self._file_ops}
        if self._engine is not None:
            extra["engine"] = self._engine.statistics()
        return extra
