"""What every part of the runtime shares: the one lock, and which task is running.

``LOCK`` guards the runtime's shared state (scopes, parked tasks, events, queues, locks). It is re-entrant because a
cancel delivered under it may wake tasks, which takes it again; it is uncontended on the loop backends, and it is
needed on the blocking one, where tasks are threads.

The task running on this thread lives in the native engine (a C thread-local), because the engine resumes tasks
itself; the Python drivers set it around each step. ``current_task()`` raises ``RuntimeError`` outside ``iokit.run()``.
"""

from __future__ import annotations

import threading

from .. import _engine

LOCK = threading.RLock()

current_task = _engine.current_task
set_current_task = _engine.set_current_task
