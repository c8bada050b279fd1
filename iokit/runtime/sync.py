"""Event, Queue and Lock for tasks, built on the park trap and the driver's reschedule, so valid under both drivers.

Each keeps FIFO queues of parked tasks. All state changes happen under the runtime's ``LOCK``: on the blocking
backend the tasks are threads. A parked task that is cancelled leaves its queue (its abort function removes it); if
it was already woken, the wake-up wins and the cancel is seen at its next checkpoint.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

from .context import LOCK, current_task
from .tasks import Task
from .waits import checkpoint, wait_in

T = TypeVar("T")


class WouldBlock(Exception):
    """``put_nowait`` on a full queue, ``get_nowait`` on an empty one."""


class Event:
    """A flag tasks can wait for. Once set it stays set (until ``clear``)."""

    # A list, not a deque: a server keeps several Events per connection (a deque is ~600 bytes, an empty list 56).
    __slots__ = ("_flag", "_waiters")

    def __init__(self) -> None:
        self._flag = False
        self._waiters: list[Task] = []

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        """Set the flag and wake every waiting task. Safe to call from any task (and, under the blocking backend,
        from any thread)."""
        with LOCK:
            self._flag = True
            woken = self._waiters[:]
            self._waiters.clear()  # the same list: a cancel after this must find its task gone (wait_in)
            for task in woken:
                task.runtime.reschedule(task)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> None:
        """Return once the flag is set (at once if it already is, after a checkpoint)."""
        task = current_task()
        with LOCK:
            if not self._flag:
                self._waiters.append(task)
                parked = True
            else:
                parked = False
        if parked:
            await wait_in(self._waiters, task)
        else:
            await checkpoint()


class Queue(Generic[T]):
    """A bounded FIFO queue between tasks: ``put`` waits while it is full, ``get`` while it is empty."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: collections.deque[T] = collections.deque()
        self._getters: collections.deque[Task] = collections.deque()
        self._putters: collections.deque[Task] = collections.deque()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    def put_nowait(self, item: T) -> None:
        """Add ``item``; raise ``WouldBlock`` if the queue is full."""
        with LOCK:
            if len(self._items) >= self.maxsize:
                raise WouldBlock("queue is full")
            self._items.append(item)
            self._wake_one(self._getters)

    def get_nowait(self) -> T:
        """Remove and return the oldest item; raise ``WouldBlock`` if the queue is empty."""
        with LOCK:
            if not self._items:
                raise WouldBlock("queue is empty")
            item = self._items.popleft()
            self._wake_one(self._putters)
            return item

    async def put(self, item: T) -> None:
        """Add ``item``, waiting while the queue is full."""
        task = current_task()
        await checkpoint()  # before, not after: once the item is in, a Cancelled must not say it is not
        while True:
            with LOCK:
                if len(self._items) < self.maxsize:
                    self._items.append(item)
                    self._wake_one(self._getters)
                    return
                self._putters.append(task)
            await wait_in(self._putters, task)

    async def get(self) -> T:
        """Remove and return the oldest item, waiting while the queue is empty."""
        task = current_task()
        while True:
            with LOCK:
                if self._items:
                    item = self._items.popleft()
                    self._wake_one(self._putters)
                    break
                self._getters.append(task)
            await wait_in(self._getters, task)
        return item

    @staticmethod
    def _wake_one(waiters: collections.deque[Task]) -> None:
        if waiters:
            task = waiters.popleft()
            task.runtime.reschedule(task)


class Lock:
    """A mutual-exclusion lock for tasks (``async with lock:``). Not re-entrant; handed over in FIFO order."""

    def __init__(self) -> None:
        self._owner: Task | None = None
        self._waiters: collections.deque[Task] = collections.deque()

    def locked(self) -> bool:
        return self._owner is not None

    async def acquire(self) -> None:
        task = current_task()
        await checkpoint()  # before taking it: a Cancelled after would leave the lock held by nobody's ``with``
        with LOCK:
            if self._owner is task:
                raise RuntimeError("Lock is not re-entrant: this task already holds it")
            if self._owner is None:
                self._owner = task
                parked = False
            else:
                self._waiters.append(task)
                parked = True
        if parked:
            await wait_in(self._waiters, task)  # release() hands the lock to us before waking us

    def release(self) -> None:
        with LOCK:
            if self._owner is not current_task():
                raise RuntimeError("release() by a task that does not hold the lock")
            if self._waiters:
                self._owner = self._waiters.popleft()
                self._owner.runtime.reschedule(self._owner)
            else:
                self._owner = None

    async def __aenter__(self) -> "Lock":
        await self.acquire()
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.release()
