"""Tasks and task groups: a task is a coroutine the runtime drives, a group runs tasks and waits for all of them.

A ``Task`` is what a driver resumes (its C base, ``_engine.TaskBase``, holds what the engine reads on every resume)
and what scopes cancel. ``TaskGroup`` is trio's nursery: its ``cancel_scope`` covers every child, the first error
cancels the others, and the block ends only after all have finished.
"""

from __future__ import annotations

import itertools
from typing import Any, Awaitable, Callable

from .. import _engine
from .._errors import Cancelled
from .context import LOCK, current_task
from .scopes import CancelScope
from .traps import park
from .waits import checkpoint, wait_in


class Task(_engine.TaskBase):
    """A running coroutine. Made by ``TaskGroup.spawn``; ``await task.wait()`` for it, ``task.result()`` after.

    Its C base holds what the engine reads on every resume: ``coro``, ``_abort`` (what it is parked on) and
    ``cancel_pending`` (whether a scope covering it is cancelled)."""

    _names = itertools.count(1)
    __slots__ = ("runtime", "name", "group", "scope", "own_scope", "finished", "_result", "_exception",
                 "_resume", "wake_fd", "_done_waiters", "__weakref__")

    def __init__(self, runtime, coro, name: str | None, group: "TaskGroup | None") -> None:
        # runtime: the driver that runs it (drivers.py, above this module)
        self.runtime = runtime
        self.coro = coro
        self.name = name or f"task-{next(self._names)}"
        self.group = group
        self.scope: CancelScope | None = None  # innermost scope the task is in
        self.own_scope = CancelScope()           # lets task.cancel() cancel just this task
        self.finished = False
        self._result: Any = None
        self._exception: BaseException | None = None
        self._abort = None  # set while parked: the trap it is parked on (a Park, an Op, or the engine's Trap)
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
            await wait_in(self._done_waiters, me)
        else:
            await checkpoint()

    def __repr__(self) -> str:
        return f"<Task {self.name}{' finished' if self.finished else ''}>"


def _children_first() -> bool:
    return False  # the park of TaskGroup.__aexit__ is not cancellable (see there)


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
            await park(_children_first)
        body_cancelled = exc if isinstance(exc, Cancelled) else None
        if self._errors:
            self.cancel_scope.__exit__(None, None, None)
            if len(self._errors) == 1:
                raise self._errors[0]
            raise BaseExceptionGroup("several tasks failed", self._errors)
        if body_cancelled is not None:
            return self.cancel_scope.__exit__(Cancelled, body_cancelled, tb)
        return self.cancel_scope.__exit__(None, None, None)
