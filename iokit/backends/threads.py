"""The ``threads`` backend: thread offload. The loop thread hands every op to a bounded pool of worker threads, each
of which makes the ordinary blocking call; the completion comes back to the loop through an eventfd.

This is the model of libuv's file I/O and of Java's classic executors: simple, works for every kind of fd, and costs a
thread hand-off (two cross-thread wake-ups) per op. The pool bound is the model's defining limit: an op that waits on
an idle socket holds a worker, so with ``max_workers`` idle connections pending, further ops queue until a worker is
free. The benchmarks show what that costs. Workers that stay idle for ``worker_idle_timeout`` seconds leave, so a
burst's threads and their eventfds go back when it is over.

TIMEOUT ops and per-op deadlines never reach a worker: they are timers in the loop thread (``TimerHeap``).
"""

from __future__ import annotations

import errno
import os
import select
import time

from .._op import Op, OpKind
from ._base import Backend
from ._pool import DEFAULT_IDLE_TIMEOUT, WorkerPool
from ._syscalls import drain_eventfd
from ._timers import TimerHeap, poll_milliseconds

DEFAULT_MAX_WORKERS = 256


class ThreadsBackend(Backend):
    name = "threads"

    def __init__(self, max_workers: int = DEFAULT_MAX_WORKERS,
                 worker_idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        super().__init__()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._wake_fd, select.POLLIN)
        self._pool = WorkerPool(max_workers, self._wake_fd, self.name, worker_idle_timeout)
        self._timers = TimerHeap()

    def _start(self, op: Op) -> None:
        if op.deadline is not None:
            self._timers.add(op.deadline, op, is_deadline=True)
        if op.kind is OpKind.TIMEOUT:
            self._timers.add(time.monotonic() + op.timeout, op, is_deadline=False)
            return
        self._pool.start(op)

    def _request_cancel(self, op: Op) -> None:
        if op.kind is OpKind.TIMEOUT or self._pool.cancel(op):
            self._finish(op, -errno.ECANCELED)

    def _wait_for_events(self, timeout: float | None) -> None:
        timeout = self._timers.timeout(timeout)
        if self._poller.poll(poll_milliseconds(timeout)):
            drain_eventfd(self._wake_fd)
        self._pool.deliver(self)
        self._timers.fire(self)

    def wakeup(self) -> None:
        os.eventfd_write(self._wake_fd, 1)

    def _release(self) -> None:
        self._pool.shutdown()
        self._timers.clear()
        os.close(self._wake_fd)

    def _extra_statistics(self) -> dict:
        return {"workers": self._pool.size, "max_workers": self._pool.max_workers}
