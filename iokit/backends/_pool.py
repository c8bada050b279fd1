"""A bounded pool of worker threads that perform ops with blocking calls (the ``threads`` model, and ``epoll``'s
regular-file ops).

Workers are started on demand, up to ``max_workers``, and a worker that finds no op for ``idle_timeout`` seconds
leaves, closing its eventfd: a burst of connections would otherwise leave a thread and an fd per op it ever ran at once,
for the life of the process. Leaving is decided under the lock, against the count of idle workers that ``start`` hands
ops to, so an op is never queued for a worker that is on its way out. A worker performs an op with
``wait_then_attempt`` (try; if the socket is not ready, block in poll(2) on it and on the worker's own eventfd), so a
cancel can interrupt a worker that waits on an idle socket. A queued op that is cancelled before a worker takes it
never runs.

A batch (``read_batch``/``write_batch``) is split into parts, each a slice of its blocks that one worker performs with
one C call (``BatchCall``); the batch completes when its last part does. How finely: an O_DIRECT read or write waits
~100 us on the device, so each block gets a part of its own and the device sees as many requests at once as there
are workers; a page-cache block is a ~1 us memory copy, cheaper than the hand-off to a worker, so buffered batches
go in parts of ``BUFFERED_BLOCKS_PER_PART``. Cancelling a batch settles every block: parts not started never run
(their blocks get -ECANCELED), and running parts stop before their next block.

Completions are handed back to the loop thread, never finished on the worker: the worker appends ``(op, result)`` to
a list under a lock and writes the loop's eventfd (``notify_fd``); the loop calls ``take_completions()``. So the
in-flight table is only ever touched by the loop thread.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import queue
import threading

from .._kinds import BATCH_KINDS
from .._op import Op
from ._syscalls import BatchCall, wait_then_attempt

_QUEUED, _RUNNING, _CANCELLED_EARLY = "queued", "running", "cancelled-before-start"

DEFAULT_IDLE_TIMEOUT = 5.0
"""Seconds a worker waits for an op before it leaves (a burst's threads and eventfds go back within this)."""
BUFFERED_BLOCKS_PER_PART = 8
"""Blocks of a batch without O_DIRECT that one worker performs in a row (see the module's docstring)."""


class _Part:
    """Blocks ``[start, start + count)`` of a batch op, for one worker. Its id is negative: never an op's."""

    __slots__ = ("batch", "call", "start", "count", "id")

    def __init__(self, batch: Op, call: BatchCall, start: int, count: int, part_id: int) -> None:
        self.batch, self.call, self.start, self.count, self.id = batch, call, start, count, part_id


class _BatchInPool:
    """What the pool keeps about a batch op while its parts run (in ``op.backend_data``)."""

    __slots__ = ("call", "parts", "pending")

    def __init__(self, call: BatchCall, parts: list[_Part]) -> None:
        self.call, self.parts, self.pending = call, parts, len(parts)


def _is_direct(fd: int) -> bool:
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
    except OSError:
        return False  # a bad fd: each block reports EBADF, however it is split


class WorkerPool:
    def __init__(self, max_workers: int, notify_fd: int, name: str, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive, got {idle_timeout}")
        self.max_workers = max_workers
        self.idle_timeout = idle_timeout
        self._notify_fd = notify_fd
        self._name = name
        self._jobs: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: list[tuple[Op, int]] = []
        self._state: dict[int, str] = {}  # op.id -> _QUEUED / _RUNNING / _CANCELLED_EARLY
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._numbers = itertools.count()
        self._part_ids = itertools.count(-1, -1)

    def start(self, op: Op) -> None:
        """Queue ``op`` for a worker (a batch: its parts, for several), starting workers if none is idle and the
        pool is not full."""
        if op.kind in BATCH_KINDS:
            self._start_batch(op)
        else:
            self._queue(op)

    def _start_batch(self, op: Op) -> None:
        call = BatchCall(op, stoppable=True)
        blocks_per_part = 1 if _is_direct(op.fd) else BUFFERED_BLOCKS_PER_PART
        count = call.count
        part_count = min(self.max_workers, -(-count // blocks_per_part))
        size, larger = divmod(count, part_count)
        parts, start = [], 0
        for index in range(part_count):
            length = size + (index < larger)
            parts.append(_Part(op, call, start, length, next(self._part_ids)))
            start += length
        op.backend_data = _BatchInPool(call, parts)
        for part in parts:
            self._queue(part)

    def _queue(self, job: Op | _Part) -> None:
        with self._lock:
            self._state[job.id] = _QUEUED
            # Like concurrent.futures: hand the job to an idle worker if there is one, else grow the pool.
            need_worker = self._idle == 0 and len(self._threads) < self.max_workers
            if self._idle:
                self._idle -= 1
            if need_worker:
                worker = threading.Thread(target=self._work, name=f"iokit-{self._name}-{next(self._numbers)}",
                                          daemon=True)
                self._threads.add(worker)
        if need_worker:
            worker.start()
        self._jobs.put(job)

    def cancel(self, op: Op) -> bool:
        """Stop ``op``: True if it had not started (it never will; the caller finishes it with -ECANCELED), False if a
        worker runs it (the worker is interrupted and reports the outcome)."""
        if op.kind in BATCH_KINDS:
            return self._cancel_batch(op)
        with self._lock:
            state = self._state.get(op.id)
            if state == _QUEUED:
                self._state[op.id] = _CANCELLED_EARLY
                return True
            wake_fd = op.wake_fd if state == _RUNNING else -1
        if wake_fd >= 0:
            os.eventfd_write(wake_fd, 1)
        return False

    def _cancel_batch(self, op: Op) -> bool:
        batch = op.backend_data
        with self._lock:
            not_started = [part for part in batch.parts if self._state.get(part.id) == _QUEUED]
            for part in not_started:
                self._state[part.id] = _CANCELLED_EARLY
        batch.call.cancel()
        for part in not_started:
            batch.call.settle_cancelled(part.start, part.count)
        batch.pending -= len(not_started)
        return batch.pending == 0

    def deliver(self, backend) -> None:
        """Finish, on the loop thread, the ops the workers have completed (a batch with its last part)."""
        with self._lock:
            done, self._done = self._done, []
        for job, result in done:
            if job.__class__ is _Part:
                batch = job.batch.backend_data
                batch.pending -= 1
                if batch.pending == 0:
                    backend._finish(job.batch, batch.call.outcome())
            else:
                backend._finish(job, result)

    @property
    def size(self) -> int:
        return len(self._threads)

    def shutdown(self) -> None:
        """Stop the workers (call once nothing is in flight) and wait for them."""
        with self._lock:
            workers = list(self._threads)
        for _ in workers:
            self._jobs.put(None)
        for worker in workers:
            worker.join()
        with self._lock:
            self._threads.clear()

    def _work(self) -> None:
        wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            while True:
                try:
                    op = self._jobs.get(timeout=self.idle_timeout)
                except queue.Empty:
                    if self._leave_if_idle():
                        return
                    continue  # an op was handed to this worker as it timed out: it is in the queue
                if op is None:
                    return
                is_part = op.__class__ is _Part
                with self._lock:
                    if self._state.pop(op.id) == _CANCELLED_EARLY:
                        self._idle += 1
                        continue
                    self._state[op.id] = _RUNNING
                    if not is_part:
                        op.wake_fd = wake_fd
                if is_part:
                    result = op.call.run(op.start, op.count)  # a cancel stops it through the call's stop flag
                else:
                    result = wait_then_attempt(op, wake_fd) if not op.cancel_requested else -errno.ECANCELED
                with self._lock:
                    del self._state[op.id]
                    if not is_part:
                        op.wake_fd = -1
                    self._done.append((op, result))
                    self._idle += 1
                op = None  # the loop thread owns it now: an idle worker must not keep its buffers exported
                os.eventfd_write(self._notify_fd, 1)
        finally:
            os.close(wake_fd)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _leave_if_idle(self) -> bool:
        """Return ``True`` if this idle worker may leave: no op was handed to it (``start`` takes an idle worker by
        decrementing the count under this lock, so a count of 0 means every idle worker has an op coming)."""
        with self._lock:
            if self._idle == 0:
                return False
            self._idle -= 1
            return True
