"""The task runtime: the same async program on every backend.

One package in layers; each module imports only those above it in this list (``tests/test_runtime_layers.py``
checks it), so there is no import cycle:

* ``traps``: the four kinds of trap a task suspends with (an ``Op``, the engine's ``Trap``, ``Park``,
  ``CHECKPOINT``) and ``dispatch``, the one place that tells them apart for every driver.
* ``context``: the runtime's one ``LOCK`` and the current task (a C thread-local of the engine).
* ``scopes``: ``CancelScope``, ``move_on_after``, ``fail_after``.
* ``waits``: ``perform``, ``checkpoint``, ``sleep``..., and parking in a queue of waiters: the waits, written once
  on the traps.
* ``tasks``: ``Task`` and ``TaskGroup``.
* ``sync``: ``Event``, ``Queue``, ``Lock``.
* ``drivers``: ``LoopDriver`` (threads, epoll, uring; the native engine under it on the last two), ``ThreadDriver``
  (blocking), and ``run``, which picks one.

See docs/architecture.md ("The runtime") for how a trap travels, and docs/engine.md for the engine's part.
"""

from .context import LOCK, current_task, set_current_task
from .drivers import LoopDriver, ThreadDriver, current_backend, run, signal_event
from .scopes import CancelScope, fail_after, move_on_after
from .sync import Event, Lock, Queue, WouldBlock
from .tasks import Task, TaskGroup
from .waits import checkpoint, current_time, perform, sleep, sleep_forever, sleep_until

__all__ = [
    "CancelScope", "Event", "LOCK", "Lock", "LoopDriver", "Queue", "Task", "TaskGroup", "ThreadDriver", "WouldBlock",
    "checkpoint", "current_backend", "current_task", "current_time", "fail_after", "move_on_after", "perform", "run",
    "set_current_task", "signal_event", "sleep", "sleep_forever", "sleep_until",
]
