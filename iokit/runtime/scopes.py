"""Cancel scopes: deadlines and cancellation, structured like trio's.

A ``CancelScope`` covers a block of code in one task and every task spawned into a task group inside it. Cancelling
it (by ``cancel()`` or because its deadline passed) makes every covered task raise ``Cancelled`` at its next
checkpoint; a task parked on an op asks the backend to cancel that op and waits until the op has settled, so no buffer
is released while the kernel may still write into it. ``Cancelled`` travels up to the scope that was cancelled, which
catches it on the way out (``cancelled_caught``).

Scopes form a tree (``_parent``, ``_children``); each scope knows the tasks whose innermost scope it is (``_tasks``).
Cancelling walks the subtree once. Every change to that tree happens under ``LOCK``: on the blocking backend tasks are
threads, so scopes are shared between threads.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from .._errors import Cancelled
from .context import LOCK, current_task

if TYPE_CHECKING:  # for annotations only: tasks sit above scopes
    from .tasks import Task

_NO_MEMBERS: frozenset = frozenset()  # a scope's children and tasks until it has any


class CancelScope:
    """A block whose tasks can be cancelled together, by ``cancel()`` or when ``deadline`` (monotonic seconds) passes.

    ``with CancelScope(deadline=...) as scope:`` — after the block, ``scope.cancelled_caught`` is True if the block was
    cut short by this scope.
    """

    # Slots: a server holding 10,000 requests holds a few scopes for each.
    __slots__ = ("_deadline", "shield", "cancel_called", "cancelled_caught", "_parent", "_children", "_tasks",
                 "_runtime", "_entered", "_exited", "__weakref__")

    def __init__(self, *, deadline: float = math.inf, shield: bool = False) -> None:
        self._deadline = deadline
        self.shield = shield  # a shielded scope is not reached by cancels of the scopes around it
        self.cancel_called = False
        self.cancelled_caught = False
        self._parent: CancelScope | None = None
        # Created on first use: most scopes never get a child scope or a task of their own, and a server holding
        # 10,000 requests has several scopes each (an empty set is 216 bytes).
        self._children: set[CancelScope] | frozenset = _NO_MEMBERS
        self._tasks: set[Task] | frozenset = _NO_MEMBERS
        self._runtime = None
        self._entered = False
        self._exited = False  # its deadline then no longer matters: the loop driver drops its timer

    # --- deadline -----------------------------------------------------------------------------------------------------

    @property
    def deadline(self) -> float:
        return self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        with LOCK:
            self._deadline = value
            if self._entered and value != math.inf:
                self._runtime.watch_deadline(self)

    # --- entering and leaving -----------------------------------------------------------------------------------------

    def __enter__(self) -> "CancelScope":
        task = current_task()
        with LOCK:
            if self._entered:
                raise RuntimeError("a CancelScope can be entered only once")
            self._entered = True
            self._runtime = task.runtime
            self._attach(task.scope)
            self._move_task(task, self)
        if self._deadline != math.inf:
            self._runtime.watch_deadline(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        task = current_task()
        with LOCK:
            if task.scope is not self:
                raise RuntimeError("cancel scopes must be exited in the reverse order of entering")
            self._move_task(task, self._parent)
            self._detach()
            self._exited = True
            if exc_type is not None and issubclass(exc_type, Cancelled) and self.cancel_called:
                # Ours, unless a scope around us is cancelled too: then it goes on up to that one.
                if self._parent is None or not self._parent.is_cancelled():
                    self.cancelled_caught = True
                    return True
        return False

    def _attach(self, parent: "CancelScope | None") -> None:
        self._parent = parent
        if parent is not None:
            if parent._children is _NO_MEMBERS:
                parent._children = set()
            parent._children.add(self)

    def _detach(self) -> None:
        parent = self._parent
        if parent is not None and parent._children:
            parent._children.discard(self)
            if not parent._children:
                parent._children = _NO_MEMBERS

    @staticmethod
    def _move_task(task: "Task", to: "CancelScope | None") -> None:
        old = task.scope
        if old is not None and old._tasks:
            old._tasks.discard(task)
            if not old._tasks:
                old._tasks = _NO_MEMBERS
        task.scope = to
        # cancel_pending is is_cancelled() of the task's innermost scope, kept up to date here and by deliver_cancel
        # (a cancel reaches exactly the tasks whose answer turns True), so the per-op check is one field read.
        task.cancel_pending = False
        if to is not None:
            if to._tasks is _NO_MEMBERS:
                to._tasks = set()
            to._tasks.add(task)
            if to.is_cancelled():
                task.runtime.deliver_cancel(task)

    # --- cancelling ----------------------------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Cancel every task in this scope (and in task groups inside it). Safe to call from any task, any time."""
        with LOCK:
            if self.cancel_called:
                return
            self.cancel_called = True
            self._deliver()

    def _deliver(self) -> None:
        for task in list(self._tasks):
            task.runtime.deliver_cancel(task)
        for child in list(self._children):
            if not child.shield:
                child._deliver()

    def is_cancelled(self) -> bool:
        """True if this scope or one around it (up to a shield) is cancelled."""
        scope: CancelScope | None = self
        while scope is not None:
            if scope.cancel_called:
                return True
            if scope.shield:
                return False
            scope = scope._parent
        return False

    def effective_deadline(self) -> float:
        """The earliest deadline of this scope and those around it (up to a shield)."""
        deadline = math.inf
        scope: CancelScope | None = self
        while scope is not None:
            deadline = min(deadline, scope._deadline)
            if scope.shield:
                break
            scope = scope._parent
        return deadline

    def expire_deadlines(self, now: float) -> None:
        """Cancel this scope and those around it whose deadline has passed (the blocking driver calls this when a
        thread wakes at its deadline; the loop driver uses a heap instead)."""
        scope: CancelScope | None = self
        while scope is not None:
            if scope._deadline <= now:
                scope.cancel()
            if scope.shield:
                break
            scope = scope._parent

    def __repr__(self) -> str:
        state = "cancelled" if self.cancel_called else "active"
        return f"<CancelScope {state} deadline={self._deadline}>"


class _TimeoutScope:
    """Shared body of ``move_on_after`` and ``fail_after``: a scope whose deadline is counted from entering it."""

    def __init__(self, seconds: float, raise_on_expiry: bool) -> None:
        if seconds != seconds:  # NaN
            raise ValueError("seconds must be a number")
        self._seconds = seconds
        self._raise = raise_on_expiry
        self.scope = CancelScope()

    def __enter__(self) -> CancelScope:
        self.scope._deadline = time.monotonic() + self._seconds
        return self.scope.__enter__()

    def __exit__(self, exc_type, exc, tb) -> bool:
        caught = self.scope.__exit__(exc_type, exc, tb)
        if caught and self._raise:
            raise TimeoutError(f"timed out after {self._seconds} s")
        return caught


def move_on_after(seconds: float) -> _TimeoutScope:
    """``with move_on_after(s) as scope:`` — cancel the block after ``s`` seconds and carry on after it
    (``scope.cancelled_caught`` tells whether it was cut short)."""
    return _TimeoutScope(seconds, raise_on_expiry=False)


def fail_after(seconds: float) -> _TimeoutScope:
    """``with fail_after(s):`` — like ``move_on_after``, but raise ``TimeoutError`` when the time runs out."""
    return _TimeoutScope(seconds, raise_on_expiry=True)
