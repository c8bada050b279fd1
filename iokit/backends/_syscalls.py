"""The one place that turns an op into plain syscalls, for the three backends that make them from Python.

``attempt(op)`` makes the op's syscall once and returns what an io_uring completion would hold: a byte count, an fd or
a mask, or ``-errno``. Sockets are expected to be non-blocking (``iokit.streams`` makes them so), so a socket op that
cannot progress returns ``-EAGAIN`` instead of blocking; what to do then is each backend's choice:

* ``blocking`` and the ``threads`` workers wait in ``poll(2)`` on the fd and on the thread's wake-up eventfd (so a
  cancel can interrupt the wait), then try again;
* ``epoll`` parks the op on the fd's waiter list and tries again when epoll reports the fd ready.

EINTR needs no case of its own: since PEP 475 the ``os`` and ``socket`` functions retry it themselves, so "try, then
wait" covers both EAGAIN and EINTR.

``connect`` is the one op that is not simply retried: a non-blocking connect answers EINPROGRESS once, and its outcome
is read from ``SO_ERROR`` when the socket turns writable (``finish_connect``).

A batch (``read_batch``/``write_batch``) is N preads or pwrites made by one C call (``BatchCall``: Python's cost is
paid once per batch, not per block); the worker pools run slices of it on several workers.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time

from .._kinds import SYSCALL_KINDS, WAITS_FOR_WRITABLE, check_complete
from .._op import Op, OpKind

try:
    from .._uring_ffi import ffi, lib
except ImportError:  # the C extension is not built: batches are a loop of os.preadv/os.pwrite (see BatchCall.run)
    ffi = lib = None

EAGAIN = -errno.EAGAIN
ECANCELED = -errno.ECANCELED
_IN_PROGRESS = {errno.EINPROGRESS, errno.EALREADY}


def _borrow_socket(fd: int) -> socket.socket:
    # A socket object over an fd we do not own: detach() it afterwards so it never closes the fd.
    return socket.socket(fileno=fd)


def _accept(fd: int) -> int:
    sock = _borrow_socket(fd)
    try:
        new_fd, _address = sock._accept()  # the raw accept4(); the public accept() would wrap the fd in an object
    finally:
        sock.detach()
    os.set_blocking(new_fd, False)
    return new_fd


def _connect(op: Op) -> int:
    sock = _borrow_socket(op.fd)
    try:
        err = sock.connect_ex(op.address)
    finally:
        sock.detach()
    if err in _IN_PROGRESS:
        op.backend_data = "connecting"
        return EAGAIN
    return -err


def finish_connect(op: Op) -> int:
    """Outcome of a connect that answered EINPROGRESS, once the socket is writable (or -EAGAIN if still pending)."""
    sock = _borrow_socket(op.fd)
    try:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    finally:
        sock.detach()
    if err == 0:
        # Writable with no error can also mean "not finished yet" on a spurious wake-up; getpeername tells.
        try:
            sock = _borrow_socket(op.fd)
            sock.getpeername()
        except OSError as exc:
            return EAGAIN if exc.errno == errno.ENOTCONN else -exc.errno
        finally:
            sock.detach()
    return -err


def _shutdown(fd: int, how: int) -> int:
    sock = _borrow_socket(fd)
    try:
        sock.shutdown(how)
    finally:
        sock.detach()
    return 0


def _poll_now(fd: int, events: int) -> int:
    poller = select.poll()
    poller.register(fd, events)
    ready = poller.poll(0)
    if not ready:
        return EAGAIN
    mask = ready[0][1]
    if mask & select.POLLNVAL:
        return -errno.EBADF
    return mask


def attempt(op: Op) -> int:
    """Make ``op``'s syscall once. Returns the result, ``-errno``, or ``-EAGAIN`` if a socket is not ready."""
    perform = _ATTEMPTS.get(op.kind)
    if perform is None:
        raise ValueError(f"{op.kind.name} is not a syscall op")  # TIMEOUT is a timer in each backend
    try:
        return perform(op)
    except BlockingIOError:
        return EAGAIN
    except OSError as exc:
        return -exc.errno


def _recv(op: Op) -> int:
    if op.buffer is None:
        return _receive_new_bytes(op)
    return os.readv(op.fd, (op.buffer,)) if not op.flags else _recv_flags(op)


def _read(op: Op) -> int:
    return os.readv(op.fd, (op.buffer,)) if op.offset < 0 else os.preadv(op.fd, (op.buffer,), op.offset)


def _write(op: Op) -> int:
    return os.write(op.fd, op.buffer) if op.offset < 0 else os.pwrite(op.fd, op.buffer, op.offset)


def _readv(op: Op) -> int:
    return os.readv(op.fd, op.buffers) if op.offset < 0 else os.preadv(op.fd, op.buffers, op.offset)


def _writev(op: Op) -> int:
    return os.writev(op.fd, op.buffers) if op.offset < 0 else os.pwritev(op.fd, op.buffers, op.offset)


def _fsync(op: Op) -> int:
    os.fsync(op.fd)
    return 0


def _fdatasync(op: Op) -> int:
    os.fdatasync(op.fd)
    return 0


def _close(op: Op) -> int:
    os.close(op.fd)
    return 0


def _send(op: Op) -> int:
    if not op.flags:
        # write(2) on a socket is send(2) with no flags; Python ignores SIGPIPE, so a closed peer gives EPIPE.
        return os.write(op.fd, op.buffer)
    sock = _borrow_socket(op.fd)
    try:
        return sock.send(op.buffer, op.flags)
    finally:
        sock.detach()


def _receive_new_bytes(op: Op) -> int:
    # os.read allocates after the data is there to read (no zero-filled buffer waits with the op), then shrinks.
    if not op.flags:
        op.data = os.read(op.fd, op.size)
    else:
        sock = _borrow_socket(op.fd)
        try:
            op.data = sock.recv(op.size, op.flags)
        finally:
            sock.detach()
    return len(op.data)


def _recv_flags(op: Op) -> int:
    sock = _borrow_socket(op.fd)
    try:
        return sock.recv_into(op.buffer, 0, op.flags)
    finally:
        sock.detach()


class BatchCall:
    """A batch op described once for ``iokit_file_batch`` (csrc/iokit_uring.c): pointers into its buffers, offsets and
    results, and the stop flag a cancel sets. Its cffi objects hold buffer exports, so the memory C writes stays put
    while a call runs; ``run`` may be called for slices of the batch from several threads at once."""

    __slots__ = ("op", "count", "write", "base", "blocks", "offsets", "results", "stop", "_keep")

    def __init__(self, op: Op, *, stoppable: bool = False) -> None:
        self.op = op
        self.count = len(op.offsets)
        self.write = 1 if op.kind is OpKind.WRITE_BATCH else 0
        if lib is None:
            return
        if op.buffer is not None:
            self.base = ffi.from_buffer(op.buffer)
            self.blocks = ffi.NULL
        else:
            self.base = ffi.NULL
            self._keep = [ffi.from_buffer(view) for view in op.buffers]
            self.blocks = ffi.new("struct iovec[]", [(keep, view.nbytes) for keep, view in zip(self._keep, op.buffers)])
        self.offsets = ffi.from_buffer("int64_t[]", op.offsets)
        self.results = ffi.from_buffer("int32_t[]", op.results)
        self.stop = ffi.new("int32_t *") if stoppable else ffi.NULL  # only a worker's call can be stopped

    def run(self, start: int, count: int) -> int:
        """Perform blocks ``[start, start + count)``, each result into ``op.results``; returns that slice's outcome."""
        op = self.op
        if lib is None:
            return _batch_in_python(op, start, count)
        base = self.base + start * op.size if op.buffer is not None else ffi.NULL
        blocks = self.blocks + start if op.buffer is None else ffi.NULL
        return lib.iokit_file_batch(op.fd, self.write, base, op.size, blocks, self.offsets + start,
                                    self.results + start, count, self.stop)

    def cancel(self) -> None:
        """Make the calls running (and to come) leave the blocks they have not started, with -ECANCELED."""
        if lib is not None and self.stop:
            self.stop[0] = 1

    def settle_cancelled(self, start: int, count: int) -> None:
        """Blocks ``[start, start + count)`` will never run: they settle with -ECANCELED."""
        for index in range(start, start + count):
            self.op.results[index] = ECANCELED

    def outcome(self) -> int:
        """The batch's result from its blocks' (iokit_batch_outcome's rule)."""
        if lib is None:
            return _outcome_in_python(self.op.results)
        return lib.iokit_batch_outcome(self.results, self.count)


def _batch_in_python(op: Op, start: int, count: int) -> int:
    write = op.kind is OpKind.WRITE_BATCH
    for index in range(start, start + count):
        block = op.buffer[index * op.size:(index + 1) * op.size] if op.buffer is not None else op.buffers[index]
        try:
            done = os.pwrite(op.fd, block, op.offsets[index]) if write else os.preadv(op.fd, (block,),
                                                                                     op.offsets[index])
        except OSError as exc:
            done = -exc.errno
        op.results[index] = done
    return _outcome_in_python(op.results[start:start + count])


def _outcome_in_python(results) -> int:
    """iokit_batch_outcome's rule, for when the C extension is not built."""
    if ECANCELED in results:
        return ECANCELED
    return next((result for result in results if result < 0), len(results))


def _file_batch(op: Op) -> int:
    return BatchCall(op).run(0, len(op.offsets))


# The syscall of each kind that has one (TIMEOUT is a timer in each backend), checked complete below.
_ATTEMPTS = {
    OpKind.NOP: lambda op: 0,
    OpKind.READ: _read,
    OpKind.WRITE: _write,
    OpKind.READV: _readv,
    OpKind.WRITEV: _writev,
    OpKind.FSYNC: _fsync,
    OpKind.FDATASYNC: _fdatasync,
    OpKind.OPEN: lambda op: os.open(op.path, op.flags, op.mode),
    OpKind.CLOSE: _close,
    OpKind.ACCEPT: lambda op: _accept(op.fd),
    OpKind.CONNECT: lambda op: finish_connect(op) if op.backend_data == "connecting" else _connect(op),
    OpKind.RECV: _recv,
    OpKind.SEND: _send,
    OpKind.SHUTDOWN: lambda op: _shutdown(op.fd, op.flags),
    OpKind.POLL: lambda op: _poll_now(op.fd, op.flags),
    OpKind.READ_BATCH: _file_batch,
    OpKind.WRITE_BATCH: _file_batch,
}
check_complete(_ATTEMPTS, "iokit/backends/_syscalls.py _ATTEMPTS", SYSCALL_KINDS)


def wants_writable(op: Op) -> bool:
    """True if a not-ready ``op`` waits for POLLOUT (send, write to a pipe or socket, connect, poll for writing),
    False for POLLIN."""
    kind = op.kind
    return kind in WAITS_FOR_WRITABLE or (kind is OpKind.POLL and bool(op.flags & select.POLLOUT))


def wait_then_attempt(op: Op, wake_fd: int) -> int:
    """Perform ``op`` in the calling thread, blocking until it is done: try, and while the socket is not ready, wait in
    poll(2) on the fd and on ``wake_fd`` (written to interrupt the wait). Returns the result, or ``-ECANCELED`` once
    ``op.cancel_requested`` is set or ``op.deadline`` has passed. Used by ``blocking`` and by ``threads``' workers."""
    if op.kind is OpKind.TIMEOUT:
        return _sleep(op, wake_fd)
    result = attempt(op)
    if result != EAGAIN:
        return result
    return wait_then_retry(op, wake_fd)


def wait_then_retry(op: Op, wake_fd: int) -> int:
    """The rest of ``wait_then_attempt`` once a first attempt said -EAGAIN: poll(2) and try again until done."""
    poller = select.poll()
    # A POLL op waits for exactly its own events: POLLIN for a POLLRDHUP-only wait would spin while data is unread.
    poller.register(op.fd, op.flags if op.kind is OpKind.POLL else
                    select.POLLOUT if wants_writable(op) else select.POLLIN)
    poller.register(wake_fd, select.POLLIN)
    while True:
        if op.cancel_requested:
            return -errno.ECANCELED
        timeout_ms = None
        if op.deadline is not None:
            remaining = op.deadline - time.monotonic()
            if remaining <= 0:
                op.cancel_requested = True  # cancelled by its own deadline, as an io_uring linked timeout does
                return -errno.ECANCELED
            timeout_ms = max(1, int(remaining * 1000 + 0.999))
        fd_ready = False
        for fd, _mask in poller.poll(timeout_ms):
            if fd == wake_fd:
                drain_eventfd(wake_fd)
            else:
                fd_ready = True
        if not fd_ready:
            # Woken (a cancel, a deadline) with the fd not ready: no last try. A send would often still fit a few
            # KiB (poll says writable only with a third of the buffer free), and that "progress" would start the
            # caller's next send timeout afresh: a reader that stopped would be dropped after twice the timeout, not
            # once as on epoll and uring, which try only when the kernel reports the fd ready.
            continue
        result = attempt(op)
        if result != EAGAIN:
            return result


def _sleep(op: Op, wake_fd: int) -> int:
    end = time.monotonic() + op.timeout
    cut_short = op.deadline is not None and op.deadline < end  # the op's own deadline cancels it first
    if cut_short:
        end = op.deadline
    poller = select.poll()
    poller.register(wake_fd, select.POLLIN)
    while not op.cancel_requested:
        remaining = end - time.monotonic()
        if remaining <= 0:
            op.cancel_requested = cut_short
            return -errno.ECANCELED if cut_short else 0
        if poller.poll(max(1, int(remaining * 1000 + 0.999))):
            drain_eventfd(wake_fd)
    return -errno.ECANCELED


def drain_eventfd(fd: int) -> None:
    """Reset an eventfd used for wake-ups (it may already be 0: another waiter drained it)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
