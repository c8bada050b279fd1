"""iokit: low-level Linux I/O primitives.

One op interface (``iokit.ops``) over four backends (blocking, threads, epoll, uring), and a small task runtime so that
the same program runs on every backend. See README.md for a tour and docs/architecture.md for how it fits together.
"""

from . import _op as ops
from ._errors import BackendClosed, BackendUnavailable, Cancelled
from .backends import Backend, BackendInfo, BackendStatistics, backends, open_backend
from .runtime import (CancelScope, Event, Lock, Queue, Task, TaskGroup, WouldBlock, checkpoint, current_backend,
                      current_task, current_time, fail_after, move_on_after, perform, run, signal_event, sleep,
                      sleep_forever, sleep_until)
from .streams import File, Listener, SocketStream, connect_tcp, open_file, open_tcp_listener
from . import protocols  # noqa: E402 - after the runtime and streams it is built on

__all__ = [
    "Backend", "BackendClosed", "BackendInfo", "BackendStatistics", "BackendUnavailable", "CancelScope", "Cancelled",
    "Event", "File", "Listener", "Lock", "Queue", "SocketStream", "Task", "TaskGroup", "WouldBlock", "backends",
    "checkpoint", "connect_tcp", "current_backend", "current_task", "current_time", "fail_after", "move_on_after",
    "open_backend", "open_file", "open_tcp_listener", "ops", "perform", "run", "signal_event", "sleep",
    "sleep_forever", "sleep_until",
]
