"""The task runtime: the same async program on every backend.

A task is a coroutine that suspends only through the three traps of ``_traps`` ("do this op", "park me", "let others
run"). Two drivers resume tasks:

* ``LoopDriver`` (threads, epoll, uring): one thread runs every task. Ready tasks run in turn; when none is ready the
  driver calls ``backend.wait(timeout)``, where the timeout is the nearest cancel-scope deadline, and each completed op
  wakes the task parked on it. Cancelling a parked op asks the backend to cancel it; the task wakes only when the op
  settles.
* ``ThreadDriver`` (blocking): every task is an OS thread that makes its own syscalls, thread-per-connection style.
  An op is performed inline by the calling thread; a park waits on the thread's eventfd. Cancelling writes that
  eventfd, which interrupts either wait. Each thread enforces its own deadlines (the op's ``deadline`` is the task's
  nearest scope deadline).

Events, queues, locks and scopes are written once, against ``park``/``reschedule``, and so work under both.
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
import types
from typing import Any, Awaitable, Callable

from . import _engine, _traps
from ._errors import Cancelled, check_result
from ._op import Op, OpState
from ._scopes import LOCK, CancelScope, current_task, set_current_task
from .backends import Backend, open_backend
from .backends._syscalls import drain_eventfd
from .backends._timers import poll_milliseconds

_ECANCELED = -errno.ECANCELED
_DONE = OpState.DONE


class Task(_engine.TaskBase):
    """A running coroutine. Made by ``TaskGroup.spawn``; ``await task.wait()`` for it, ``task.result()`` after.

    Its C base holds what the engine reads on every resume: ``coro``, ``_abort`` (what it is parked on) and
    ``cancel_pending`` (whether a scope covering it is cancelled)."""

    _names = itertools.count(1)
    __slots__ = ("runtime", "name", "group", "scope", "own_scope", "finished", "_result", "_exception",
                 "_resume", "wake_fd", "_done_waiters", "__weakref__")

    def __init__(self, runtime: "_Driver", coro, name: str | None, group: "TaskGroup | None") -> None:
        self.runtime = runtime
        self.coro = coro
        self.name = name or f"task-{next(self._names)}"
        self.group = group
        self.scope: CancelScope | None = None  # innermost scope the task is in
        self.own_scope = CancelScope()           # lets task.cancel() cancel just this task
        self.finished = False
        self._result: Any = None
        self._exception: BaseException | None = None
        self._abort = None  # set while parked: an abort callable, the Op, or the engine's Trap
        self._resume: tuple | None = None              # (value, exception) waiting to be delivered (thread driver)
        self.wake_fd = -1                              # thread driver: the eventfd this task's thread waits on
        self._done_waiters: list[Task] = []  # a list, not a deque: every task has one, and a deque is ~600 bytes

    def cancel(self) -> None:
        """Cancel this task alone (it raises ``Cancelled`` at its next checkpoint and finishes)."""
        self.own_scope.cancel()

    def result(self) -> Any:
        """The coroutine's return value; raises its exception. ``RuntimeError`` if it has not finished."""
        if not self.finished:
            raise RuntimeError(f"{self.name} has not finished")
        if self._exception is not None:
            raise self._exception
        return self._result

    async def wait(self) -> None:
        """Wait until the task has finished (whatever the outcome)."""
        me = current_task()
        with LOCK:
            if self.finished:
                parked = False
            else:
                self._done_waiters.append(me)
                parked = True
        if parked:
            await _traps.park(lambda: _remove(self._done_waiters, me))
        else:
            await checkpoint()

    def __repr__(self) -> str:
        return f"<Task {self.name}{' finished' if self.finished else ''}>"


def _remove(waiters: list, task: Task) -> bool:
    """Abort helper for tasks parked in a waiter queue: True (wake with Cancelled) if it was still waiting."""
    try:
        waiters.remove(task)
    except ValueError:
        return False  # already woken: its wake-up is on the way
    return True


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

    def step(self, task: Task, value: Any, exc: BaseException | None) -> tuple | None:
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

    # --- parking and cancelling ---------------------------------------------------------------------------------------

    def deliver_cancel(self, task: Task) -> None:
        """A scope covering ``task`` was cancelled (called under LOCK): interrupt what it waits on."""
        task.cancel_pending = True
        abort = task._abort
        if abort is None:
            return
        if abort.__class__ is _engine.Trap:
            # Parked in the engine: a receive or send waiting there ends at once, an accept in the kernel is
            # cancelled there; the engine wakes the task either way.
            self.engine.cancel(abort)
        elif isinstance(abort, Op):
            # Parked on an op (the loop driver stores the op, not a closure, on this hot path): ask the backend to
            # cancel it; the task wakes when the op settles.
            self.backend.cancel(abort)
        elif abort():
            task._abort = None
            self.reschedule(task, exc=Cancelled())

    def park_aborted_at_once(self, task: Task, abort: Callable[[], bool]) -> bool:
        """Register a park (under LOCK). True if the task is already cancelled and ``abort`` released it."""
        if task.scope is not None and task.scope.is_cancelled() and abort():
            return True
        task._abort = abort
        return False

    # --- signals ----------------------------------------------------------------------------------------------------

    def signal_event(self, signums: tuple[int, ...]):
        from ._sync import Event
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
        if trap.__class__ is _engine.Trap:  # a socket trap of a task stepped here, not by the engine
            self.engine.start(task, trap)
            return
        kind = trap[0]
        if kind == "io":
            op = trap[1]
            op.waiter = task
            try:
                self.backend.submit(op)
            except Exception as error:  # refused (closed backend, full ring...): the task gets the error
                op.waiter = None
                self._ready.append((task, None, error))
                return
            if op.state is _DONE:  # finished at once (epoll's first try, a file op inline): no wait() needed
                op.waiter = None
                self._ready.append((task, op, None))
                return
            task._abort = op  # see deliver_cancel
            # No look at task.scope.is_cancelled() here: perform(), which yields every io trap, looked just before,
            # and nothing ran since. A cancel from now on reaches the op through deliver_cancel.
        elif kind == "park":
            with LOCK:
                if self.park_aborted_at_once(task, trap[1]):
                    self._ready.append((task, None, Cancelled()))
        elif kind == "yield":
            self._ready.append((task, None, None))
        else:
            self._ready.append((task, None, RuntimeError(f"unknown trap {trap!r}")))

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
            self._drive(task)
        finally:
            with LOCK:
                os.close(task.wake_fd)
                task.wake_fd = -1

    def _drive(self, task: Task) -> None:
        value, exc = None, None
        while True:
            trap = self.step(task, value, exc)
            if trap is None:
                return
            kind = trap[0]
            if kind == "io":
                try:
                    value, exc = self._perform(task, trap[1]), None
                except Exception as error:  # refused by the backend: the task gets the error
                    value, exc = None, error
            elif kind == "park":
                value, exc = self._park(task, trap[1])
            elif kind == "yield":
                if task.scope.effective_deadline() <= time.monotonic():
                    with LOCK:
                        task.scope.expire_deadlines(time.monotonic())
                value, exc = None, (Cancelled() if task.scope.is_cancelled() else None)
            else:
                value, exc = None, RuntimeError(f"unknown trap {trap!r}")

    def _perform(self, task: Task, op: Op) -> Op:
        deadline = task.scope.effective_deadline()
        op.deadline = None if deadline == math.inf else deadline
        op.wake_fd = task.wake_fd

        def abort() -> bool:
            # Works before submit() has admitted the op too: the blocking wait checks the flag after every wake-up.
            op.cancel_requested = True
            os.eventfd_write(op.wake_fd, 1)
            return False

        with LOCK:
            task._abort = abort
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
        return op

    def _park(self, task: Task, abort: Callable[[], bool]) -> tuple[Any, BaseException | None]:
        with LOCK:
            if task._resume is not None:
                resume, task._resume = task._resume, None
                return resume
            if self.park_aborted_at_once(task, abort):
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


def current_time() -> float:
    """The runtime's clock: ``time.monotonic()`` seconds (deadlines use it)."""
    return time.monotonic()


@types.coroutine
def perform(op: Op) -> Any:
    """Submit ``op`` and wait for it; return its result or raise the ``OSError`` it failed with (``await perform(op)``).

    If the task is cancelled while the op is in flight, the backend is asked to cancel it and the task waits until the
    op has settled: ``Cancelled`` is raised if the cancel won; if the op finished first, its result is returned (no
    byte is thrown away) and ``Cancelled`` comes at the next checkpoint.
    """
    # A generator that yields the io trap itself, rather than an ``async def`` awaiting ``_traps.io``: every op goes
    # through here, and this saves a coroutine object and a frame per op.
    task = current_task()
    if task.cancel_pending:
        raise Cancelled()
    yield ("io", op)
    result = op.result
    if result >= 0:
        return result
    if result == _ECANCELED and (op.cancel_requested or task.cancel_pending):
        raise Cancelled()
    return check_result(result)


async def checkpoint() -> None:
    """Let other tasks run; raise ``Cancelled`` if this task has been cancelled."""
    if current_task().cancel_pending:
        raise Cancelled()
    await _traps.yield_now()


async def sleep_until(deadline: float) -> None:
    """Sleep until ``current_time()`` reaches ``deadline``."""
    with CancelScope(deadline=deadline):
        await _traps.park(lambda: True)


async def sleep(seconds: float) -> None:
    """Sleep for ``seconds`` (0 only lets the others run)."""
    if seconds <= 0:
        await checkpoint()
    else:
        await sleep_until(time.monotonic() + seconds)


async def sleep_forever() -> None:
    """Sleep until cancelled."""
    await _traps.park(lambda: True)


def signal_event(*signums: int):
    """Return an ``Event`` that is set when one of ``signums`` arrives (call from the main thread, inside ``run``).
    The previous handlers come back when ``run`` returns."""
    return _driver().signal_event(signums)


class TaskGroup:
    """Runs tasks concurrently and waits for all of them at the end of the ``async with`` block.

    If a task (or the block) raises, the others are cancelled; after all have finished, the error is raised again
    (several become a ``BaseExceptionGroup``). ``cancel_scope`` cancels the whole group.
    """

    def __init__(self) -> None:
        self.cancel_scope = CancelScope()
        self._children: set[Task] = set()
        self._errors: list[BaseException] = []
        self._parent: Task | None = None
        self._waiting = False

    async def __aenter__(self) -> "TaskGroup":
        self._parent = current_task()
        self.cancel_scope.__enter__()
        return self

    def spawn(self, fn: Callable[..., Awaitable], *args, name: str | None = None) -> Task:
        """Start ``fn(*args)`` as a new task in this group; return it."""
        if self._parent is None:
            raise RuntimeError("spawn() needs the group to be entered (async with)")
        with LOCK:
            task = self._parent.runtime.new_task(fn, args, name, self, self.cancel_scope)
            self._children.add(task)
        return task

    def _child_finished(self, task: Task, error: BaseException | None) -> None:
        # Under LOCK, from the finishing task's thread.
        self._children.discard(task)
        if error is not None and not isinstance(error, Cancelled):
            self._errors.append(error)
            self.cancel_scope.cancel()
        if self._waiting and not self._children:
            self._waiting = False
            task.runtime.reschedule(self._parent)

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, Cancelled):
            self._errors.append(exc)
            self.cancel_scope.cancel()
        while True:
            with LOCK:
                if not self._children:
                    break
                self._waiting = True
            # Not cancellable: children first (they are inside our scope, so any cancel reaches them too).
            await _traps.park(lambda: False)
        body_cancelled = exc if isinstance(exc, Cancelled) else None
        if self._errors:
            self.cancel_scope.__exit__(None, None, None)
            if len(self._errors) == 1:
                raise self._errors[0]
            raise BaseExceptionGroup("several tasks failed", self._errors)
        if body_cancelled is not None:
            return self.cancel_scope.__exit__(Cancelled, body_cancelled, tb)
        return self.cancel_scope.__exit__(None, None, None)
