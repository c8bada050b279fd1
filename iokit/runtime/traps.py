"""The traps: the only things a task hands the runtime when it suspends (curio's word), and their one dispatch.

A task is a coroutine. It suspends by yielding a trap, an object whose class says what the task asks for, and its
driver resumes it with a value or an exception. There are four kinds:

* an ``Op`` (``perform`` yields the op itself, so an I/O costs no trap object): submit it to the backend; resume with
  the finished op. Cancelling asks for the op to be cancelled; the task wakes only when the op has settled.
* an engine ``Trap`` (``iokit._engine.Trap``, on epoll and uring: a stream's receive, send, accept, close): an
  awaitable the native engine starts, finishes and resumes its task from, all in C. It reaches a Python driver only
  from a coroutine stepped by hand (the HTTP core runs a handler at once and hands its first trap to the driver),
  and goes to ``engine.start``; where there is no engine, it came from a stream made under another runtime, and its
  task gets a ``RuntimeError``.
* a ``Park``: sleep until someone calls ``driver.reschedule(task, ...)``. If the task is cancelled while parked, the
  driver calls ``park.abort()``: True means "nothing is pending, wake me with Cancelled now"; False means "something
  is still pending (an op the kernel holds, children to wait for); I will be rescheduled when it settles".
* ``CHECKPOINT``, the one ``Checkpoint``: let the others run, then go on.

``dispatch`` is the one place where the kinds are told apart: every driver hands it the trap its task yielded, and it
calls the driver's method for that kind. While a task is parked, ``task._abort`` holds the trap it is parked on
(the engine sets it for its own Traps), and ``deliver_cancel`` tells those apart by the same classes.
"""

from __future__ import annotations

import types
from typing import Any, Callable

from .. import _engine
from .._errors import Cancelled
from .._op import Op

EngineTrap = _engine.Trap
_engine.configure(Cancelled)  # what an engine Trap raises when its task is cancelled


class Park:
    """Sleep until rescheduled; ``abort()`` says what a cancel may do meanwhile (see the module's docstring)."""

    __slots__ = ("abort",)

    def __init__(self, abort: Callable[[], bool]) -> None:
        self.abort = abort

    def __repr__(self) -> str:
        return f"<Park abort={self.abort!r}>"


class Checkpoint:
    """Let the other tasks run, then continue. There is one: ``CHECKPOINT``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<Checkpoint>"


CHECKPOINT = Checkpoint()


@types.coroutine
def park(abort: Callable[[], bool]) -> Any:
    return (yield Park(abort))


@types.coroutine
def yield_now() -> Any:
    return (yield CHECKPOINT)


def dispatch(driver, task, trap) -> tuple[Any, BaseException | None] | None:
    """Hand ``trap``, which ``task`` just yielded, to ``driver``'s method for its kind; return what that returns:
    the ``(value, exception)`` to resume the task with now, or None when the task waits to be rescheduled.

    Every driver has the four methods ``submit_op``, ``park``, ``checkpoint`` and ``start_engine_trap`` (see
    ``drivers._Driver``). The loop driver's may return None; the thread driver's wait where they are, and never do.
    """
    kind = trap.__class__
    if kind is Op:  # the most frequent first: the exact classes are one pointer comparison each
        return driver.submit_op(task, trap)
    if kind is Park:
        return driver.park(task, trap)
    if kind is Checkpoint:
        return driver.checkpoint(task)
    if isinstance(trap, Op):  # a subclass of Op (uring's MultishotOp, the fault wrapper's attempts)
        return driver.submit_op(task, trap)
    if kind is EngineTrap:
        return driver.start_engine_trap(task, trap)
    return None, RuntimeError(f"{task!r} yielded {trap!r}, which is not an iokit trap "
                              f"(an awaitable of another event loop?)")
