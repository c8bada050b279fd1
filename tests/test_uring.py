"""Tests of what is particular to the uring backend, on a real ring: batching, cancel races, CQ overflow, linked
timeouts, multishot streams, registered files, the wakeup, each probed feature on and forced off, and the explained
refusals (EPERM from the io_uring_disabled sysctl, ENOMEM from RLIMIT_MEMLOCK) tested for real.

Every test that takes the ``backend`` fixture runs twice: with every feature the kernel has ("features") and with
every optional feature forced to its fallback ("fallbacks"). Teardown checks that nothing is left in flight and that
the process has exactly the fds it had before.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import gc
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

uring = pytest.importorskip("iokit.backends.uring", reason="the iokit._uring_ffi extension is not built")

from iokit import _op as ops  # noqa: E402
from iokit._errors import BackendClosed  # noqa: E402
from iokit.backends.uring import FEATURES, MultishotOp, UringBackend  # noqa: E402

_available, _reason, _probed = uring.probe()
pytestmark = pytest.mark.skipif(not _available, reason=f"no io_uring ring here: {_reason}")

ECANCELED = -errno.ECANCELED
CONFIGS = {
    "features": {},
    "fallbacks": {name: False for name in FEATURES},
}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak():
    before = fd_count()
    yield
    assert fd_count() == before, "fds leaked"


@pytest.fixture(params=sorted(CONFIGS))
def backend(request, no_fd_leak):
    backend = UringBackend(features=CONFIGS[request.param])
    yield backend
    assert backend.statistics().in_flight == 0, "ops left in flight"
    backend.close()
    assert backend.statistics().in_flight == 0


def wait_for(backend, wanted, timeout=5.0) -> list:
    """Wait until every op in ``wanted`` is done; return everything wait() returned meanwhile, in order."""
    deadline = time.monotonic() + timeout
    returned = []
    while True:
        finished = all(op.done for op in wanted)  # an op may finish at submit (a bad address): still reported
        returned += backend.wait(0 if finished else 0.5)
        if finished:
            return returned
        assert time.monotonic() < deadline, f"timed out waiting for {wanted}"


def run(backend, op):
    backend.submit(op)
    returned = wait_for(backend, [op])
    assert returned.count(op) == 1
    return op.result


def connected_pair():
    """A connected TCP pair on 127.0.0.1 (non-blocking sockets) and the listener, all to close."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    for sock in (client, server):
        sock.setblocking(False)
    return listener, client, server


def close_all(*socks):
    for sock in socks:
        sock.close()


# --- availability and setup -------------------------------------------------------------------------------------

def test_probe_lists_every_feature():
    assert _available and _reason == ""
    assert set(FEATURES) <= set(_probed)
    assert _probed["nodrop"] and _probed["ext_arg"]


def test_unknown_feature_name_is_refused():
    with pytest.raises(ValueError, match="unknown uring features"):
        UringBackend(features={"warp_drive": False})


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_each_feature_can_be_forced_off(name, no_fd_leak):
    with UringBackend(features={name: False}) as backend:
        assert backend.features[name] is False
        if name == "buffer_ring":
            assert backend.features["multishot_recv"] is False  # it takes its buffers from the ring
        assert run(backend, ops.nop()) == 0


def test_features_found_are_used(no_fd_leak):
    with UringBackend() as backend:
        for name in FEATURES:
            if name != "sqpoll":  # opt-in only
                assert backend.features[name] == _probed[name], name
        assert backend.features["sqpoll"] is False


def test_sqpoll_is_opt_in(tmp_path, no_fd_leak):
    if not _probed["sqpoll"]:
        pytest.skip("this kernel refuses SQPOLL rings")
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * 64)
    fd = os.open(path, os.O_RDONLY)
    try:
        with UringBackend(sqpoll=True) as backend:
            assert backend.features["sqpoll"] and not backend.features["defer_taskrun"]
            buffers = [bytearray(256) for _ in range(64)]
            reads = [ops.read_at(fd, buffer, index * 256) for index, buffer in enumerate(buffers)]
            backend.submit_many(reads)
            wait_for(backend, reads)
            assert all(op.result == 256 and bytes(buf) == bytes(range(256)) for op, buf in zip(reads, buffers))
    finally:
        os.close(fd)


def test_submit_after_close_is_refused(no_fd_leak):
    backend = UringBackend()
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(BackendClosed):
        backend.submit(ops.nop())


# --- every op kind ------------------------------------------------------------------------------------------------

def test_nop_and_timeout(backend):
    assert run(backend, ops.nop()) == 0
    started = time.monotonic()
    assert run(backend, ops.timeout(0.05)) == 0  # the kernel's -ETIME is a TIMEOUT's success
    assert time.monotonic() - started >= 0.045


def test_read_write_at_offsets_and_file_position(backend, tmp_path):
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)
    try:
        assert run(backend, ops.write_at(fd, b"hello world", 0)) == 11
        assert run(backend, ops.write_at(fd, b"WORLD", 6)) == 5
        buffer = bytearray(32)
        assert run(backend, ops.read_at(fd, buffer, 0)) == 11
        assert bytes(buffer[:11]) == b"hello WORLD"
        # offset -1: at the file position, which the op moves
        os.lseek(fd, 0, os.SEEK_SET)
        assert run(backend, ops.read_at(fd, buffer, -1)) == 11
        assert os.lseek(fd, 0, os.SEEK_CUR) == 11
        assert run(backend, ops.write_at(fd, b"!", -1)) == 1
        assert os.pread(fd, 32, 0) == b"hello WORLD!"
        assert run(backend, ops.read_at(fd, buffer, 100)) == 0  # end of file
    finally:
        os.close(fd)


def test_readv_writev(backend, tmp_path):
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)
    try:
        assert run(backend, ops.writev_at(fd, [b"abc", bytearray(b"defg"), memoryview(b"hi")], 2)) == 9
        first, second = bytearray(4), bytearray(10)
        assert run(backend, ops.readv_at(fd, [first, second], 0)) == 11
        assert bytes(first) == b"\0\0ab" and bytes(second[:7]) == b"cdefghi"
    finally:
        os.close(fd)


def test_fsync_and_fdatasync(backend, tmp_path):
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"data")
        assert run(backend, ops.fsync(fd)) == 0
        assert run(backend, ops.fdatasync(fd)) == 0
    finally:
        os.close(fd)


def test_open_and_close(backend, tmp_path):
    path = tmp_path / "new"
    fd = run(backend, ops.open_file(path, os.O_RDWR | os.O_CREAT, 0o600))
    assert fd >= 0 and os.path.exists(path)
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert run(backend, ops.close(fd)) == 0
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
    op = ops.open_file(tmp_path / "missing")
    run(backend, op)
    with pytest.raises(FileNotFoundError):
        op.value()


def test_errors_are_negative_errno(backend):
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.close(write_fd)
    op = ops.read_at(read_fd, bytearray(4))
    assert run(backend, op) == -errno.EBADF
    with pytest.raises(OSError):
        op.value()


def test_accept_connect_send_recv_shutdown(backend):
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setblocking(False)
    try:
        accept = ops.accept(listener.fileno())
        connect = ops.connect(client.fileno(), listener.getsockname())
        backend.submit_many([accept, connect])
        wait_for(backend, [accept, connect])
        assert connect.value() == 0
        server_fd = accept.value()
        with socket.socket(fileno=server_fd) as server:
            assert os.get_blocking(server_fd) is False
            assert fcntl.fcntl(server_fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert run(backend, ops.send(client.fileno(), b"ping")) == 4
            received = ops.recv(server_fd, 16)
            assert run(backend, received) == 4 and bytes(received.buffer[:4]) == b"ping"
            assert run(backend, ops.shutdown(client.fileno(), socket.SHUT_WR)) == 0
            assert run(backend, ops.recv(server_fd, 16)) == 0  # end of stream
    finally:
        close_all(client, listener)


def test_connect_unix_and_ipv6_and_refused(backend, tmp_path):
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as client:
        listener.bind(path)
        listener.listen()
        assert run(backend, ops.connect(client.fileno(), path)) == 0
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with socket.socket() as client:
        client.setblocking(False)
        assert run(backend, ops.connect(client.fileno(), ("127.0.0.1", port))) == -errno.ECONNREFUSED
    with socket.socket() as client:
        assert run(backend, ops.connect(client.fileno(), ("not an address!", 1))) == -errno.EINVAL
    try:
        listener6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with listener6, socket.socket(socket.AF_INET6) as client:
        assert run(backend, ops.connect(client.fileno(), listener6.getsockname())) == 0


def test_send_to_closed_peer_is_epipe_not_sigpipe(backend):
    mine, peer = socket.socketpair()
    peer.close()
    try:
        assert run(backend, ops.send(mine.fileno(), b"x")) == -errno.EPIPE
    finally:
        mine.close()


def test_poll_reports_the_ready_mask(backend):
    mine, peer = socket.socketpair()
    try:
        assert run(backend, ops.poll(mine.fileno(), select.POLLOUT)) & select.POLLOUT
        readable = ops.poll(mine.fileno(), select.POLLIN)
        backend.submit(readable)
        assert backend.wait(0.05) == []
        peer.send(b"x")
        wait_for(backend, [readable])
        assert readable.result & select.POLLIN
    finally:
        close_all(mine, peer)


# --- batching, cancel, close, overflow ----------------------------------------------------------------------------

def test_64_reads_in_one_submit_take_one_syscall(backend, tmp_path):
    data = os.urandom(64 * 4096)
    (tmp_path / "data").write_bytes(data)
    fd = os.open(tmp_path / "data", os.O_RDONLY)
    try:
        buffers = [bytearray(4096) for _ in range(64)]
        reads = [ops.read_at(fd, buffer, index * 4096) for index, buffer in enumerate(buffers)]
        enters = backend.statistics().extra["enters"]
        backend.submit_many(reads)
        assert backend.statistics().extra["enters"] == enters + 1
        returned = wait_for(backend, reads)
        assert sorted(op.id for op in returned) == sorted(op.id for op in reads)
        assert b"".join(buffers) == data
    finally:
        os.close(fd)


def test_submit_many_starts_what_it_admitted_before_a_refused_op(backend):
    used = ops.nop()
    run(backend, used)
    first = ops.nop()
    with pytest.raises(ValueError, match="already submitted"):
        backend.submit_many([first, used])
    wait_for(backend, [first])
    assert first.result == 0


def test_cancel_vs_complete_race_loses_no_byte(backend):
    """Data arrives from another thread while recvs are submitted and cancelled: every recv completes exactly once,
    with the byte or with -ECANCELED, and every byte sent is either returned or still in the socket."""
    mine, peer = socket.socketpair()
    mine.setblocking(False)
    sent = 0
    stop = threading.Event()

    def writer():
        nonlocal sent
        while not stop.is_set():
            peer.send(b"x")
            sent += 1
            time.sleep(0.0001)

    thread = threading.Thread(target=writer)
    thread.start()
    outcomes = collections.Counter()
    returned = []
    try:
        for iteration in range(2000):
            op = ops.recv(mine.fileno(), 1)
            backend.submit(op)
            if iteration % 2:
                returned += backend.wait(0)  # vary who gets there first
            backend.cancel(op)
            returned += wait_for(backend, [op])
            assert op.result in (1, ECANCELED)
            outcomes[op.result] += 1
    finally:
        stop.set()
        thread.join()
    assert len(returned) == len({id(op) for op in returned}) == 2000  # each completed once
    left = 0
    while True:
        try:
            left += len(mine.recv(65536))
        except BlockingIOError:
            break
    assert outcomes[1] + left == sent
    assert outcomes[1] and outcomes[ECANCELED], outcomes
    close_all(mine, peer)


def test_close_with_1000_ops_in_flight(no_fd_leak):
    backend = UringBackend()
    pairs = [socket.socketpair() for _ in range(50)]
    recvs = [ops.recv(mine.fileno(), 16) for mine, _ in pairs for _ in range(20)]
    backend.submit_many(recvs)
    assert backend.statistics().in_flight == 1000
    backend.close()
    assert backend.statistics().in_flight == 0
    assert all(op.done and op.result == ECANCELED for op in recvs)
    for pair in pairs:
        close_all(*pair)


def test_small_cq_loses_no_completion(no_fd_leak):
    with UringBackend(entries=4, cq_entries=8) as backend:
        nops = [ops.nop() for _ in range(1000)]
        backend.submit_many(nops)
        returned = wait_for(backend, nops)
        assert len(returned) == len({id(op) for op in returned}) == 1000
        extra = backend.statistics().extra
        assert extra["cq_dropped"] == 0
        assert extra["overflow_flushes"] > 0  # the kernel did hold CQEs back, and we went back for them


def test_cancelled_accept_that_completes_anyway_closes_its_fd(no_fd_leak):
    # Without DEFER_TASKRUN the accept's completion is posted while we sleep, before the cancel reaches the kernel:
    # the cancel then finds nothing and the accept reports an fd nobody will take. The backend closes it.
    with UringBackend(features={"defer_taskrun": False}) as backend:
        for _attempt in range(5):
            with socket.create_server(("127.0.0.1", 0)) as listener:
                accept = ops.accept(listener.fileno())
                backend.submit(accept)
                assert backend.wait(0) == []  # hands the accept to the kernel (submit() only queues it)
                with socket.create_connection(listener.getsockname()) as client:
                    time.sleep(0.05)
                    backend.cancel(accept)
                    wait_for(backend, [accept])
                    assert accept.result == ECANCELED
                    client.settimeout(1)
                    try:
                        closed_by_backend = client.recv(1) == b""
                    except TimeoutError:
                        closed_by_backend = False  # the cancel won: the connection is still in the backlog
            if closed_by_backend:
                return
    pytest.fail("the accept never completed before its cancel")


def test_deadline_cancels_the_op(backend):
    mine, peer = socket.socketpair()
    try:
        op = ops.recv(mine.fileno(), 8)
        op.deadline = time.monotonic() + 0.05
        started = time.monotonic()
        assert run(backend, op) == ECANCELED
        assert 0.04 <= time.monotonic() - started < 2
        # a deadline that does not pass changes nothing
        op = ops.recv(mine.fileno(), 8)
        op.deadline = time.monotonic() + 10
        backend.submit(op)
        peer.send(b"in time")
        wait_for(backend, [op])
        assert op.result == 7
    finally:
        close_all(mine, peer)


def test_wakeup_from_another_thread(backend):
    timer = threading.Timer(0.1, backend.wakeup)
    started = time.monotonic()
    timer.start()
    assert backend.wait(None) == []
    assert 0.09 <= time.monotonic() - started < 2
    timer.join()
    backend.wakeup()  # a wakeup before the wait is not lost either
    assert backend.wait(5) == []


def test_signal_during_wait_is_retried_within_the_timeout(backend):
    caught = []
    previous = signal.signal(signal.SIGALRM, lambda *_: caught.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        started = time.monotonic()
        assert backend.wait(0.3) == []
        assert time.monotonic() - started >= 0.29
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert caught


# --- multishot streams and registered files -----------------------------------------------------------------------

def take_items(backend, stream, count, timeout=5.0) -> list:
    deadline = time.monotonic() + timeout
    items = []
    while len(items) < count:
        assert time.monotonic() < deadline
        for op in backend.wait(0.5):
            assert op is stream
            items += stream.items
            stream.items.clear()
    return items


def test_accept_multishot(backend):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        stream = backend.accept_multishot(listener.fileno())
        assert isinstance(stream, MultishotOp) and stream.native == backend.features["multishot_accept"]
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        fds = take_items(backend, stream, 3)
        assert not stream.done
        for fd in fds:
            assert os.get_blocking(fd) is False
            os.close(fd)
        backend.cancel(stream)
        wait_for(backend, [stream])
        assert stream.result == ECANCELED
        close_all(*clients)


def test_recv_multishot_until_end_of_stream(backend):
    mine, peer = socket.socketpair()
    payload = os.urandom(300_000)  # many provided buffers' worth
    try:
        stream = backend.recv_multishot(mine.fileno())
        assert stream.native == backend.features["multishot_recv"]

        def send_then_close():
            peer.sendall(payload)
            peer.close()

        thread = threading.Thread(target=send_then_close)
        thread.start()
        received = bytearray()
        for _ in wait_for(backend, [stream], timeout=10):
            received += b"".join(stream.items)
            stream.items.clear()
        thread.join()
        received += b"".join(stream.items)
        assert stream.result == 0 and bytes(received) == payload
    finally:
        close_all(mine, peer)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_recv_multishot_rearms_when_buffers_run_out(config, monkeypatch, no_fd_leak):
    # Two provided buffers and 200 queued messages: the kernel ends the multishot with ENOBUFS again and again, and
    # the backend re-arms it each time (the fallback re-arms a single-shot recv per message). No message is lost.
    monkeypatch.setattr(uring, "RECV_BUFFER_COUNT", 2)
    mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with UringBackend(features=CONFIGS[config]) as backend:
            stream = backend.recv_multishot(mine.fileno())
            messages = [index.to_bytes(4, "big") for index in range(200)]
            for message in messages:
                peer.send(message)
            assert take_items(backend, stream, 200) == messages
            assert backend.statistics().extra["multishot_rearms"] > 0
            backend.cancel(stream)
            wait_for(backend, [stream])
            assert stream.result == ECANCELED
    finally:
        close_all(mine, peer)


def test_registered_files(backend):
    mine, peer = socket.socketpair()
    try:
        registered = backend.register_fd(mine.fileno())
        assert registered == backend.features["registered_files"]
        assert backend.register_fd(mine.fileno()) == registered
        assert run(backend, ops.send(mine.fileno(), b"fixed")) == 5
        peer.send(b"back")
        received = ops.recv(mine.fileno(), 8)
        assert run(backend, received) == 4 and bytes(received.buffer[:4]) == b"back"
        extra = backend.statistics().extra
        assert extra["fixed_file_ops"] == (2 if registered else 0)
        # A CLOSE op unregisters the fd first: the file is really closed, so the peer sees the end of the stream.
        assert run(backend, ops.close(mine.detach())) == 0
        assert backend.statistics().extra["fixed_files"] == 0
        peer.settimeout(2)
        assert peer.recv(8) == b"fixed" and peer.recv(8) == b""
    finally:
        close_all(mine, peer)


# --- io_uring refused: the reasons, for real ---------------------------------------------------------------------

_CHILD = """
import resource, sys
from iokit._errors import BackendUnavailable
from iokit.backends.uring import UringBackend
if sys.argv[1] == "memlock":
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
print("ready", flush=True)
sys.stdin.readline()
try:
    UringBackend().close()
    print("created")
except BackendUnavailable as exc:
    print("unavailable:", exc.reason)
"""


def _child_outcome(mode: str, while_waiting=None) -> str:
    """Start a child that imports iokit, run ``while_waiting`` (a context manager factory) around its ring setup."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        if while_waiting is None:
            child.stdin.write("\n")
            child.stdin.flush()
            return child.stdout.read()
        with while_waiting():
            child.stdin.write("\n")
            child.stdin.flush()
            return child.stdout.readline()  # the sysctl is restored as soon as the child answered
    finally:
        child.stdin.close()
        child.wait(10)


def test_eperm_from_io_uring_disabled_is_explained():
    path = "/proc/sys/kernel/io_uring_disabled"
    try:
        with open(path) as file:
            old = file.read().strip()
        with open(path, "w") as file:
            file.write(old)
    except OSError as exc:
        pytest.skip(f"cannot write {path} here ({exc}): needs root and a 6.6+ kernel")

    @contextlib.contextmanager
    def disabled():
        try:
            with open(path, "w") as file:
                file.write("2")
            yield
        finally:
            with open(path, "w") as file:
                file.write(old)

    outcome = _child_outcome("plain", disabled)
    assert outcome.startswith("unavailable:"), outcome
    assert "EPERM" in outcome and "kernel.io_uring_disabled is 2" in outcome and "sysctl -w" in outcome


def test_enomem_from_memlock_limit_is_explained():
    outcome = _child_outcome("memlock")
    if outcome.startswith("created"):
        pytest.skip(f"kernel {os.uname().release} does not charge io_uring rings to RLIMIT_MEMLOCK (since 5.12 ring "
                    f"memory is charged to the memory cgroup), so a zero limit cannot make setup fail")
    assert outcome.startswith("unavailable:"), outcome
    assert "ENOMEM" in outcome and "RLIMIT_MEMLOCK" in outcome


def test_setup_errors_say_what_to_do():
    assert "5.11" in uring.explain_setup_error(errno.ENOSYS)
    assert "ulimit -l" in uring.explain_setup_error(errno.ENOMEM)
    assert "NODROP" in uring.explain_setup_error(errno.EOPNOTSUPP)
    if uring._read_sysctl("/proc/sys/kernel/io_uring_disabled") in ("0", None):
        # EPERM while the sysctl allows io_uring: the message points at seccomp
        assert "seccomp" in uring.explain_setup_error(errno.EPERM)


def test_unclosed_backend_warns_and_frees_an_idle_ring(no_fd_leak):
    backend = UringBackend()
    with pytest.warns(ResourceWarning, match="unclosed"):
        del backend
        gc.collect()
