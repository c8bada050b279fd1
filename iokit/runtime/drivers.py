"""The drivers, which resume tasks, and ``run``, which picks one.

A task suspends only through the traps of ``traps.py``, and every driver hands each trap to the one
``traps.dispatch``, which calls the driver's method for its kind. Two drivers:

* ``LoopDriver`` (threads, epoll, uring): one thread runs every task. Ready tasks run in turn; when none is ready the
  driver calls ``backend.wait(timeout)``, where the timeout is the nearest cancel-scope deadline, and each completed op
  wakes the task parked on it. Cancelling a parked op asks the backend to cancel it; the task wakes only when the op
  settles. On epoll and uring the native engine resumes the tasks and runs their socket traps in C, and hands the
  driver (``_handle``) only the traps it does not know.
* ``ThreadDriver`` (blocking): every task is an OS thread that makes its own syscalls, thread-per-connection style.
  An op is performed inline by the calling thread; a park waits on the thread's eventfd. Cancelling writes that
  eventfd, which interrupts either wait. Each thread enforces its own deadlines (the op's ``deadline`` is the task's
  nearest scope deadline).

The trap handlers (``submit_op``, ``park``, ``checkpoint``, ``start_engine_trap``) return the ``(value, exception)``
to resume the task with now, or None when the task waits to be rescheduled (only the loop driver's do that).
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import math
import os
import select
import signal
import threading
import time
from typing import Any, Awaitable, Callable

from .._errors import Cancelled
from .._op import Op, OpState
from ..backends import Backend, open_backend
from ..backends._syscalls import drain_eventfd
from ..backends._timers import poll_milliseconds
from .context import LOCK, current_task, set_current_task
from .scopes import CancelScope
from .sync import Event
from .tasks import Task
from .traps import EngineTrap, Park, dispatch

_ECANCELED = -errno.ECANCELED
_DONE = OpState.DONE
_RESUME_NOW = (None, None)  # a handler's outcome "go on at once, with nothing"


class _Driver:
    """What both drivers share: spawning, finishing, parking, cancelling."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.engine = None  # the loop driver's native engine, where the backend has one
        self.root_scope = CancelScope()
        self.root_scope._runtime = self
        self._signal_restore: list[tuple[int, Any]] = []

    # --- tasks ------------------------------------------------------------------------------------------------------

    def new_task(self, fn: Callable[..., Awaitable], args: tuple, name: str | None, group, parent_scope,
                 *, start: bool = True) -> Task:
        coro = fn(*args)
        if not hasattr(coro, "send"):
            raise TypeError(f"{getattr(fn, '__name__', fn)!r} must be an async function")
        task = Task(self, coro, name or getattr(fn, "__qualname__", None), group)
        with LOCK:
            task.own_scope._entered = True
            task.own_scope._runtime = self
            task.own_scope._attach(parent_scope)
            CancelScope._move_task(task, task.own_scope)
        if start:
            self.start_task(task)
        return task

    def step(self, task: Task, value: Any, exc: BaseException | None):
        """Run ``task`` until its next trap; return the trap, or None when the task finished."""
        set_current_task(task)
        try:
            return task.coro.throw(exc) if exc is not None else task.coro.send(value)
        except StopIteration as stop:
            self._finish_task(task, stop.value, None)
        except BaseException as error:  # noqa: BLE001 - a task's failure is reported to its group or to run()
            self._finish_task(task, None, error)
        finally:
            set_current_task(None)
        return None

    def _finish_task(self, task: Task, result: Any, error: BaseException | None) -> None:
        with LOCK:
            CancelScope._move_task(task, None)
            task.own_scope._detach()
            task.finished = True
            task._result, task._exception = result, error
            waiters = list(task._done_waiters)
            task._done_waiters.clear()
            for waiter in waiters:
                self.reschedule(waiter)
            if task.group is not None:
                task.group._child_finished(task, error)

    # --- the trap handler both drivers share (traps.dispatch calls it) -----------------------------------------------

    def start_engine_trap(self, task: Task, trap: EngineTrap) -> tuple[Any, BaseException | None] | None:
        """The engine starts it (and runs the task on if it is done at once). Without an engine, the task gets a
        RuntimeError: the Trap came from a stream made under another runtime."""
        if self.engine is None:
            return None, RuntimeError(f"{task!r} awaited {trap!r}, an operation of the native engine of another "
                                      f"runtime (a stream is used only inside the iokit.run that made it)")
        self.engine.start(task, trap)
        return None

    # --- parking and cancelling ---------------------------------------------------------------------------------------

    def deliver_cancel(self, task: Task) -> None:
        """A scope covering ``task`` was cancelled (called under LOCK): interrupt the trap it is parked on."""
        task.cancel_pending = True
        parked_on = task._abort
        if parked_on is None:
            return
        kind = parked_on.__class__
        if kind is Park:
            if parked_on.abort():
                task._abort = None
                self.reschedule(task, exc=Cancelled())
        elif kind is EngineTrap:
            # Parked in the engine: a receive or send waiting there ends at once, an accept in the kernel is
            # cancelled there; the engine wakes the task either way.
            self.engine.cancel(parked_on)
        else:  # an Op: ask for it to be cancelled; the task wakes when the op settles
            self.cancel_op(parked_on)

    def park_aborted_at_once(self, task: Task, park: Park) -> bool:
        """Register a park (under LOCK). True if the task is already cancelled and ``park.abort`` released it."""
        if task.scope is not None and task.scope.is_cancelled() and park.abort():
            return True
        task._abort = park
        return False

    # --- signals ----------------------------------------------------------------------------------------------------

    def signal_event(self, signums: tuple[int, ...]) -> Event:
        event = Event()

        def handler(signum, frame):
            self.call_soon_threadsafe(event.set)

        for signum in signums:
            self._signal_restore.append((signum, signal.signal(signum, handler)))
        return event

    def restore_signals(self) -> None:
        while self._signal_restore:
            signum, previous = self._signal_restore.pop()
            signal.signal(signum, previous)

    # --- for subclasses ---------------------------------------------------------------------------------------------

    def submit_op(self, task: Task, op: Op) -> tuple[Any, BaseException | None] | None:
        raise NotImplementedError

    def park(self, task: Task, park: Park) -> tuple[Any, BaseException | None] | None:
        raise NotImplementedError

    def checkpoint(self, task: Task) -> tuple[Any, BaseException | None] | None:
        raise NotImplementedError

    def cancel_op(self, op: Op) -> None:
        raise NotImplementedError

    def start_task(self, task: Task) -> None:
        raise NotImplementedError

    def reschedule(self, task: Task, value: Any = None, exc: BaseException | None = None) -> None:
        raise NotImplementedError

    def call_soon_threadsafe(self, fn: Callable[[], Any]) -> None:
        raise NotImplementedError

    def watch_deadline(self, scope: CancelScope) -> None:
        raise NotImplementedError


class LoopDriver(_Driver):
    """One thread, many tasks: the driver for backends with completions (threads, epoll, uring)."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self._ready: collections.deque[tuple[Task, Any, BaseException | None]] = collections.deque()
        # The native engine, on the backends that have one (epoll, uring): it runs tasks and their socket traps in C.
        self.engine = backend.attach_engine(self)
        self._deadlines: list[tuple[float, int, CancelScope]] = []
        self._compact_deadlines_at = _MIN_DEADLINES_TO_COMPACT
        self._seq = itertools.count()
        self._callbacks: collections.deque[Callable[[], Any]] = collections.deque()

    def start_task(self, task: Task) -> None:
        self._ready.append((task, None, None))

    def reschedule(self, task: Task, value: Any = None, exc: BaseException | None = None) -> None:
        task._abort = None
        self._ready.append((task, value, exc))

    def call_soon_threadsafe(self, fn: Callable[[], Any]) -> None:
        self._callbacks.append(fn)
        self.backend.wakeup()

    def watch_deadline(self, scope: CancelScope) -> None:
        heap = self._deadlines
        heapq.heappush(heap, (scope.deadline, next(self._seq), scope))
        if len(heap) > self._compact_deadlines_at:
            # Most scopes end long before their deadline (a request answered well within its timeout), and their
            # entries would otherwise stay until the deadline comes round: at 10k requests/s with a 60 s timeout,
            # 600k dead entries. Dropping them once the heap has doubled keeps it near its live size, at O(1) each.
            heap[:] = [entry for entry in heap if not _stale(entry)]
            heapq.heapify(heap)
            self._compact_deadlines_at = max(_MIN_DEADLINES_TO_COMPACT, 2 * len(heap))

    def run(self, main: Task) -> None:
        ready, backend = self._ready, self.backend
        resume = self.engine.resume if self.engine is not None else None
        while not main.finished:
            # Only the tasks ready now: a task that re-queues itself (a checkpoint loop) waits for the next round, so
            # I/O and deadlines are looked at between rounds and nobody starves.
            for _ in range(len(ready)):
                task, value, exc = ready.popleft()
                if resume is not None:
                    resume(task, value, exc)  # runs it through every trap that finishes at once; hands us the rest
                    continue
                trap = self.step(task, value, exc)
                if trap is not None:
                    self._handle(task, trap)
            if main.finished:
                break
            for op in backend.wait(0 if ready or self._callbacks else self._next_timeout()):
                waiter = op.waiter
                if waiter is not None:  # reschedule(waiter, op), inlined: once per completed op
                    op.waiter = None
                    waiter._abort = None
                    ready.append((waiter, op, None))
            self._expire_deadlines()
            while self._callbacks:
                self._callbacks.popleft()()

    def _handle(self, task: Task, trap) -> None:
        """Take the trap ``task`` yielded (stepped here, or by the engine, which calls this for the traps it does not
        know): a task with an outcome already goes back on the ready queue."""
        outcome = dispatch(self, task, trap)
        if outcome is not None:
            self._ready.append((task, outcome[0], outcome[1]))

    def submit_op(self, task: Task, op: Op) -> tuple[Any, BaseException | None] | None:
        op.waiter = task
        try:
            self.backend.submit(op)
        except Exception as error:  # refused (closed backend, full ring...): the task gets the error
            op.waiter = None
            return None, error
        if op.state is _DONE:  # finished at once (epoll's first try, a file op inline): no wait() needed
            op.waiter = None
            return op, None
        task._abort = op  # see deliver_cancel
        # No look at task.scope.is_cancelled() here: perform(), which yields every op, looked just before, and
        # nothing ran since. A cancel from now on reaches the op through deliver_cancel.
        return None

    def cancel_op(self, op: Op) -> None:
        self.backend.cancel(op)

    def park(self, task: Task, park: Park) -> tuple[Any, BaseException | None] | None:
        with LOCK:
            if self.park_aborted_at_once(task, park):
                return None, Cancelled()
        return None

    def checkpoint(self, task: Task) -> tuple[Any, BaseException | None]:
        return _RESUME_NOW  # behind the tasks ready now: see run()

    def _next_timeout(self) -> float | None:
        heap = self._deadlines
        while heap and _stale(heap[0]):
            heapq.heappop(heap)
        if not heap:
            return None
        return max(0.0, heap[0][0] - time.monotonic())

    def _expire_deadlines(self) -> None:
        heap = self._deadlines
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if not _stale(entry):
                entry[2].cancel()


def _stale(entry: tuple[float, int, CancelScope]) -> bool:
    """A deadline entry that needs no timer: its scope was cancelled already, has ended, or its deadline moved."""
    scope = entry[2]
    return scope.cancel_called or scope._exited or scope.deadline != entry[0]


_MIN_DEADLINES_TO_COMPACT = 1024


class ThreadDriver(_Driver):
    """Every task is an OS thread that makes its own syscalls: the driver for the blocking backend."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self._threads: set[threading.Thread] = set()

    def start_task(self, task: Task) -> None:
        thread = threading.Thread(target=self._run_task, args=(task,), name=f"iokit-{task.name}", daemon=True)
        with LOCK:
            self._threads.add(thread)
        thread.start()

    def _run_task(self, task: Task) -> None:
        try:
            self.run(task)
        finally:
            with LOCK:
                self._threads.discard(threading.current_thread())

    def reschedule(self, task: Task, value: Any = None, exc: BaseException | None = None) -> None:
        with LOCK:  # held while writing: the task's thread closes its eventfd under LOCK when it ends
            task._abort = None
            task._resume = (value, exc)
            if task.wake_fd >= 0:
                os.eventfd_write(task.wake_fd, 1)

    def call_soon_threadsafe(self, fn: Callable[[], Any]) -> None:
        # Called from signal handlers: run fn on a fresh thread so it never needs a lock this thread may hold.
        threading.Thread(target=fn, daemon=True).start()

    def watch_deadline(self, scope: CancelScope) -> None:
        pass  # each thread checks its own deadlines when it waits

    def run(self, task: Task) -> None:
        # The task's own eventfd (not the backend's): it must outlive a backend closed under a running program.
        task.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            value, exc = None, None
            while (trap := self.step(task, value, exc)) is not None:
                value, exc = dispatch(self, task, trap)  # this driver's handlers wait here: they always have one
        finally:
            with LOCK:
                os.close(task.wake_fd)
                task.wake_fd = -1

    def submit_op(self, task: Task, op: Op) -> tuple[Any, BaseException | None]:
        deadline = task.scope.effective_deadline()
        op.deadline = None if deadline == math.inf else deadline
        op.wake_fd = task.wake_fd
        try:
            with LOCK:
                task._abort = op  # see cancel_op
                if task.scope.is_cancelled():
                    op.cancel_requested = True
            backend = self.backend
            try:
                backend.submit(op)
            finally:
                with LOCK:
                    task._abort = None
            backend.wait(0)  # collect it from this thread's completed list
            if op.result == _ECANCELED and op.deadline is not None and time.monotonic() >= op.deadline:
                task.scope.expire_deadlines(time.monotonic())
        except Exception as error:  # refused by the backend: the task gets the error
            return None, error
        return op, None

    def cancel_op(self, op: Op) -> None:
        # Not backend.cancel(): that asks only for an op in flight, and this one may not be admitted yet. The flag
        # is read by the blocking wait after every wake-up, before and after admission (and the fault wrapper's
        # attempts read the caller's op's flag).
        op.cancel_requested = True
        os.eventfd_write(op.wake_fd, 1)

    def park(self, task: Task, park: Park) -> tuple[Any, BaseException | None]:
        with LOCK:
            if task._resume is not None:
                resume, task._resume = task._resume, None
                return resume
            if self.park_aborted_at_once(task, park):
                return None, Cancelled()
        poller = select.poll()
        poller.register(task.wake_fd, select.POLLIN)
        while True:
            deadline = task.scope.effective_deadline()
            timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
            if poller.poll(poll_milliseconds(timeout)):
                drain_eventfd(task.wake_fd)
            with LOCK:
                if task._resume is None and deadline != math.inf and time.monotonic() >= deadline:
                    task.scope.expire_deadlines(time.monotonic())  # may resume this task with Cancelled
                if task._resume is not None:
                    resume, task._resume = task._resume, None
                    return resume

    def checkpoint(self, task: Task) -> tuple[Any, BaseException | None]:
        if task.scope.effective_deadline() <= time.monotonic():
            with LOCK:
                task.scope.expire_deadlines(time.monotonic())
        return None, (Cancelled() if task.scope.is_cancelled() else None)


# --- the public API ---------------------------------------------------------------------------------------------------

def _driver() -> _Driver:
    return current_task().runtime


def run(main: Callable[..., Awaitable], *args, backend: str | Backend = "auto", **backend_options) -> Any:
    """Run ``await main(*args)`` on a new runtime over ``backend`` (a name, or a Backend you made and still own),
    and return its result (or raise its exception). Every task it spawned has finished when ``run`` returns."""
    owned = not isinstance(backend, Backend)
    be = open_backend(backend, **backend_options) if owned else backend
    driver = ThreadDriver(be) if be.task_per_thread else LoopDriver(be)
    try:
        # The blocking driver runs main on this very thread (not a new one), so that signals reach it as usual.
        main_task = driver.new_task(main, args, "main", None, driver.root_scope, start=False)
        if not be.task_per_thread:
            driver.start_task(main_task)
        driver.run(main_task)
        return main_task.result()
    finally:
        driver.restore_signals()
        # The engine first: its requests end before the backend (and its ring) may close, and dropping it breaks
        # the cycle between it and the driver it calls back.
        be.detach_engine()
        driver.engine = None
        if owned:
            be.close()


def current_backend() -> Backend:
    """The backend the current task's runtime runs on."""
    return _driver().backend


def signal_event(*signums: int) -> Event:
    """Return an ``Event`` that is set when one of ``signums`` arrives (call from the main thread, inside ``run``).
    The previous handlers come back when ``run`` returns."""
    return _driver().signal_event(signums)
