"""The ``blocking`` backend: the calling thread makes the syscall itself and waits for it. ``submit`` returns when the
op is done; ``wait`` then hands it back. Under the runtime, every task is an OS thread: the classic
thread-per-connection server.

One refinement keeps it cancellable: sockets are non-blocking, so a socket op that cannot progress is not left stuck
inside recv(2). The thread instead waits in poll(2) on the socket *and* on its own eventfd; ``cancel`` (or the runtime,
to cancel a task) writes that eventfd, and the op ends with ``-ECANCELED``. To the caller it is still one blocking
call. Regular-file ops are plain pread/pwrite/fsync: the kernel never reports a file "not ready".

Several threads share one backend, so the in-flight table is guarded by a lock, and each thread sees only its own
completions in ``wait()``.
"""

from __future__ import annotations

import os
import select
import threading
import weakref

from .._op import Op, OpKind
from ._base import Backend
from ._syscalls import EAGAIN, attempt, drain_eventfd, wait_then_attempt, wait_then_retry
from ._timers import poll_milliseconds


class _ThreadState:
    """Per-thread: its completed ops, and the eventfd that interrupts this thread's waits. The eventfd is made on
    first use (the runtime brings its own per task) and closed when the thread ends (its thread-local state dies) or
    when the backend closes, whichever comes first."""

    def __init__(self) -> None:
        self.completed: list[Op] = []
        self.close: weakref.finalize | None = None
        self._fd = -1
        self._poller: select.poll | None = None

    @property
    def wake_fd(self) -> int:
        if self.close is None:
            self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.close = weakref.finalize(self, os.close, self._fd)
        return self._fd if self.close.alive else -1

    @property
    def poller(self) -> select.poll:
        """A poll set holding this thread's eventfd, made once (a wait is on every op's path)."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.wake_fd, select.POLLIN)
        return self._poller


class BlockingBackend(Backend):
    name = "blocking"
    task_per_thread = True

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the in-flight table
        self._states_lock = threading.Lock()  # the set of thread states (taken under self._lock too: never the reverse)
        self._local = threading.local()
        self._states: weakref.WeakSet[_ThreadState] = weakref.WeakSet()
        super().__init__()

    # Each thread has its own completed list; the base class's wait()/close() use it through this property.
    @property
    def _completed(self) -> list[Op]:
        return self._thread_state().completed

    @_completed.setter
    def _completed(self, value: list[Op]) -> None:
        self._thread_state().completed = value

    def thread_wake_fd(self) -> int:
        """The calling thread's eventfd: writing it interrupts whatever this thread waits on in this backend."""
        return self._thread_state().wake_fd

    def _thread_state(self) -> _ThreadState:
        try:
            return self._local.state
        except AttributeError:
            state = self._local.state = _ThreadState()
            with self._states_lock:
                self._states.add(state)
            return state

    def _admit(self, op: Op) -> None:
        with self._lock:
            super()._admit(op)

    def _start(self, op: Op) -> None:
        # Try first: a file op or a ready socket is done without the thread's eventfd ever being looked up.
        result = attempt(op) if op.kind is not OpKind.TIMEOUT else EAGAIN
        if result == EAGAIN:
            if op.wake_fd < 0:
                op.wake_fd = self.thread_wake_fd()
            result = (wait_then_retry(op, op.wake_fd) if op.kind is not OpKind.TIMEOUT
                      else wait_then_attempt(op, op.wake_fd))
        with self._lock:
            self._finish(op, result)

    def _request_cancel(self, op: Op) -> None:
        if op.wake_fd >= 0:
            os.eventfd_write(op.wake_fd, 1)

    def _wait_for_events(self, timeout: float | None) -> None:
        # Ops finish inside submit(), so there is nothing to wait for but a wakeup() (or, in close(), other threads).
        # Not waiting at all needs no syscall: a wakeup() left in the eventfd only makes the next real wait return.
        if timeout is not None and timeout <= 0:
            return
        state = self._thread_state()
        if state.poller.poll(poll_milliseconds(timeout)):
            drain_eventfd(state.wake_fd)

    def wakeup(self) -> None:
        with self._states_lock:
            states = list(self._states)  # strong references: no eventfd is closed while we write to it
        for state in states:
            if state.close is not None and state.close.alive:
                os.eventfd_write(state.wake_fd, 1)

    def _release(self) -> None:
        with self._states_lock:
            states = list(self._states)
        for state in states:
            if state.close is not None:
                state.close()
