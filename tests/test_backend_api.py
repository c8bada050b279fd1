"""The Backend interface from plain synchronous code, without the runtime, on every backend.

The blocking backend performs an op inside ``submit`` (a recv on an idle socket blocks there), and each thread sees
only its own completions in ``wait()``: where an op must stay pending, these tests submit it from a helper thread on
that backend, and cancel or close from the test's thread, as a thread-per-connection program would.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import os
import socket
import threading
import time

import pytest

import iokit
from iokit import ops
from iokit._op import OpState
from iokit.backends import _backend_class

from _helpers import collect, idle_socketpair, unused_fd, wait_until

ECANCELED = -errno.ECANCELED


class Pending:
    """An op that may wait: submitted from a helper thread on the blocking backend, directly otherwise.
    ``finish()`` returns what ``wait()`` gave back for it (from the thread that submitted it)."""

    def __init__(self, backend, op) -> None:
        self.backend, self.op = backend, op
        self.thread = None
        self.returned: list | None = None
        if backend.task_per_thread:
            self.error = None
            self.thread = threading.Thread(target=self._submit_and_wait, name="test-submitter", daemon=True)
            self.thread.start()
            assert wait_until(lambda: op.state is not OpState.NEW), "the op was never admitted"
        else:
            backend.submit(op)

    def _submit_and_wait(self) -> None:
        try:
            self.backend.submit(self.op)
            self.returned = self.backend.wait(0)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def finish(self, timeout: float = 10.0) -> list:
        if self.thread is not None:
            self.thread.join(timeout)
            assert not self.thread.is_alive(), f"{self.op!r} still blocks its thread after {timeout} s"
            if self.error is not None:
                raise self.error
            return self.returned
        return collect(self.backend, [self.op], timeout)


# --- batches and counters -------------------------------------------------------------------------------------------

def test_submit_many_64_reads_then_collect_64_completions(backend, tmp_path):
    block = 4096
    data = os.urandom(64 * block)
    path = tmp_path / "blocks"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        before = backend.statistics()
        reads = [ops.read_at(fd, bytearray(block), index * block) for index in range(64)]
        backend.submit_many(reads)
        returned = collect(backend, reads)
    finally:
        os.close(fd)
    assert sorted(map(id, returned)) == sorted(map(id, reads))
    for index, op in enumerate(reads):
        assert op.done and op.value() == block
        assert bytes(op.buffer) == data[index * block:(index + 1) * block]
    after = backend.statistics()
    assert after.submitted - before.submitted == 64
    assert after.completed - before.completed == 64
    assert after.in_flight == 0
    assert len({op.id for op in reads}) == 64, "ids must be unique"


def test_statistics_count_submitted_completed_and_in_flight(backend):
    a, b = idle_socketpair()
    try:
        start = backend.statistics()
        assert start.backend == backend.name
        assert start.in_flight == 0
        nop = ops.nop()
        backend.submit(nop)
        collect(backend, [nop])
        assert nop.value() == 0
        stats = backend.statistics()
        assert (stats.submitted - start.submitted, stats.completed - start.completed, stats.in_flight) == (1, 1, 0)

        recv = ops.recv(a.fileno(), 16)
        pending = Pending(backend, recv)
        assert wait_until(lambda: backend.statistics().in_flight == 1)
        stats = backend.statistics()
        assert (stats.submitted - start.submitted, stats.completed - start.completed) == (2, 1)
        b.send(b"x")
        assert pending.finish() == [recv]
        assert recv.value() == 1 and bytes(recv.buffer[:1]) == b"x"
        stats = backend.statistics()
        assert (stats.submitted - start.submitted, stats.completed - start.completed, stats.in_flight) == (2, 2, 0)
    finally:
        a.close()
        b.close()


def test_wait_with_nothing_in_flight_honours_its_timeout(backend):
    started = time.monotonic()
    assert backend.wait(0) == []
    assert time.monotonic() - started < 0.1
    started = time.monotonic()
    assert backend.wait(0.2) == []
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 2.0, elapsed


# --- cancel ---------------------------------------------------------------------------------------------------------

def test_cancel_of_op_waiting_on_idle_socket_completes_with_ecanceled(backend):
    a, b = idle_socketpair()
    try:
        recv = ops.recv(a.fileno(), 16)
        pending = Pending(backend, recv)
        time.sleep(0.05)
        assert not recv.done
        backend.cancel(recv)
        assert pending.finish() == [recv]
        assert recv.result == ECANCELED
        with pytest.raises(OSError) as info:
            recv.value()
        assert info.value.errno == errno.ECANCELED
        assert backend.statistics().in_flight == 0
        # Nothing was consumed: a byte sent now is still there for the next recv.
        b.send(b"y")
        again = ops.recv(a.fileno(), 16)
        Pending(backend, again).finish()
        assert again.value() == 1 and bytes(again.buffer[:1]) == b"y"
    finally:
        a.close()
        b.close()


def test_cancel_of_a_recv_whose_data_arrived_loses_no_byte(backend):
    """Cancel races a completion: either the cancel wins (-ECANCELED, the byte stays in the socket) or the recv does
    (its real result). Either way every byte is received exactly once."""
    a, b = idle_socketpair()
    try:
        received = bytearray()
        for round_number in range(20):
            recv = ops.recv(a.fileno(), 16)
            pending = Pending(backend, recv)
            b.send(bytes([round_number]))
            if round_number % 2:
                time.sleep(0.002)
            backend.cancel(recv)
            assert pending.finish() == [recv]
            if recv.result != ECANCELED:
                received += recv.buffer[:recv.value()]
        b.close()
        while True:
            tail = ops.recv(a.fileno(), 64)
            Pending(backend, tail).finish()
            if tail.value() == 0:
                break
            received += tail.buffer[:tail.value()]
        assert bytes(received) == bytes(range(20))
    finally:
        a.close()
        b.close()


def test_receive_gets_its_bytes_without_a_buffer_of_its_own(backend):
    """ops.receive holds no buffer while it waits: the bytes appear in op.data, 0 and b"" at end of stream."""
    a, b = idle_socketpair()
    try:
        waiting = ops.receive(a.fileno(), 4096)
        pending = Pending(backend, waiting)
        assert waiting.buffer is None
        b.send(b"hello")
        assert pending.finish() == [waiting]
        assert (waiting.value(), waiting.data) == (5, b"hello")
        b.close()
        at_end = ops.receive(a.fileno(), 4096)
        Pending(backend, at_end).finish()
        assert (at_end.value(), at_end.data) == (0, b"")
    finally:
        a.close()
        b.close()


def test_uring_receive_without_a_buffer_ring_falls_back_to_a_buffer_of_its_own():
    """The fallback path of ops.receive on uring (no provided buffer ring): same result, through a private buffer."""
    if not next(info for info in iokit.backends() if info.name == "uring").available:
        pytest.skip("uring is unavailable here")
    a, b = idle_socketpair()
    try:
        with iokit.open_backend("uring", features={"buffer_ring": False, "multishot_recv": False}) as backend:
            b.send(b"x" * 3000)
            op = ops.receive(a.fileno(), 2048)
            backend.submit(op)
            assert collect(backend, [op]) == [op]
            assert (op.value(), op.data) == (2048, b"x" * 2048)
    finally:
        a.close()
        b.close()


def test_cancel_of_finished_op_is_a_no_op(backend):
    a, b = idle_socketpair()
    try:
        b.send(b"ready")
        recv = ops.recv(a.fileno(), 16)
        Pending(backend, recv).finish()
        stats = backend.statistics()
        backend.cancel(recv)
        backend.cancel(recv)
        assert recv.done and recv.value() == 5 and not recv.cancel_requested
        assert backend.wait(0) == [], "a cancelled finished op must not complete again"
        after = backend.statistics()
        assert (after.in_flight, after.submitted, after.completed) == (0, stats.submitted, stats.completed)
        nop = ops.nop()
        backend.cancel(nop)  # never submitted: nothing happens
        assert nop.state is OpState.NEW and not nop.cancel_requested
    finally:
        a.close()
        b.close()


def test_cancel_of_a_timeout_op(backend):
    timer = ops.timeout(30)
    started = time.monotonic()
    pending = Pending(backend, timer)
    time.sleep(0.05)
    backend.cancel(timer)
    assert pending.finish() == [timer]
    assert timer.result == ECANCELED
    assert time.monotonic() - started < 5


# --- wakeup ---------------------------------------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_wakeup_from_another_thread_ends_a_blocked_wait(backend):
    backend.wait(0)  # the blocking backend makes this thread's wake-up eventfd on first use
    for _ in range(3):
        waker = threading.Timer(0.1, backend.wakeup)
        started = time.monotonic()
        waker.start()
        try:
            returned = backend.wait(None)
        finally:
            waker.join()
        elapsed = time.monotonic() - started
        assert returned == []
        assert 0.05 <= elapsed < 5, elapsed


def test_wakeup_ends_the_wait_with_an_op_still_in_flight(backend_name):
    if backend_name == "blocking":
        pytest.skip("blocking has no op in flight in the waiting thread: ops run inside submit()")
    with iokit.open_backend(backend_name) as backend:
        a, b = idle_socketpair()
        try:
            recv = ops.recv(a.fileno(), 4)
            backend.submit(recv)
            waker = threading.Timer(0.1, backend.wakeup)
            waker.start()
            started = time.monotonic()
            assert backend.wait(None) == []
            waker.join()
            assert time.monotonic() - started < 5
            assert not recv.done
            backend.cancel(recv)
            collect(backend, [recv])
            assert recv.result == ECANCELED
        finally:
            backend.close()
            a.close()
            b.close()


# --- close ----------------------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_close_with_200_recvs_in_flight_cancels_and_drains(backend_name):
    backend = iokit.open_backend(backend_name)
    pairs = [idle_socketpair() for _ in range(200)]
    try:
        recvs = [ops.recv(a.fileno(), 8) for a, _b in pairs]
        if backend.task_per_thread:
            pendings = [Pending(backend, op) for op in recvs]
        else:
            backend.submit_many(recvs)
        assert wait_until(lambda: backend.statistics().in_flight == 200, timeout=20), backend.statistics()
        started = time.monotonic()
        backend.close()
        assert time.monotonic() - started < 20
        assert backend.closed
        assert backend.statistics().in_flight == 0
        assert all(op.done and op.result == ECANCELED for op in recvs), {op.result for op in recvs}
        if backend.task_per_thread:
            for pending in pendings:
                pending.finish()
        backend.close()  # idempotent
        # The sockets are untouched: a byte sent now is readable.
        a, b = pairs[0]
        b.send(b"z")
        assert wait_until(lambda: select_readable(a))
        assert a.recv(1) == b"z"
    finally:
        backend.close()
        for a, b in pairs:
            a.close()
            b.close()


def select_readable(sock: socket.socket) -> bool:
    import select
    return bool(select.select([sock], [], [], 0)[0])


def test_submit_after_close_raises_backend_closed(backend):
    backend.close()
    with pytest.raises(iokit.BackendClosed):
        backend.submit(ops.nop())
    with pytest.raises(iokit.BackendClosed):
        backend.submit_many([ops.nop()])
    assert backend.statistics().in_flight == 0


def test_an_op_is_used_once(backend):
    nop = ops.nop()
    backend.submit(nop)
    collect(backend, [nop])
    with pytest.raises(ValueError):
        backend.submit(nop)
    assert backend.wait(0) == []
    assert backend.statistics().in_flight == 0


def test_an_op_submitted_twice_while_in_flight_raises_value_error(backend_name):
    if backend_name == "blocking":
        pytest.skip("blocking performs the op inside submit(): it is never in flight when submit() returns")
    with iokit.open_backend(backend_name) as backend:
        a, b = idle_socketpair()
        try:
            recv = ops.recv(a.fileno(), 4)
            backend.submit(recv)
            with pytest.raises(ValueError):
                backend.submit(recv)
            assert backend.statistics().in_flight == 1
            b.send(b"ok")
            collect(backend, [recv])
            assert recv.value() == 2
        finally:
            a.close()
            b.close()


# --- deadlines and timers -------------------------------------------------------------------------------------------

def test_per_op_deadline_cancels_the_op(backend):
    a, b = idle_socketpair()
    try:
        recv = ops.recv(a.fileno(), 4)
        started = time.monotonic()
        recv.deadline = started + 0.2
        assert Pending(backend, recv).finish() == [recv]
        elapsed = time.monotonic() - started
        assert recv.result == ECANCELED
        assert 0.15 <= elapsed < 3, elapsed
        # A deadline that does not pass does not cancel.
        b.send(b"ok")
        quick = ops.recv(a.fileno(), 4)
        quick.deadline = time.monotonic() + 5
        Pending(backend, quick).finish()
        assert quick.value() == 2
    finally:
        a.close()
        b.close()


def test_timeout_op_completes_with_zero_after_its_time(backend):
    timer = ops.timeout(0.2)
    started = time.monotonic()
    assert Pending(backend, timer).finish() == [timer]
    elapsed = time.monotonic() - started
    assert timer.value() == 0
    assert 0.19 <= elapsed < 3, elapsed


def test_timeout_ops_complete_in_order_of_expiry(backend_name):
    if backend_name == "blocking":
        pytest.skip("blocking sleeps inside submit(): one timer at a time")
    with iokit.open_backend(backend_name) as backend:
        timers = [ops.timeout(seconds) for seconds in (0.3, 0.1, 0.2)]
        backend.submit_many(timers)
        returned = collect(backend, timers)
        assert [op.timeout for op in returned] == [0.1, 0.2, 0.3]
        assert all(op.value() == 0 for op in timers)


# --- bad input --------------------------------------------------------------------------------------------------------

def test_closed_fd_gives_ebadf_through_value(backend):
    fd = unused_fd()
    for op in (ops.read_at(fd, bytearray(8), 0), ops.write_at(fd, b"x", 0), ops.recv(fd, 8), ops.fsync(fd)):
        Pending(backend, op).finish()
        with pytest.raises(OSError) as info:
            op.value()
        assert info.value.errno == errno.EBADF, (op, info.value)


@pytest.mark.parametrize("make, error", [
    (lambda fd: ops.read_at(fd, bytearray(4), -2), ValueError),
    (lambda fd: ops.write_at(fd, b"x", -5), ValueError),
    (lambda fd: ops.readv_at(fd, [bytearray(4)], -2), ValueError),
    (lambda fd: ops.read_at(fd, bytearray(4), 1.5), TypeError),
    (lambda fd: ops.read_at(-1, bytearray(4), 0), ValueError),
    (lambda fd: ops.read_at("3", bytearray(4), 0), TypeError),
    (lambda fd: ops.recv(fd, -1), ValueError),
    (lambda fd: ops.recv(fd, "10"), TypeError),
    (lambda fd: ops.read_at(fd, b"read-only", 0), TypeError),
    (lambda fd: ops.read_at(fd, "text", 0), TypeError),
    (lambda fd: ops.read_at(fd, 42, 0), TypeError),
    (lambda fd: ops.recv_into(fd, b"read-only"), TypeError),
    (lambda fd: ops.write_at(fd, "text", 0), TypeError),
    (lambda fd: ops.write_at(fd, 42, 0), TypeError),
    (lambda fd: ops.send(fd, "text"), TypeError),
    (lambda fd: ops.readv_at(fd, [b"read-only"], 0), TypeError),
    (lambda fd: ops.readv_at(fd, bytearray(4), 0), TypeError),
    (lambda fd: ops.writev_at(fd, [], 0), ValueError),
    (lambda fd: ops.timeout(-1), ValueError),
    (lambda fd: ops.shutdown(fd, 7), ValueError),
    (lambda fd: ops.open_file("a\0b"), ValueError),
    (lambda fd: ops.connect(fd, None), TypeError),
])
def test_bad_input_fails_at_construction(make, error):
    with pytest.raises(error):
        make(3)


def test_bad_input_never_reaches_a_backend(backend):
    with pytest.raises(TypeError):
        backend.submit(ops.read_at(3, b"read-only", 0))
    stats = backend.statistics()
    assert (stats.submitted, stats.in_flight) == (0, 0)


def test_choosing_backends():
    names = [info.name for info in iokit.backends()]
    assert names == ["blocking", "threads", "epoll", "uring"]
    for info in iokit.backends():
        assert info.available or info.reason, f"{info.name} is unavailable without a reason"
    with pytest.raises(ValueError):
        iokit.open_backend("no-such-backend")


# A misspelling of one of each backend's options (blocking has none: any name is unknown to it).
_MISSPELT_OPTIONS = {"blocking": "file_opps", "threads": "max_worker", "epoll": "fle_ops", "uring": "entrys"}


def _accepted_options(backend_name) -> list[str]:
    return sorted(inspect.signature(_backend_class(backend_name)).parameters)


def test_a_misspelt_option_is_a_type_error_naming_it_and_the_accepted_ones(backend_name):
    misspelt = _MISSPELT_OPTIONS[backend_name]
    with pytest.raises(TypeError) as raised:
        iokit.open_backend(backend_name, **{misspelt: 8})
    message = str(raised.value)
    assert repr(misspelt) in message and backend_name in message
    accepted = _accepted_options(backend_name)
    assert all(option in message for option in accepted)
    if not accepted:
        assert "no options" in message


def test_run_refuses_a_misspelt_option_before_main_runs(backend_name):
    ran = []

    async def main():
        ran.append(True)

    with pytest.raises(TypeError, match=repr(_MISSPELT_OPTIONS[backend_name])):
        iokit.run(main, backend=backend_name, **{_MISSPELT_OPTIONS[backend_name]: 8})
    assert not ran


def test_a_backend_constructor_refuses_an_option_not_its_own(backend_name):
    with pytest.raises(TypeError, match="max_wrkers"):
        _backend_class(backend_name)(max_wrkers=4)


def test_an_option_of_another_backend_is_left_out(backend_name):
    # One call configures whichever backend runs: iokit.serve gives every backend the threads pool's size.
    others = {"blocking": {"entries": 8}, "threads": {"file_ops": "inline"}, "epoll": {"max_workers": 4},
              "uring": {"file_workers": 2}}
    with iokit.open_backend(backend_name, **others[backend_name]) as backend:
        assert backend.name == backend_name


def test_auto_gives_the_backend_it_picks_its_options(monkeypatch):
    monkeypatch.delenv("IOKIT_BACKEND", raising=False)
    options = {"file_ops": "inline", "features": {"buffer_ring": False, "multishot_recv": False}}
    with iokit.open_backend("auto", **options) as backend:
        extra = backend.statistics().extra
        if backend.name == "uring":
            assert extra["features"]["buffer_ring"] is False
        else:
            assert backend.name == "epoll" and extra["file_ops"] == "inline"
    with pytest.raises(TypeError, match="'file_opps'.*auto accepts .*file_ops"):
        iokit.open_backend("auto", file_opps="inline")


def test_the_options_table_is_checked_against_the_constructors(monkeypatch):
    backends = importlib.import_module("iokit.backends")  # the package: iokit.backends is the listing function
    monkeypatch.setitem(backends._OPTIONS, "epoll", frozenset({"file_ops"}))
    backends._backend_class.cache_clear()
    try:
        with pytest.raises(ImportError, match="EpollBackend takes file_ops, file_workers"):
            backends._backend_class("epoll")
    finally:
        monkeypatch.undo()
        backends._backend_class.cache_clear()
