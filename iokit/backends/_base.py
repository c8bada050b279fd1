"""The Backend interface every I/O model implements, and the in-flight table they all share.

A backend takes ops (``submit``), reports them back once finished (``wait``), and can be asked to give one up
(``cancel``). It is usable on its own from plain synchronous code::

    with iokit.open_backend("uring") as backend:
        ops = [iokit.ops.read_at(fd, bytearray(4096), i * 4096) for i in range(64)]
        backend.submit_many(ops)
        done = []
        while len(done) < 64:
            done += backend.wait()

The rules all four backends keep:

* **The in-flight table owns an op until its final completion.** ``submit`` puts the op in ``self._in_flight`` under a
  fresh integer id (the io_uring ``user_data``); only ``_finish`` removes it. So the op, and through it the buffer the
  kernel or a worker may still write into, stays alive even when the caller has lost interest. ``statistics()`` shows
  the table's size, and the tests assert it returns to zero.
* **Cancel is a request, not a completion.** ``cancel(op)`` asks; the op still completes through ``wait()``: with
  ``-ECANCELED`` if the cancel won, or with its real result if the op finished first (bytes received are never thrown
  away). One exception: an op that produces an fd (accept, open) and completes after its cancel was asked for has its fd
  closed and reports ``-ECANCELED``, since nobody will take that fd.
* **Per-op deadline.** If ``op.deadline`` (absolute ``time.monotonic()``) is set, the backend cancels the op by itself
  when it passes (io_uring: a linked timeout).
* **close()** cancels everything in flight and drains until the table is empty, then releases its resources.
"""

from __future__ import annotations

import abc
import dataclasses
import errno
import itertools
import os
from typing import Iterable

from .._errors import BackendClosed
from .._kinds import FD_RESULT_KINDS
from .._op import Op, OpState

ECANCELED = -errno.ECANCELED
_NEW, _IN_FLIGHT, _DONE = OpState.NEW, OpState.IN_FLIGHT, OpState.DONE


@dataclasses.dataclass
class BackendStatistics:
    """A snapshot of a backend's counters."""

    backend: str
    in_flight: int        # ops submitted and not yet completed (the in-flight table's size)
    submitted: int        # ops ever submitted
    completed: int        # ops ever completed (including cancelled ones)
    syscalls: int | None  # syscalls made for I/O where the backend counts them (None where it cannot tell)
    extra: dict = dataclasses.field(default_factory=dict)  # backend-specific counters


class Backend(abc.ABC):
    """Base class of the four I/O models. Subclasses implement ``_start``, ``_request_cancel``, ``_wait_for_events``,
    ``wakeup`` and ``_release``; the table, the counters and the cancel/close protocol live here, once."""

    #: The backend's name as used by ``open_backend`` and ``--backend``.
    name = "base"
    #: True when a task of the runtime is an OS thread that makes its syscalls itself (the blocking model).
    task_per_thread = False
    #: Why this backend was picked (set by ``open_backend``).
    chosen_because = ""

    def __init__(self) -> None:
        self._in_flight: dict[int, Op] = {}
        self._ids = itertools.count(1)
        self._completed: list[Op] = []
        self._completed_count = 0
        self._syscalls: int | None = None  # backends that can count their syscalls set this to 0 and count
        self._closed = False

    # --- public interface -----------------------------------------------------------------------------------------

    def submit(self, op: Op) -> None:
        """Start ``op``. It completes later through ``wait()`` (the blocking backend performs it before returning).

        Raises ``ValueError`` if the op was already submitted, ``BackendClosed`` after ``close()``.
        """
        self._admit(op)
        self._start(op)

    def submit_many(self, ops: Iterable[Op]) -> None:
        """Start many ops at once. The uring backend prepares and submits them in one C call."""
        for op in ops:
            self.submit(op)

    def cancel(self, op: Op) -> None:
        """Ask for ``op`` to be cancelled. It still completes through ``wait()``, with ``-ECANCELED`` or, if it
        finished first, its real result. Cancelling an op that is not in flight does nothing."""
        if op.state is not OpState.IN_FLIGHT or op.cancel_requested:
            return
        op.cancel_requested = True
        self._request_cancel(op)

    def attach_engine(self, driver):
        """Give ``driver`` (the runtime's loop driver) the native engine over this backend, for its tasks' socket
        ops, or None where this backend has none (blocking, threads). One engine at a time; the runtime detaches it
        when it ends."""
        return None

    def detach_engine(self) -> None:
        """End the attached engine's requests and forget it (nothing happens without one)."""

    def forget(self, fd: int) -> None:
        """Drop whatever this backend keeps about ``fd``, which was closed outside it (by the engine, or by the
        caller), so that a new file given the same number starts clean. Only epoll keeps anything per fd."""

    def wait(self, timeout: float | None = None) -> list[Op]:
        """Return the ops completed since the last call, waiting up to ``timeout`` seconds (None: until at least one
        completes or ``wakeup()`` is called; 0: do not wait). May return an empty list. After ``close()`` it returns
        the ops that the close drained, then nothing, without waiting."""
        if not self._closed:
            # Poll even when completions are already waiting (then without blocking): ops that finished inside
            # submit() must not keep the ones waiting on the kernel from being looked at. That starved connections.
            must_not_block = self._completed or (timeout is not None and timeout <= 0)
            self._wait_for_events(0 if must_not_block else timeout)
        done, self._completed = self._completed, []
        return done

    @abc.abstractmethod
    def wakeup(self) -> None:
        """Make a ``wait()`` running in another thread return soon. Safe to call from any thread."""

    def close(self) -> None:
        """Cancel every op in flight, wait for each to settle, then release the backend's resources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.detach_engine()
            for op in list(self._in_flight.values()):
                if not op.cancel_requested:
                    op.cancel_requested = True
                    self._request_cancel(op)
            while self._in_flight:
                self._wait_for_events(0.1)
            # The drained ops stay in self._completed: a last wait() hands them to whoever waits on them.
        finally:
            self._release()

    def statistics(self) -> BackendStatistics:
        # Every op submitted is in the table or has completed: no counter to keep on the submit path.
        in_flight = len(self._in_flight)
        return BackendStatistics(self.name, in_flight, in_flight + self._completed_count, self._completed_count,
                                 self._syscalls, self._extra_statistics())

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} in_flight={len(self._in_flight)}{' closed' if self._closed else ''}>"

    # --- for subclasses ---------------------------------------------------------------------------------------------

    def _admit(self, op: Op) -> None:
        """Put ``op`` in the in-flight table under a new id."""
        if self._closed:
            raise BackendClosed(f"{self.name} backend is closed")
        if op.state is not _NEW:
            raise ValueError(f"{op!r} was already submitted; an op is used once")
        op.id = op_id = next(self._ids)
        op.state = _IN_FLIGHT
        self._in_flight[op_id] = op

    def _finish(self, op: Op, result: int) -> None:
        """The op's final completion: record the result, leave the table, queue it for ``wait()``."""
        if op.cancel_requested and result >= 0 and op.kind in FD_RESULT_KINDS:
            # Completed after the caller gave it up: the fd would leak. Close it and report the cancel.
            os.close(result)
            result = ECANCELED
        op.result = result
        op.state = _DONE
        op.backend_data = None
        del self._in_flight[op.id]
        self._completed_count += 1
        self._completed.append(op)

    @abc.abstractmethod
    def _start(self, op: Op) -> None:
        """Begin an admitted op (inline, on a worker, by a readiness wait, or as an SQE)."""

    @abc.abstractmethod
    def _request_cancel(self, op: Op) -> None:
        """Make an in-flight op settle soon, through ``_finish``, with ``-ECANCELED`` or its result."""

    @abc.abstractmethod
    def _wait_for_events(self, timeout: float | None) -> None:
        """Block up to ``timeout`` for progress; call ``_finish`` for every op that completed."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free the backend's own resources (fds, threads, the ring). Called once, after draining."""

    def _extra_statistics(self) -> dict:
        return {}
