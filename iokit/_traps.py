"""The only places where a task gives control to the runtime (curio calls them traps).

A task is a coroutine. It suspends by yielding one of three small tuples, and the runtime's driver resumes it with a
value or an exception:

* ``("io", op)``: submit ``op`` to the backend; resume with the finished op.
* ``("park", abort)``: sleep until someone calls ``runtime.reschedule(task, ...)``. If the task is cancelled while
  parked, the driver calls ``abort()``: True means "nothing is pending, wake me with Cancelled now"; False means
  "something is still pending (an op the kernel holds); I will be rescheduled when it settles".
* ``("yield",)``: let the others run, then continue (a checkpoint).

Everything else (sleep, events, queues, locks, streams) is built on these three.
"""

from __future__ import annotations

import types
from typing import Any, Callable

from ._op import Op


@types.coroutine
def io(op: Op) -> Any:
    return (yield ("io", op))


@types.coroutine
def park(abort: Callable[[], bool]) -> Any:
    return (yield ("park", abort))


@types.coroutine
def yield_now() -> Any:
    return (yield ("yield",))
