"""Fault injection: a backend that wraps any other and makes the rare cases of I/O happen often.

The paths where an I/O library loses or duplicates data are the ones a test on an idle loopback never takes: a recv that
gets one byte, a send the kernel takes one byte of, an attempt that answers "not ready" (EAGAIN) or "interrupted"
(EINTR), a cancel that reaches the kernel just as the op completes, a peer that resets, a disk that is full.
``FaultyBackend(inner, seed=..., eagain=p, ...)`` makes each happen at a rate the test chooses, with a seeded random
generator so that a failing run can be replayed. What the caller sees is only ever something the kernel could have said:

* **eagain** (recv, send, accept): the op is not tried at once. The wrapper first waits for readiness with a POLL op
  through the inner backend and then submits it, which is "try, then wait" (STYLE.md, practice 6). Invisible.
* **eintr** (every data op): the attempt was "interrupted" before it moved a byte, so it is simply made again, on the
  next round of ``wait()`` where the inner backend has rounds. Python's own syscall wrappers do the same since PEP 475.
  Invisible; on the blocking backend, where the op runs inside ``submit()``, it is only counted.
* **short** (recv, send, read, write, and the vectored forms): the inner op gets a one-byte view of the caller's buffer.
  The caller sees a count of 1 and must go on (``sendall``, ``write_all_at``, its recv loop). Nothing is lost or
  duplicated: the kernel moved exactly that byte.
* **cancel_race** (the same data ops, and poll): a cancel is sent right after submit, or at the start of the next
  ``wait()``, when the completion may already sit in the ring or the epoll set. Whichever wins is hidden: ``-ECANCELED``
  means the op moved nothing, so it is made again; a real result is delivered. So this checks the inner backend's cancel
  protocol: an op reported cancelled must not have consumed a byte. Never on accept, open, connect, close or timeout,
  where a second attempt would not be the same op (an accepted connection would be closed, a timer restarted).
* **reset** (recv, send): the connection is shut down both ways and the op fails with ``ECONNRESET``, as after a peer's
  RST. Visible: for tests that expect a connection to fail.
* **enospc** (write to a regular file): the write fails with ``ENOSPC`` without writing. Visible.

**On the native engine** (epoll and uring under the runtime) a stream's socket ops never become Ops, so the wrapper
hands eagain, short, reset and cancel_race to the engine itself (``attach_engine``), which injects them in C on its own recv and
send paths with a seeded generator of its own; their counts are in the inner backend's ``extra["engine"]``.

Bookkeeping keeps every rule of ``Backend``: the caller's op sits in this backend's in-flight table until its final
completion, and each try of it is a fresh ``_Attempt`` op in the inner backend's table, sharing the caller's buffer (or
a one-byte view of it), so the buffer outlives the kernel's use through both tables. A caller's cancel is passed on
to the attempt in flight, and the op settles only when that attempt does. ``close()`` cancels, drains, then closes the
inner backend. ``statistics().extra`` holds the injected-fault counters and the inner backend's own statistics.

Construct it directly, ``FaultyBackend(open_backend("epoll"), seed=1, short=0.3)``; or put a whole program under faults,
example servers included, with ``IOKIT_FAULTS="eagain=0.1,short=0.3,seed=1"``, which ``open_backend`` reads (through
``wrap_from_environment``). Its name is the inner one's with ``PREFIX``: ``faulty:epoll``.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
import random
import select
import socket
import stat
import threading
import time
from typing import Mapping

from .._kinds import check_complete
from .._op import Op, OpKind, OpState
from ._base import ECANCELED, Backend
from ._syscalls import wants_writable

__all__ = ["ENVIRONMENT_VARIABLE", "PREFIX", "FaultRates", "FaultyBackend", "wrap_from_environment"]

PREFIX = "faulty:"
ENVIRONMENT_VARIABLE = "IOKIT_FAULTS"

# The faults each kind may get (see the list above), checked complete at import: a new kind needs a decision here.
# eintr, short and cancel_race go together: each needs an op that moves bytes and can be made again unchanged.
_BYTES_FAULTS = frozenset({"eintr", "short", "cancel_race"})
_FAULTS_BY_KIND: dict[OpKind, frozenset[str]] = {
    OpKind.NOP: frozenset(),
    OpKind.READ: _BYTES_FAULTS,
    OpKind.WRITE: _BYTES_FAULTS | {"enospc"},
    OpKind.READV: _BYTES_FAULTS,
    OpKind.WRITEV: _BYTES_FAULTS | {"enospc"},
    OpKind.FSYNC: frozenset(),
    OpKind.FDATASYNC: frozenset(),
    OpKind.OPEN: frozenset(),
    OpKind.CLOSE: frozenset(),
    OpKind.ACCEPT: frozenset({"eagain"}),
    OpKind.CONNECT: frozenset(),
    OpKind.RECV: _BYTES_FAULTS | {"eagain", "reset"},
    OpKind.SEND: _BYTES_FAULTS | {"eagain", "reset"},
    OpKind.SHUTDOWN: frozenset(),
    OpKind.TIMEOUT: frozenset(),
    OpKind.POLL: frozenset({"cancel_race"}),
    # A batch's blocks are results of their own, some possibly cancelled: "made again unchanged" (eintr,
    # cancel_race) and a one-byte view (short) do not apply to it as a whole. It passes through untouched.
    OpKind.READ_BATCH: frozenset(),
    OpKind.WRITE_BATCH: frozenset(),
}
check_complete(_FAULTS_BY_KIND, "iokit/backends/faults.py _FAULTS_BY_KIND")


def _kinds_with(fault: str) -> frozenset[OpKind]:
    return frozenset(kind for kind, faults in _FAULTS_BY_KIND.items() if fault in faults)


_EAGAIN_KINDS = _kinds_with("eagain")
_SHORT_KINDS = _kinds_with("short")
_EINTR_KINDS = _kinds_with("eintr")
_CANCEL_RACE_KINDS = _kinds_with("cancel_race")
_RESET_KINDS = _kinds_with("reset")
_ENOSPC_KINDS = _kinds_with("enospc")


@dataclasses.dataclass(frozen=True)
class FaultRates:
    """How often each fault is injected (a probability per op, 0 to 1), and the seed of the random generator."""

    seed: int = 0
    eagain: float = 0.0
    eintr: float = 0.0
    short: float = 0.0
    cancel_race: float = 0.0
    reset: float = 0.0
    enospc: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if field.name != "seed" and not 0.0 <= getattr(self, field.name) <= 1.0:
                raise ValueError(f"the rate of {field.name} must be between 0 and 1, got {getattr(self, field.name)}")

    @classmethod
    def from_spec(cls, spec: str) -> "FaultRates":
        """Parse ``"eagain=0.1,short=0.3,seed=1"`` (the ``IOKIT_FAULTS`` format). Raises ``ValueError`` for an unknown
        name or a value that is not a number."""
        known = [field.name for field in dataclasses.fields(cls)]
        values: dict[str, float | int] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, separator, text = item.partition("=")
            name = name.strip()
            if not separator or name not in known:
                raise ValueError(f"{ENVIRONMENT_VARIABLE}: expected NAME=VALUE with NAME one of {', '.join(known)}, "
                                 f"got {item!r}")
            try:
                values[name] = int(text) if name == "seed" else float(text)
            except ValueError:
                raise ValueError(f"{ENVIRONMENT_VARIABLE}: {name} needs a number, got {text!r}") from None
        return cls(**values)


if set().union(*_FAULTS_BY_KIND.values()) - {field.name for field in dataclasses.fields(FaultRates)}:
    raise ImportError("iokit/backends/faults.py _FAULTS_BY_KIND names a fault that FaultRates does not have")


class _Attempt(Op):
    """One try of a caller's op (``outer``) in the inner backend: the op itself, or a readiness wait before it.

    On a backend where each task is a thread (blocking), the runtime cancels an op by setting the *caller's* op's
    ``cancel_requested`` and waking the thread, never through ``cancel()``; there ``follows_outer`` makes this
    attempt's flag read the caller's too, so the thread performing it sees the cancel.
    """

    __slots__ = ("outer", "is_readiness_wait", "follows_outer", "injected_cancel", "settled", "_cancel_flag")

    def __init__(self, outer: Op, kind: OpKind, *, is_readiness_wait: bool, follows_outer: bool, **fields) -> None:
        self.outer = outer
        self.is_readiness_wait = is_readiness_wait
        self.follows_outer = follows_outer
        self.injected_cancel = False
        self.settled = False
        self._cancel_flag = False
        super().__init__(kind, outer.fd, **fields)
        self.deadline = outer.deadline
        self.wake_fd = outer.wake_fd

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_flag or (self.follows_outer and self.outer.cancel_requested)

    @cancel_requested.setter
    def cancel_requested(self, value: bool) -> None:
        self._cancel_flag = value


class _PerThreadCompletions(threading.local):
    def __init__(self) -> None:
        self.ops: list[Op] = []


class FaultyBackend(Backend):
    """Wraps ``inner`` (which it owns and closes) and injects the faults of ``FaultRates`` (keywords or ``rates=``).

    Raises ``ValueError`` for a rate outside 0..1.
    """

    def __init__(self, inner: Backend, *, rates: FaultRates | None = None, **rate_values) -> None:
        self._lock = threading.Lock()  # the table and counters: on blocking, every task thread submits
        self._completions = _PerThreadCompletions()
        super().__init__()
        self.rates = rates if rates is not None else FaultRates(**rate_values)
        self._inner = inner
        self.name = PREFIX + inner.name
        self.task_per_thread = inner.task_per_thread
        self._random = random.Random(self.rates.seed)
        self._injected: collections.Counter[str] = collections.Counter()
        self._retry_next_round: list[Op] = []          # ops whose attempt was "interrupted" (EINTR)
        self._cancel_next_round: list[_Attempt] = []   # attempts to cancel as the next wait() begins
        self._engine = None                            # the inner backend's engine, while one is attached

    @classmethod
    def from_spec(cls, inner: Backend, spec: str) -> "FaultyBackend":
        """Wrap ``inner`` with the rates of ``spec`` (the ``IOKIT_FAULTS`` format)."""
        return cls(inner, rates=FaultRates.from_spec(spec))

    @property
    def inner(self) -> Backend:
        return self._inner

    # Each thread has its own completed list, as on the blocking backend (and harmless with one thread).
    @property
    def _completed(self) -> list[Op]:
        return self._completions.ops

    @_completed.setter
    def _completed(self, value: list[Op]) -> None:
        self._completions.ops = value

    # --- Backend hooks ----------------------------------------------------------------------------------------------

    def _admit(self, op: Op) -> None:
        with self._lock:
            super()._admit(op)

    def _finish(self, op: Op, result: int) -> None:
        with self._lock:
            super()._finish(op, result)

    def _start(self, op: Op) -> None:
        visible_error = self._visible_fault(op)
        if visible_error is not None:
            self._finish(op, visible_error)
            return
        wait_first = op.kind in _EAGAIN_KINDS and self._roll("eagain")
        self._advance(op, wait_first)

    def _request_cancel(self, op: Op) -> None:
        if op in self._retry_next_round:  # no attempt in flight: nothing was moved
            self._retry_next_round.remove(op)
            self._finish(op, ECANCELED)
            return
        attempt = op.backend_data
        if attempt is None:
            return
        if attempt.follows_outer:
            # Thread per task: the attempt already reads the caller's flag; wake the thread that performs it.
            if attempt.wake_fd >= 0:
                os.eventfd_write(attempt.wake_fd, 1)
        else:
            self._inner.cancel(attempt)

    def _wait_for_events(self, timeout: float | None) -> None:
        cancels, self._cancel_next_round = self._cancel_next_round, []
        for attempt in cancels:
            if attempt.state is OpState.IN_FLIGHT:
                self._inner.cancel(attempt)
        retries, self._retry_next_round = self._retry_next_round, []
        for op in retries:
            self._advance(op, wait_first=False)
        if self._completed or self._retry_next_round:
            timeout = 0
        for attempt in self._inner.wait(timeout):
            if isinstance(attempt, _Attempt) and not attempt.settled:
                self._after(attempt)

    def attach_engine(self, driver):
        """The wrapped backend's native engine, with this backend's socket faults (eagain, short, reset) injected
        inside it by a hook on its hot path (``engine.set_faults``), so that fault runs keep testing the path real
        programs take. Its cancel_race: a completion met as if a cancel had won, whose bytes must then be served
        again, not lost. eintr concerns a syscall's retry and stays with the Ops (files, connect...)."""
        engine = self._engine = self._inner.attach_engine(driver)
        if engine is not None:
            rates = self.rates
            engine.set_faults(rates.seed & 0xFFFFFFFFFFFFFFFF, eagain=rates.eagain, short=rates.short,
                              reset=rates.reset, cancel_race=rates.cancel_race)
        return engine

    def detach_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:  # its counts outlive it, in ours
            injected = engine.statistics()["injected"]
            with self._lock:
                self._injected.update(injected)
        self._inner.detach_engine()

    def forget(self, fd: int) -> None:
        self._inner.forget(fd)

    def wakeup(self) -> None:
        self._inner.wakeup()

    def _release(self) -> None:
        self._inner.close()

    def statistics(self):
        inner = self._inner.statistics()
        self._syscalls = inner.syscalls
        return super().statistics()

    def _extra_statistics(self) -> dict:
        with self._lock:
            injected = collections.Counter(self._injected)
        inner = self._inner.statistics()
        if self._engine is not None:  # the faults the attached engine has injected so far
            injected.update(self._engine.statistics()["injected"])
        return {"injected": dict(injected), "rates": dataclasses.asdict(self.rates), "inner": inner}

    # --- the faults -------------------------------------------------------------------------------------------------

    def _roll(self, fault: str) -> bool:
        rate = getattr(self.rates, fault)
        if rate <= 0.0 or self._random.random() >= rate:
            return False
        self._count(fault)
        return True

    def _count(self, name: str) -> None:
        with self._lock:
            self._injected[name] += 1

    def _visible_fault(self, op: Op) -> int | None:
        """The error of a fault the caller is meant to see (reset, ENOSPC), or None."""
        if op.kind in _RESET_KINDS and self._roll("reset"):
            _shut_down_both_ways(op.fd)
            return -errno.ECONNRESET
        if op.kind in _ENOSPC_KINDS and self.rates.enospc > 0 and _is_regular_file(op.fd) \
                and self._roll("enospc"):
            return -errno.ENOSPC
        return None

    def _advance(self, op: Op, wait_first: bool) -> None:
        """Submit the next attempt of ``op``; while attempts complete inside submit() (blocking, epoll's first try),
        go on with the one after, until one is left in flight or ``op`` is finished."""
        while True:
            if not wait_first and op.kind in _EINTR_KINDS and self._roll("eintr") and not self.task_per_thread:
                self._retry_next_round.append(op)
                return
            attempt = self._readiness_wait(op) if wait_first else self._attempt(op)
            op.backend_data = attempt
            self._inner.submit(attempt)
            if attempt.state is not OpState.DONE:
                if attempt.injected_cancel:
                    self._send_injected_cancel(attempt)
                return
            attempt.settled = True
            if not self._settle(attempt):
                return
            wait_first = False

    def _after(self, attempt: _Attempt) -> None:
        """An attempt left in flight has completed: settle it, and go on with the op if it needs another."""
        attempt.settled = True
        if self._settle(attempt):
            self._advance(attempt.outer, wait_first=False)

    def _settle(self, attempt: _Attempt) -> bool:
        """Decide what a completed attempt means for its op: finish the op (return False) or make the op itself
        again (return True: after a readiness wait, or after an injected cancel that won)."""
        op = attempt.outer
        op.backend_data = None
        result = attempt.result
        if attempt.is_readiness_wait:
            if op.cancel_requested or result == ECANCELED:  # asked for, or the op's deadline passed: nothing moved
                self._finish(op, ECANCELED)
                return False
            return True  # ready (or in error, which the op itself will now report)
        if attempt.injected_cancel:
            if result == ECANCELED and not op.cancel_requested and not _deadline_passed(attempt):
                self._count("cancel_race_won_by_cancel")
                return True
            self._count("cancel_race_won_by_completion")
        if op.buffer is None and not op.buffers:
            op.data = attempt.data  # ops.receive: the bytes are where the backend put them, in the attempt
        self._finish(op, result)
        return False

    def _readiness_wait(self, op: Op) -> _Attempt:
        events = select.POLLOUT if wants_writable(op) else select.POLLIN
        return _Attempt(op, OpKind.POLL, is_readiness_wait=True, follows_outer=self.task_per_thread, flags=events)

    def _attempt(self, op: Op) -> _Attempt:
        buffer, buffers, size = op.buffer, op.buffers, op.size
        if op.kind in _SHORT_KINDS and op.nbytes > 1 and self._roll("short"):
            if buffer is not None:
                buffer = buffer[:1]
            elif buffers:
                first = next(view for view in buffers if view.nbytes)
                buffers = (first[:1],)
            else:
                size = 1  # ops.receive: the backend picks the buffer, of at most this size
        attempt = _Attempt(op, op.kind, is_readiness_wait=False, follows_outer=self.task_per_thread, buffer=buffer,
                           buffers=buffers, size=size, offset=op.offset, flags=op.flags, path=op.path, mode=op.mode,
                           address=op.address, timeout=op.timeout, offsets=op.offsets, results=op.results)
        if op.kind in _CANCEL_RACE_KINDS and self._roll("cancel_race"):
            attempt.injected_cancel = True
            if self.task_per_thread:
                # The op runs inside submit(): the cancel can only be there from the start. The blocking wait makes
                # one attempt before it looks at the flag, so a ready op still completes: both outcomes occur.
                attempt.cancel_requested = True
        return attempt

    def _send_injected_cancel(self, attempt: _Attempt) -> None:
        if self.task_per_thread:
            return  # already set before submit
        if self._random.random() < 0.5:
            self._inner.cancel(attempt)
        else:
            self._cancel_next_round.append(attempt)


def wrap_from_environment(backend: Backend, environment: Mapping[str, str] = os.environ) -> Backend:
    """Return ``backend`` wrapped in a ``FaultyBackend`` with the rates of ``IOKIT_FAULTS`` if that is set (and not
    empty), else ``backend`` itself. Raises ``ValueError`` for a malformed ``IOKIT_FAULTS``."""
    spec = environment.get(ENVIRONMENT_VARIABLE, "").strip()
    if not spec or isinstance(backend, FaultyBackend):
        return backend
    wrapped = FaultyBackend.from_spec(backend, spec)
    wrapped.chosen_because = f"{backend.chosen_because}; with the faults of {ENVIRONMENT_VARIABLE}={spec}".lstrip("; ")
    return wrapped


def _deadline_passed(op: Op) -> bool:
    return op.deadline is not None and time.monotonic() >= op.deadline


def _shut_down_both_ways(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone: the op will fail on its own
    finally:
        sock.detach()


def _is_regular_file(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False
