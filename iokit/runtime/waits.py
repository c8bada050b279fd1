"""The ways a task waits, written once on the traps: an op (``perform``), a checkpoint, a sleep, a place in a queue
of waiters. They hold under both drivers, because a driver only ever sees the traps they yield.
"""

from __future__ import annotations

import errno
import time
import types
from typing import Any

from .._errors import Cancelled, check_result
from .._op import Op
from .context import current_task
from .scopes import CancelScope
from .traps import park, yield_now

_ECANCELED = -errno.ECANCELED


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
    # A generator that yields the op itself (an op is its own trap), rather than an ``async def``: every op goes
    # through here, and this saves a coroutine object, a frame and a trap object per op.
    task = current_task()
    if task.cancel_pending:
        raise Cancelled()
    yield op
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
    await yield_now()


def _nothing_pending() -> bool:
    return True  # a sleeper holds nothing: a cancel wakes it at once


async def sleep_until(deadline: float) -> None:
    """Sleep until ``current_time()`` reaches ``deadline``."""
    with CancelScope(deadline=deadline):
        await park(_nothing_pending)


async def sleep(seconds: float) -> None:
    """Sleep for ``seconds`` (0 only lets the others run)."""
    if seconds <= 0:
        await checkpoint()
    else:
        await sleep_until(time.monotonic() + seconds)


async def sleep_forever() -> None:
    """Sleep until cancelled."""
    await park(_nothing_pending)


async def wait_in(waiters, task) -> Any:
    """Park ``task``, which the caller has just appended to ``waiters`` (a list or deque) under LOCK, until whoever
    takes it out of ``waiters`` reschedules it. A cancel takes it out itself and wakes it with ``Cancelled``; if it was
    taken out already, its wake-up is on the way and the cancel is seen at its next checkpoint."""

    def leave() -> bool:
        try:
            waiters.remove(task)
        except ValueError:
            return False  # already woken: its wake-up is on the way
        return True

    return await park(leave)
