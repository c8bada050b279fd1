"""One description of an I/O request, shared by every backend.

An ``Op`` says *what* to do (its kind, fd, buffer, offset, flags); each backend decides *how*: an inline syscall
(``blocking``), a job for a worker thread (``threads``), a readiness wait and a retry (``epoll``) or an SQE (``uring``).
Whatever the mechanism, the outcome is reported the same way, as in an io_uring completion: ``op.result`` is a byte count
(or an fd, or a poll mask) when it worked and ``-errno`` when it did not. ``op.value()`` turns that into a return value or
the matching ``OSError``.

Life of an op::

    NEW --submit--> IN_FLIGHT --(kernel/worker/retry finishes, or cancel settles)--> DONE

While an op is in flight, the backend's in-flight table owns it and so keeps its buffer alive: the kernel (or a worker
thread) may write into that buffer until the final completion, even after a cancel was asked for. An op is used once.

The constructors below validate their arguments, so that bad input fails at once with a ``TypeError`` or ``ValueError``
naming the argument, rather than as a strange errno later.
"""

from __future__ import annotations

import array
import enum
import os
import socket
from typing import Any, Sequence

from ._errors import check_result
from ._kinds import OpKind  # its home, with each kind's facts; imported from here too, where ops are built


class OpState(enum.IntEnum):
    NEW = 0
    IN_FLIGHT = 1
    DONE = 2


class Op:
    """One I/O request. Build it with the functions of this module (``read_at``, ``recv_into``, ...)."""

    # The fields every op uses live in slots. The others are class-level defaults that the few kinds needing them
    # override per instance (in the instance dict, created only then): building an op is on every I/O's path, and
    # each attribute set costs about as much as a small syscall's Python overhead.
    __slots__ = ("kind", "fd", "buffer", "offset", "flags", "deadline", "state", "result", "id", "cancel_requested",
                 "waiter", "backend_data", "__dict__", "__weakref__")

    buffers: tuple = ()       # READV/WRITEV: the buffers; READ_BATCH/WRITE_BATCH given one buffer per block
    size = 0                  # RECV without a buffer: the most bytes to receive; batches in one buffer: block size
    offsets: Any = ()         # READ_BATCH/WRITE_BATCH: array('q'), one offset per block
    results: Any = ()         # READ_BATCH/WRITE_BATCH: array('i'), each block's bytes or -errno once the op is done
    data = b""                # RECV without a buffer: the bytes received
    path = b""                # OPEN
    mode = 0                  # OPEN
    address: Any = None       # CONNECT
    timeout = 0.0             # TIMEOUT: seconds
    wake_fd = -1              # blocking backends: an eventfd that interrupts the wait when cancelling
    user_data: Any = None     # free for the caller

    def __init__(self, kind: OpKind, fd: int = -1, *, buffer: memoryview | None = None,
                 buffers: tuple[memoryview, ...] = (), size: int = 0, offset: int = 0, flags: int = 0,
                 path: bytes = b"", offsets: Any = (), results: Any = (),
                 mode: int = 0, address: Any = None, timeout: float = 0.0, user_data: Any = None):
        self.kind = kind
        self.fd = fd
        self.buffer = buffer
        self.offset = offset
        self.flags = flags
        # Absolute time.monotonic() after which the backend cancels the op by itself (an io_uring linked timeout).
        self.deadline: float | None = None
        self.state = OpState.NEW
        self.result = 0
        self.id = 0
        self.cancel_requested = False
        self.waiter: Any = None        # the runtime's task parked on this op
        self.backend_data: Any = None  # private to the backend that owns the op in flight
        if buffers:
            self.buffers = buffers
        if size:
            self.size = size
        if path:
            self.path = path
        if len(offsets):
            self.offsets = offsets
            self.results = results
        if mode:
            self.mode = mode
        if address is not None:
            self.address = address
        if timeout:
            self.timeout = timeout
        if user_data is not None:
            self.user_data = user_data

    @property
    def done(self) -> bool:
        return self.state is OpState.DONE

    @property
    def nbytes(self) -> int:
        """How many bytes the op may move (0 for ops without a buffer)."""
        if self.buffer is not None:
            return self.buffer.nbytes
        return sum(b.nbytes for b in self.buffers) or self.size

    def value(self) -> int:
        """Return the result of a finished op, or raise the ``OSError`` its ``-errno`` stands for."""
        if self.state is not OpState.DONE:
            raise RuntimeError(f"{self!r} has not completed")
        return check_result(self.result)

    def __repr__(self) -> str:
        extra = f" result={self.result}" if self.state is OpState.DONE else ""
        return f"<Op {self.kind.name} fd={self.fd} id={self.id} {self.state.name}{extra}>"


# --- validation helpers -----------------------------------------------------------------------------------------

def _check_fd(fd: int) -> int:
    if type(fd) is int and fd >= 0:
        return fd
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"fd must be an int, not {type(fd).__name__}")
    if fd < 0:
        raise ValueError(f"fd must be >= 0, got {fd}")
    return fd


def _check_offset(offset: int, *, allow_current: bool = True) -> int:
    if type(offset) is int and offset >= 0:
        return offset
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int, not {type(offset).__name__}")
    if offset < 0 and not (allow_current and offset == -1):
        raise ValueError(f"offset must be >= 0 (or -1 for the file position), got {offset}")
    return offset


def as_byte_view(buffer: Any, *, writable: bool) -> memoryview:
    """Return a flat byte view of ``buffer`` (anything with the buffer protocol), checking it can be written if asked."""
    kind = type(buffer)
    if kind is bytearray or (kind is bytes and not writable):
        return memoryview(buffer)  # always flat bytes: the checks below cannot fail
    try:
        view = memoryview(buffer)
    except TypeError:
        raise TypeError(f"expected a bytes-like object, not {type(buffer).__name__}") from None
    if writable and view.readonly:
        raise TypeError(f"a writable buffer is needed (bytearray, memoryview of one, array...), "
                        f"not read-only {type(buffer).__name__}")
    if not view.c_contiguous:
        raise ValueError("the buffer must be C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _byte_views(buffers: Sequence[Any], *, writable: bool) -> tuple[memoryview, ...]:
    if isinstance(buffers, (bytes, bytearray, memoryview)):
        raise TypeError("vectored ops take a sequence of buffers, not a single buffer")
    views = tuple(as_byte_view(b, writable=writable) for b in buffers)
    if not views:
        raise ValueError("vectored ops need at least one buffer")
    return views


# --- constructors -------------------------------------------------------------------------------------------------

def nop() -> Op:
    """An op that does nothing and completes with 0 (measures the machinery itself)."""
    return Op(OpKind.NOP)


def read_at(fd: int, buffer: Any, offset: int = -1) -> Op:
    """Read into ``buffer`` (writable) from ``fd`` at ``offset``; result: bytes read, 0 at end of file."""
    return Op(OpKind.READ, _check_fd(fd), buffer=as_byte_view(buffer, writable=True), offset=_check_offset(offset))


def write_at(fd: int, data: Any, offset: int = -1) -> Op:
    """Write ``data`` to ``fd`` at ``offset``; result: bytes written (may be short)."""
    return Op(OpKind.WRITE, _check_fd(fd), buffer=as_byte_view(data, writable=False), offset=_check_offset(offset))


def readv_at(fd: int, buffers: Sequence[Any], offset: int = -1) -> Op:
    """Scatter-read into ``buffers`` from ``offset``; result: total bytes read."""
    return Op(OpKind.READV, _check_fd(fd), buffers=_byte_views(buffers, writable=True), offset=_check_offset(offset))


def writev_at(fd: int, buffers: Sequence[Any], offset: int = -1) -> Op:
    """Gather-write ``buffers`` at ``offset``; result: total bytes written."""
    return Op(OpKind.WRITEV, _check_fd(fd), buffers=_byte_views(buffers, writable=False), offset=_check_offset(offset))


MAX_BLOCK = 0x7FFFF000
"""The largest block of a batch: the kernel's MAX_RW_COUNT, so that each block's result fits a 32-bit count."""


def read_batch(fd: int, buffers: Any, offsets: Sequence[int], *, block_size: int | None = None) -> Op:
    """Read N blocks at N ``offsets`` of ``fd``, each with its own result, as one op.

    ``buffers`` is either a sequence of N writable buffers (block i is read into ``buffers[i]``) or one writable
    buffer cut into N blocks of ``block_size`` bytes (default: its size divided by N), block i at ``i * block_size``.
    Once the op is done, ``op.results[i]`` is block i's byte count (short at end of file, 0 past it) or ``-errno``;
    the op's own result is N when no block failed, else the first failed block's ``-errno`` (``-ECANCELED`` when a
    cancel stopped any block; the blocks read before it keep their counts). Offsets are absolute (>= 0): a batch
    never reads at the file position."""
    return _batch(OpKind.READ_BATCH, fd, buffers, offsets, block_size, writable=True)


def write_batch(fd: int, buffers: Any, offsets: Sequence[int], *, block_size: int | None = None) -> Op:
    """Write N blocks at N ``offsets``, each with its own result (bytes written, may be short, or ``-errno``); the
    same shapes and outcome as ``read_batch``."""
    return _batch(OpKind.WRITE_BATCH, fd, buffers, offsets, block_size, writable=False)


def _batch(kind: OpKind, fd: int, buffers: Any, offsets: Sequence[int], block_size: int | None, *,
           writable: bool) -> Op:
    fd = _check_fd(fd)
    try:
        offsets = array.array("q", offsets)  # a copy: the kernel reads it after this call returns (uring)
    except TypeError:
        raise TypeError("offsets must be a sequence of ints") from None
    except OverflowError:
        raise ValueError("an offset does not fit a 64-bit file offset") from None
    count = len(offsets)
    if not count:
        raise ValueError("a batch needs at least one offset")
    if min(offsets) < 0:
        raise ValueError(f"batch offsets must be >= 0, got {min(offsets)}")
    results = array.array("i", bytes(4 * count))
    if isinstance(buffers, (list, tuple)):
        if block_size is not None:
            raise TypeError("block_size goes with one buffer, not with a buffer per block")
        views = tuple(as_byte_view(buffer, writable=writable) for buffer in buffers)
        if len(views) != count:
            raise ValueError(f"{len(views)} buffers for {count} offsets: a batch needs one buffer per offset")
        if max(view.nbytes for view in views) > MAX_BLOCK:
            raise ValueError(f"a block may hold at most {MAX_BLOCK} bytes")
        return Op(kind, fd, buffers=views, offsets=offsets, results=results)
    view = as_byte_view(buffers, writable=writable)
    if block_size is None:
        if view.nbytes % count:
            raise ValueError(f"a buffer of {view.nbytes} bytes does not split into {count} equal blocks; "
                             f"pass block_size")
        block_size = view.nbytes // count
    elif not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int, not {type(block_size).__name__}")
    if not 0 < block_size <= MAX_BLOCK:
        raise ValueError(f"block_size must be between 1 and {MAX_BLOCK}, got {block_size}")
    if block_size * count > view.nbytes:
        raise ValueError(f"{count} blocks of {block_size} bytes need {block_size * count} bytes; the buffer has "
                         f"{view.nbytes}")
    return Op(kind, fd, buffer=view, size=block_size, offsets=offsets, results=results)


def fsync(fd: int) -> Op:
    """Flush the file's data and metadata to stable storage."""
    return Op(OpKind.FSYNC, _check_fd(fd))


def fdatasync(fd: int) -> Op:
    """Flush the file's data (and the metadata needed to read it back) to stable storage."""
    return Op(OpKind.FDATASYNC, _check_fd(fd))


def open_file(path: str | bytes | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o666) -> Op:
    """Open ``path`` (relative to the current directory); result: the new fd. ``O_CLOEXEC`` is always added."""
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ValueError("path must not contain NUL bytes")
    return Op(OpKind.OPEN, path=raw, flags=flags | os.O_CLOEXEC, mode=mode)


def close(fd: int) -> Op:
    """Close ``fd``. The fd number is free for reuse once the op completes."""
    return Op(OpKind.CLOSE, _check_fd(fd))


def accept(fd: int) -> Op:
    """Accept a connection on listening socket ``fd``; result: the new connection's fd (non-blocking, close-on-exec)."""
    return Op(OpKind.ACCEPT, _check_fd(fd))


def connect(fd: int, address: Any) -> Op:
    """Connect socket ``fd`` to ``address`` (a ``(host, port)`` tuple of numeric addresses, or a path); result: 0."""
    if address is None:
        raise TypeError("connect needs an address")
    return Op(OpKind.CONNECT, _check_fd(fd), address=address)


def recv_into(fd: int, buffer: Any, flags: int = 0) -> Op:
    """Receive into ``buffer``; result: bytes received, 0 when the peer closed its side."""
    view = as_byte_view(buffer, writable=True)
    return Op(OpKind.RECV, _check_fd(fd), buffer=view, flags=flags)


def _check_size(size: int) -> int:
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"size must be an int, not {type(size).__name__}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return size


def recv(fd: int, size: int, flags: int = 0) -> Op:
    """Receive up to ``size`` bytes into a new buffer (``op.buffer``); result: bytes received."""
    return recv_into(fd, bytearray(_check_size(size)), flags)


def receive(fd: int, max_bytes: int, flags: int = 0) -> Op:
    """Receive up to ``max_bytes`` into a buffer the backend picks only once data has arrived; the bytes are in
    ``op.data``. A connection waiting for data then holds no buffer (io_uring: a provided buffer ring; the others
    read with os.read once the socket is readable). Result: bytes received, 0 at end of stream."""
    return Op(OpKind.RECV, _check_fd(fd), size=_check_size(max_bytes), flags=flags)


def send(fd: int, data: Any, flags: int = 0) -> Op:
    """Send from ``data``; result: bytes sent (may be fewer than offered). SIGPIPE is never raised: EPIPE is."""
    return Op(OpKind.SEND, _check_fd(fd), buffer=as_byte_view(data, writable=False), flags=flags)


def shutdown(fd: int, how: int = socket.SHUT_WR) -> Op:
    """Shut down one or both directions of a connected socket."""
    if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
        raise ValueError(f"how must be SHUT_RD, SHUT_WR or SHUT_RDWR, got {how}")
    return Op(OpKind.SHUTDOWN, _check_fd(fd), flags=how)


def timeout(seconds: float) -> Op:
    """Complete with 0 after ``seconds`` (a timer in the backend; io_uring's IORING_OP_TIMEOUT)."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    return Op(OpKind.TIMEOUT, timeout=float(seconds))


def poll(fd: int, events: int) -> Op:
    """Wait until ``fd`` is ready for ``events`` (``select.POLLIN`` / ``POLLOUT``); result: the ready mask."""
    return Op(OpKind.POLL, _check_fd(fd), flags=events)

