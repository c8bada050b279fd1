"""The ``uring`` backend: ops become SQEs and come back as CQEs, in batches, through our C (``csrc/iokit_uring.c``).

The kernel facts this relies on (docs/uring.md draws the whole flow):

* **Two shared rings.** We write SQEs into the submission queue and one ``io_uring_enter`` hands the kernel all of them;
  the kernel writes a CQE per completion into the completion queue, which we read without a syscall. So ``submit_many``
  fills an array of small descriptors and makes *one* C call that prepares every SQE and submits; ``wait`` makes *one*
  C call that submits what is queued, waits and copies the CQEs into flat arrays. Python's work per op is filling a
  descriptor and, per CQE, a table lookup and ``_finish``.
* **The kernel may write into an op's buffer until the op's final CQE**, even after a cancel was asked for. The in-flight
  table (id -> op) holds the op, and ``op.backend_data`` the cffi objects pointing into its buffer (or its iovec array,
  path, sockaddr), until then. ``user_data`` is the op's integer id, never a pointer: a late CQE can at worst name an
  id that is no longer in the table.
* **Cancel is another request** (IORING_OP_ASYNC_CANCEL by user_data). Its own CQE is consumed in C; the op still gets
  exactly one final CQE: ``-ECANCELED``, or its real result if it finished first. Cancels are queued, not submitted on
  their own: the next ``wait`` carries them into the kernel, so cancelling 1,000 ops costs a few syscalls.
* **Per-op deadlines are linked timeouts**: the op's SQE gets IOSQE_IO_LINK and is followed by an
  IORING_OP_LINK_TIMEOUT at the absolute CLOCK_MONOTONIC deadline (``time.monotonic()``'s clock). When it fires the op
  completes with ``-ECANCELED``; the timeout's own CQE carries a tag and is consumed in C.
* **Nothing is lost when the CQ is full** (IORING_FEAT_NODROP, required): the kernel keeps the overflow and the C reap
  loop goes back for it. When the *SQ* is full, the C call submits what is queued and goes on; ops the kernel will not
  take yet wait in a backlog, offered again before the next wait.
* **A batch** (``read_batch``/``write_batch``) is N SQEs, one per block, prepared by one C call and submitted by one
  enter. The blocks' CQEs are reaped and counted in C (``iokit_ring_reap``): each writes its block's result into the
  op's ``results`` array, and only the last one reports the op, with the batch's outcome. A cancel settles the blocks
  the SQ had no room for at once and sends an ASYNC_CANCEL for each block the kernel has. A batch's deadline is a
  timer here (a linked timeout would cover one SQE).
* **Multishot requests** (accept, recv) post many CQEs for one SQE; IORING_CQE_F_MORE says another will follow. They
  are reachable only through ``accept_multishot``/``recv_multishot``, which return a ``MultishotOp`` stream.
* **SINGLE_ISSUER|DEFER_TASKRUN** (when the kernel has them): only the thread that created the ring may submit or wait,
  and completions are posted only while that thread enters the kernel with GETEVENTS, which every wait does. So
  ``wakeup()`` never touches the ring: it writes an eventfd that a multishot POLL request inside the ring watches.

Each optional feature is probed when the ring is created and has a fallback (``features=`` forces it off, for tests).
"""

from __future__ import annotations

import collections
import errno
import os
import resource
import socket
import struct
import time
import warnings
from typing import Any, Iterable

from .. import _engine
from .._errors import BackendClosed, BackendUnavailable
from .._kinds import BATCH_KINDS, check_c_enum, check_complete
from .._op import Op, OpKind, OpState, _check_fd
from .._uring_ffi import ffi, lib
from ._base import ECANCELED, Backend
from ._syscalls import BatchCall
from ._timers import TimerHeap

__all__ = ["MultishotOp", "UringBackend", "probe", "FEATURES"]

#: Features that ``features=`` may turn off, with their bit in the C API.
FEATURES = {
    "defer_taskrun": lib.IOKIT_FEATURE_DEFER_TASKRUN,
    "sqpoll": lib.IOKIT_FEATURE_SQPOLL,
    "linked_timeouts": lib.IOKIT_FEATURE_LINKED_TIMEOUTS,
    "registered_files": lib.IOKIT_FEATURE_REGISTERED_FILES,
    "multishot_accept": lib.IOKIT_FEATURE_MULTISHOT_ACCEPT,
    "multishot_recv": lib.IOKIT_FEATURE_MULTISHOT_RECV,
    "buffer_ring": lib.IOKIT_FEATURE_BUFFER_RING,
}
# Facts about the kernel, reported next to the features but not optional.
_KERNEL_FACTS = {
    "nodrop": lib.IOKIT_FEATURE_NODROP,
    "ext_arg": lib.IOKIT_FEATURE_EXT_ARG,
    "fast_poll": lib.IOKIT_FEATURE_FAST_POLL,
}

BATCH = 256                   # descriptors per C call
RECV_BUFFER_COUNT = 1024      # the provided-buffer ring's capacity (a power of two): the C adds 128 at a time, as load needs
RECV_BUFFER_SIZE = 16384
_MAX_TRANSFER = 0x7FFFF000    # the kernel's MAX_RW_COUNT: larger reads and writes are short, as with pread(2)
# CQE flags, from the kernel's ABI (include/uapi/linux/io_uring.h).
_CQE_F_BUFFER = 1 << 0
_CQE_F_MORE = 1 << 1
_CQE_BUFFER_SHIFT = 16
_IN_FLIGHT = OpState.IN_FLIGHT
_KINDS_WITH_SET_UP = frozenset({OpKind.CONNECT, OpKind.CLOSE})  # see _ready_for_sqe
# struct iokit_op (csrc/iokit_uring.h), field by field: id, addr, offset, timeout_ns, deadline_ns, len, flags, mode,
# fd, kind, fixed_file. Checked against the C layout below, at import.
_DESCRIPTOR = struct.Struct("=QQqQQIIIiBB6x")
_DESCRIPTOR_SIZE = _DESCRIPTOR.size
if ffi.sizeof("struct iokit_op") != _DESCRIPTOR_SIZE or [ffi.offsetof("struct iokit_op", name) for name in (
        "id", "addr", "offset", "timeout_ns", "deadline_ns", "len", "flags", "mode", "fd", "kind", "fixed_file")] != [
        0, 8, 16, 24, 32, 40, 44, 48, 52, 56, 57]:
    raise ImportError("struct iokit_op in csrc/iokit_uring.h no longer matches _DESCRIPTOR in iokit/backends/uring.py")
# The kinds that exist only between this module and csrc/iokit_uring.c (a describer sets them); with OpKind's they
# must be the C enum's values, exactly 0 .. IOKIT_KIND_COUNT - 1.
check_c_enum(lib, ("ACCEPT_MULTISHOT", "RECV_MULTISHOT", "CANCEL", "RECV_SELECT"), "csrc/iokit_uring.h")
# The method of UringBackend that describes each kind to C (after the fields every kind packs), checked complete;
# batches are no single descriptor (see _start_batch).
_DESCRIBER_NAMES = {
    OpKind.NOP: "_describe_plain", OpKind.FSYNC: "_describe_plain", OpKind.FDATASYNC: "_describe_plain",
    OpKind.CLOSE: "_describe_plain", OpKind.SHUTDOWN: "_describe_plain", OpKind.POLL: "_describe_plain",
    OpKind.READ: "_describe_buffer", OpKind.WRITE: "_describe_buffer", OpKind.SEND: "_describe_buffer",
    OpKind.RECV: "_describe_recv", OpKind.READV: "_describe_vector", OpKind.WRITEV: "_describe_vector",
    OpKind.OPEN: "_describe_open", OpKind.ACCEPT: "_describe_accept", OpKind.CONNECT: "_describe_connect",
    OpKind.TIMEOUT: "_describe_timeout",
}
check_complete(_DESCRIBER_NAMES, "iokit/backends/uring.py _DESCRIBER_NAMES", set(OpKind) - BATCH_KINDS)
_ETIME = -errno.ETIME
_ENOBUFS = -errno.ENOBUFS
_EINTR = -errno.EINTR
# Rings whose backend was garbage-collected with ops in flight, kept with those ops (and so their buffers) forever:
# freeing buffers the kernel may still write into would corrupt memory.
_ABANDONED: list[tuple[Any, dict]] = []


class MultishotOp(Op):
    """A request that completes many times: ``accept_multishot`` (one fd per connection) or ``recv_multishot`` (one
    ``bytes`` per chunk received).

    Each time new items arrive, ``wait()`` returns the op (once per call, however many arrived); they are in
    ``items``, oldest first, and belong to the caller from then on (accepted fds included: close them). The stream
    goes on until it is cancelled, fails, or (recv) the peer closes; then ``done`` is true and ``result`` is
    ``-ECANCELED``, ``-errno``, or 0 at the end of a recv stream. Items that arrived before the end stay in ``items``.
    """

    __slots__ = ("items", "native", "report_round")

    def __init__(self, kind: OpKind, fd: int, *, native: bool, buffer: memoryview | None = None):
        super().__init__(kind, fd, buffer=buffer)
        self.items: collections.deque = collections.deque()
        self.native = native      # one kernel multishot request, or single-shot requests re-armed by the backend
        self.report_round = 0     # the reap round in which the op was last queued for wait()


class UringBackend(Backend):
    """io_uring through ``iokit._uring_ffi``. Create it in the thread that will submit and wait (SINGLE_ISSUER).

    ``entries``: SQ size. ``cq_entries``: CQ size (default: twice the SQ). ``sqpoll``: let a kernel thread poll the
    SQ (submits then cost no syscall; the thread spins for a while after each). ``features``: names from ``FEATURES``
    mapped to False to force their fallback. Raises ``BackendUnavailable`` when no ring can be created, saying why.
    """

    name = "uring"

    def __init__(self, entries: int = 256, *, sqpoll: bool = False, cq_entries: int | None = None,
                 features: dict[str, bool] | None = None) -> None:
        self._ring = None  # first: _release and __del__ look at it
        super().__init__()
        if entries < 2:
            raise ValueError(f"entries must be >= 2 (an op with a deadline takes two SQEs), got {entries}")
        params = ffi.new("struct iokit_ring_params *", {
            "entries": entries, "cq_entries": cq_entries or 0,
            "features": _allowed_features(sqpoll, features or {}),
            "recv_buffer_count": RECV_BUFFER_COUNT, "recv_buffer_size": RECV_BUFFER_SIZE})
        ring_out = ffi.new("struct iokit_ring **")
        err = lib.iokit_ring_open(ring_out, params)
        if err < 0:
            raise BackendUnavailable("uring", explain_setup_error(-err))
        self._ring = ring_out[0]
        bits = params.features
        #: Each feature's name -> whether this ring uses it (plus the kernel facts nodrop, ext_arg, fast_poll).
        self.features = {name: bool(bits & bit) for name, bit in {**FEATURES, **_KERNEL_FACTS}.items()}
        self._wake_fd = lib.iokit_ring_wakeup_fd(self._ring)
        # The descriptors C reads, as bytes that _describe_chunk packs (and a typed view for what describers set).
        self._descriptor_bytes = bytearray(BATCH * _DESCRIPTOR_SIZE)
        self._descriptors = ffi.from_buffer("struct iokit_op[]", self._descriptor_bytes)
        self._cancel_descriptor = ffi.new("struct iokit_op *", {"kind": lib.IOKIT_CANCEL})
        capacity = max(BATCH, cq_entries or 2 * entries)
        self._capacity = capacity
        self._out_ids = ffi.new("uint64_t[]", capacity)
        self._out_results = ffi.new("int32_t[]", capacity)
        self._out_flags = ffi.new("uint32_t[]", capacity)
        self._counters = ffi.new("struct iokit_counters *")
        self._describers = self._describer_table()
        # Admitted ops not in the SQ yet, in order: those submit() queued for the next wait(), and those the SQ had no
        # room for. Their ids too, so that a cancel can tell at once that the kernel never saw the op.
        self._backlog: list[Op] = []
        self._backlog_ids: set[int] = set()
        self._cancel_backlog: list[int] = []  # ids of cancel requests the SQ had no room for yet
        self._deadline_timers = None if self.features["linked_timeouts"] else TimerHeap()
        self._batch_deadlines = None  # made with the first batch that has one (a linked timeout covers one SQE)
        self._batch_descriptor = ffi.new("struct iokit_batch *")
        self._batch_handle = ffi.new("void **")
        self._batch_outcome = ffi.new("int32_t *")
        self._batches_short_of_room: list[Op] = []  # batches some of whose blocks are not in the SQ yet
        self._batch_cancels: list[Op] = []          # batches whose cancels found no room in the SQ yet
        self._fixed_slots: dict[int, int] = {}  # registered fd -> its slot in the fixed-file table
        self._free_slots = list(range(lib.iokit_ring_fixed_file_slots(self._ring)))[::-1]
        self._fixed_file_ops = 0
        self._rearms = 0                       # multishot requests the backend put back in
        self._recv_buffers = lib.iokit_ring_recv_buffer(self._ring, 0)
        self._report_round = 0
        self._reported: list[MultishotOp] = []
        self._engine = None  # the native engine, while a runtime runs on this backend

    # --- public interface beyond Backend ---------------------------------------------------------------------------

    def submit_many(self, ops: Iterable[Op]) -> None:
        """Start many ops with one C call per ``BATCH`` ops (and one ``io_uring_enter`` when the SQ has room)."""
        ready: list[Op] = []
        try:
            for op in ops:
                self._admit(op)
                if self._ready_for_sqe(op):
                    ready.append(op)
        finally:
            self._prepare(ready, submit=True)  # the ops admitted start even if a later one was refused

    def accept_multishot(self, fd: int) -> MultishotOp:
        """Accept connections on listening socket ``fd`` until cancelled; returns the stream (already submitted).

        Each accepted fd (non-blocking, close-on-exec) is appended to the stream's ``items``. With the
        ``multishot_accept`` feature this is one kernel request; without it, single-shot accepts re-armed by the
        backend, with the same behaviour.
        """
        return self._start_stream(MultishotOp(OpKind.ACCEPT, _check_fd(fd),
                                              native=self.features["multishot_accept"]))

    def recv_multishot(self, fd: int) -> MultishotOp:
        """Receive from socket ``fd`` until the peer closes (result 0), an error, or a cancel; returns the stream.

        Each chunk received is appended to ``items`` as ``bytes``. With ``multishot_recv`` the kernel picks a buffer
        from the provided buffer ring for each chunk; the backend copies it out and gives it back at once. Without
        it, single-shot recvs into a buffer of the stream's own, re-armed by the backend.
        """
        native = self.features["multishot_recv"]
        buffer = None if native else memoryview(bytearray(RECV_BUFFER_SIZE))
        return self._start_stream(MultishotOp(OpKind.RECV, _check_fd(fd), native=native, buffer=buffer))

    def attach_engine(self, driver):
        """The engine shares this ring: its SQEs carry a tag of their own and their CQEs are dispatched in C during
        the reap; every other CQE still lands in this backend's arrays. It needs the provided buffer ring and
        multishot recv; without them the runtime's ops go through this backend as Ops."""
        if self._engine is not None:
            raise RuntimeError("an engine is attached to this backend already")
        if not (self.features["buffer_ring"] and self.features["multishot_recv"]):
            return None
        address = lambda cdata: int(ffi.cast("uintptr_t", cdata))  # noqa: E731
        self._engine = _engine.Loop(driver, "uring", ring=address(self._ring), ids=address(self._out_ids),
                                    results=address(self._out_results), cqe_flags=address(self._out_flags),
                                    capacity=self._capacity)
        return self._engine

    def detach_engine(self) -> None:
        engine = self._engine
        if engine is None:
            return
        # Its multishot recvs and accepts hold buffers of this ring: cancel them and reap until the last CQE.
        while engine.drain():
            count = engine.turn(0.01)
            if count:
                self._process_completions(count)
        engine.detach()
        self._engine = None

    def register_fd(self, fd: int) -> bool:
        """Put ``fd`` in the ring's fixed-file table: ops on it then skip the kernel's fd lookup and reference count.

        Returns True if ``fd`` is registered (now or before), False if it cannot be (``registered_files`` is off or
        the table is full), in which case ops on it simply use the fd. Raises ``OSError`` for a bad fd. The table
        holds its own reference to the file: a registered socket stays open until ``unregister_fd`` (a CLOSE op on
        it unregisters it by itself), so call ``unregister_fd`` before closing it any other way.
        """
        if fd in self._fixed_slots:
            return True
        if not self._free_slots:
            return False
        slot = self._free_slots.pop()
        err = lib.iokit_ring_set_fixed_file(self._ring, slot, fd)
        if err < 0:
            self._free_slots.append(slot)
            raise OSError(-err, os.strerror(-err))
        self._fixed_slots[fd] = slot
        return True

    def unregister_fd(self, fd: int) -> None:
        """Take ``fd`` out of the fixed-file table (nothing happens if it is not in it). Ops already in flight on it
        are not affected."""
        slot = self._fixed_slots.pop(fd, None)
        if slot is not None:
            lib.iokit_ring_set_fixed_file(self._ring, slot, -1)
            self._free_slots.append(slot)

    def wakeup(self) -> None:
        """Make a ``wait()`` in the ring's thread return soon. Safe from any thread: it only writes the eventfd that a
        POLL request in the ring watches, so it never touches the ring itself (which SINGLE_ISSUER forbids)."""
        if not self._closed:
            os.eventfd_write(self._wake_fd, 1)

    def statistics(self):
        self._syscalls = self._read_counters().enters
        return super().statistics()

    # --- Backend hooks ----------------------------------------------------------------------------------------------

    def _start(self, op: Op) -> None:
        # Queued, not even described yet: the next wait() describes every op queued since the last one in one pass,
        # prepares their SQEs in one C call and submits them in the io_uring_enter that waits. A round of the runtime
        # costs one syscall and one C call, not one per op.
        if self._ready_for_sqe(op):
            self._backlog.append(op)
            self._backlog_ids.add(op.id)

    def _request_cancel(self, op: Op) -> None:
        self._cancel(op)

    def _wait_for_events(self, timeout: float | None) -> None:
        if self._ring is None:
            raise BackendClosed(f"{self.name} backend is closed")
        if self._backlog or self._cancel_backlog or self._batches_short_of_room or self._batch_cancels:
            self._offer_backlog()
        if self._deadline_timers is not None or self._batch_deadlines is not None:
            timeout = self._expire_deadlines(timeout)
        if self._engine is not None:
            # One turn of the engine: flush, one io_uring_enter, the reap (its own CQEs dispatched in C, ours here).
            count = self._engine.turn(timeout)
            if count:
                self._process_completions(count)
            return
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            timeout_ns = -1 if end is None else max(0, int((end - time.monotonic()) * 1e9))
            count = lib.iokit_ring_wait(self._ring, timeout_ns, self._out_ids, self._out_results, self._out_flags,
                                        self._capacity)
            if count != _EINTR:
                break
            # A signal interrupted the wait: Python ran its handlers on the way back here; go on with the time left.
        if count < 0:
            raise self._ring_error(-count)
        if count:
            self._process_completions(count)

    def _release(self) -> None:
        self._counters_at_close = self._read_counters()
        lib.iokit_ring_close(self._ring)
        self._ring = None

    def _extra_statistics(self) -> dict:
        counters = self._read_counters()
        return {
            "features": dict(self.features),
            "sqes": counters.sqes,
            "cqes": counters.cqes,
            "enters": counters.enters,
            "registers": counters.registers,
            "overflow_flushes": counters.overflow_flushes,
            "cq_dropped": counters.cq_dropped,
            "backlog": len(self._backlog),
            "multishot_streams": sum(op.__class__ is MultishotOp for op in self._in_flight.values()),
            "fixed_files": len(self._fixed_slots),
            "fixed_file_ops": self._fixed_file_ops,
            "multishot_rearms": self._rearms,
            **({"engine": self._engine.statistics()} if self._engine is not None else {}),
        }

    def __del__(self) -> None:
        if self._ring is None:
            return
        warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
        if self._in_flight:
            _ABANDONED.append((self._ring, self._in_flight))
        else:
            lib.iokit_ring_close(self._ring)
        self._ring = None

    # --- submission -------------------------------------------------------------------------------------------------

    def _ready_for_sqe(self, op: Op) -> bool:
        """Do what must precede an admitted op's SQE (few kinds need anything). False: the op was finished here."""
        if op.kind not in _KINDS_WITH_SET_UP and op.deadline is None:
            return True
        if op.kind is OpKind.CONNECT:
            family = lib.iokit_socket_family(op.fd)
            try:
                if family < 0:
                    raise OSError(-family, os.strerror(-family))
                op.backend_data = _sockaddr(family, op.address)
            except OSError as exc:
                self._finish(op, -(exc.errno or errno.EINVAL))
                return False
        elif op.kind is OpKind.CLOSE:
            self.unregister_fd(op.fd)  # else the fixed-file table would keep the file open
            if self._engine is not None:
                self._engine.forget(op.fd)
        timers = self._deadline_timers
        if op.kind in BATCH_KINDS and op.deadline is not None:
            timers = self._batch_deadlines = self._batch_deadlines or TimerHeap()
        if op.deadline is not None and timers is not None:
            timers.add(op.deadline, op, is_deadline=True)
        return True

    def _prepare(self, ops: list[Op], *, submit: bool) -> None:
        """Describe ``ops`` to C, ``BATCH`` at a time, and prepare their SQEs (submitting them if ``submit``). The
        backlog goes first; what the SQ has no room for goes back to it, in order."""
        if self._backlog:
            ops = self._backlog + ops
            self._backlog = []
        self._backlog_ids.clear()
        batches = [op for op in ops if op.kind in BATCH_KINDS]
        if batches:
            ops = [op for op in ops if op.kind not in BATCH_KINDS]
            for op in batches:
                if op.state is _IN_FLIGHT:  # not cancelled meanwhile
                    self._start_batch(op, submit=submit and not ops)  # the others' submit takes the blocks too
        prepare = lib.iokit_ring_submit_ops if submit else lib.iokit_ring_queue_ops
        descriptors = self._descriptors
        start = 0
        while start < len(ops):
            chunk = [op for op in ops[start:start + BATCH] if op.state is _IN_FLIGHT]  # not cancelled meanwhile
            self._describe_chunk(chunk)
            count = prepare(self._ring, descriptors, len(chunk)) if chunk else 0
            if count < 0:
                # The kernel refuses the ring itself (e.g. EEXIST: not the ring's thread): the op fails with it.
                self._finish(chunk[0], count)
                ops = chunk[1:] + ops[start + BATCH:]
                start = 0
                continue
            if count < len(chunk):
                ops = chunk[count:] + ops[start + BATCH:]
                break
            start += BATCH
        else:
            return
        self._backlog = ops
        self._backlog_ids.update(op.id for op in ops)

    def _describe_chunk(self, chunk: list[Op]) -> None:
        """Fill the first ``len(chunk)`` descriptors. The fields most kinds read (id, kind, fd, deadline, offset, one
        buffer's length, flags, mode) go in with one ``struct.pack_into`` per op rather than a cffi attribute
        assignment each (this is on every op's path); the kind's describer then sets what only it needs (a buffer's
        address, an iovec array, a path...) and returns what must stay alive while the kernel may use it."""
        raw, descriptors, pack, describers = self._descriptor_bytes, self._descriptors, _DESCRIPTOR.pack_into, \
            self._describers
        fixed_slots = self._fixed_slots
        timers_in_python = self._deadline_timers is not None
        for index, op in enumerate(chunk):
            fd = op.fd
            slot = fixed_slots.get(fd) if fixed_slots else None
            if slot is not None:
                fd = slot
                self._fixed_file_ops += 1
            deadline = op.deadline
            buffer = op.buffer
            nbytes = 0 if buffer is None else buffer.nbytes
            pack(raw, index * _DESCRIPTOR_SIZE, op.id, 0, op.offset, 0,
                 0 if deadline is None or timers_in_python else int(deadline * 1e9),
                 nbytes if nbytes < _MAX_TRANSFER else _MAX_TRANSFER, op.flags, op.mode, fd, op.kind, slot is not None)
            op.backend_data = describers[op.kind](descriptors[index], op)

    def _offer_backlog(self) -> None:
        cancels, self._cancel_backlog = self._cancel_backlog, []
        short, self._batches_short_of_room = self._batches_short_of_room, []
        for op in short:
            if op.state is _IN_FLIGHT and lib.iokit_ring_continue_batch(self._ring, op.backend_data[0]) > 0:
                self._batches_short_of_room.append(op)
        self._prepare([], submit=False)
        for op_id in cancels:
            self._queue_cancel(op_id)
        batch_cancels, self._batch_cancels = self._batch_cancels, []
        for op in batch_cancels:
            if op.state is _IN_FLIGHT:
                self._cancel_batch(op)

    def _start_batch(self, op: Op, *, submit: bool) -> None:
        """Prepare a batch's SQEs (one per block) in one C call. Its pins (the buffers' exports, the offsets and the
        results C writes) stay in ``op.backend_data`` until its completion, with the C record that names them."""
        call = BatchCall(op)  # the same pointers the blocking backend's one C call takes
        descriptor = self._batch_descriptor
        fd = op.fd
        slot = self._fixed_slots.get(fd) if self._fixed_slots else None
        descriptor.id = op.id
        descriptor.base = call.base
        descriptor.blocks = call.blocks
        descriptor.offsets = call.offsets
        descriptor.results = call.results
        descriptor.count = call.count
        descriptor.block_size = op.size
        descriptor.fd = fd if slot is None else slot
        descriptor.write = call.write
        descriptor.fixed_file = slot is not None
        prepared = lib.iokit_ring_submit_batch(self._ring, descriptor, submit, self._batch_handle)
        if prepared < 0:  # no record could be made (ENOMEM): nothing reached the kernel
            for index in range(call.count):
                op.results[index] = prepared
            self._finish(op, prepared)
            return
        op.backend_data = (self._batch_handle[0], call)
        if prepared < call.count:
            self._batches_short_of_room.append(op)

    def _cancel_batch(self, op: Op) -> None:
        status = lib.iokit_ring_cancel_batch(self._ring, op.backend_data[0], self._batch_outcome)
        if status == 1:  # every block had settled, or never reached the kernel: its record is gone
            self._finish(op, self._batch_outcome[0])
        elif status < 0:  # -EBUSY: cancels for some blocks found no room yet
            self._batch_cancels.append(op)

    def _describer_table(self) -> dict:
        return {kind: getattr(self, name) for kind, name in _DESCRIBER_NAMES.items()}

    @staticmethod
    def _describe_plain(descriptor, op: Op) -> None:
        pass  # the packed fields are all it needs (poll events and shutdown's `how` are its flags)

    @staticmethod
    def _describe_buffer(descriptor, op: Op):
        keep = ffi.from_buffer(op.buffer)
        descriptor.addr = keep
        return keep

    def _describe_recv(self, descriptor, op: Op):
        if op.__class__ is MultishotOp and op.native:
            descriptor.kind = lib.IOKIT_RECV_MULTISHOT  # the kernel picks a provided buffer per chunk
            return None
        if op.buffer is None and op.size:  # ops.receive: no buffer of its own
            if self.features["buffer_ring"]:
                descriptor.kind = lib.IOKIT_RECV_SELECT  # the kernel takes a provided buffer when data arrives
                descriptor.len = min(op.size, RECV_BUFFER_SIZE)
                return None
            op.buffer = memoryview(bytearray(op.size))  # fallback: a buffer of its own, as ops.recv_into
            descriptor.len = min(op.size, _MAX_TRANSFER)  # packed as 0: the op had no buffer then
        return self._describe_buffer(descriptor, op)

    @staticmethod
    def _describe_accept(descriptor, op: Op) -> None:
        if op.__class__ is MultishotOp and op.native:
            descriptor.kind = lib.IOKIT_ACCEPT_MULTISHOT

    @staticmethod
    def _describe_vector(descriptor, op: Op):
        buffers = [ffi.from_buffer(view) for view in op.buffers]
        iovecs = ffi.new("struct iovec[]", [(buffer, view.nbytes) for buffer, view in zip(buffers, op.buffers)])
        descriptor.addr = iovecs
        descriptor.len = len(buffers)
        return iovecs, buffers

    @staticmethod
    def _describe_open(descriptor, op: Op):
        path = ffi.new("char[]", op.path)  # NUL-terminated, as openat wants
        descriptor.addr = path
        return path

    @staticmethod
    def _describe_connect(descriptor, op: Op):
        # op.backend_data is the raw sockaddr built by _ready_for_sqe (or, when re-described, the cdata over it).
        keep = op.backend_data if isinstance(op.backend_data, ffi.CData) else ffi.from_buffer(op.backend_data)
        descriptor.addr = keep
        descriptor.len = len(keep)
        return keep

    @staticmethod
    def _describe_timeout(descriptor, op: Op) -> None:
        descriptor.timeout_ns = int(op.timeout * 1e9)

    # --- cancel and deadlines -------------------------------------------------------------------------------------

    def _cancel(self, op: Op) -> None:
        if op.id in self._backlog_ids:
            # The kernel never saw it: it settles here and now (_prepare skips it when the backlog is offered).
            self._backlog_ids.discard(op.id)
            for index in range(len(op.results)):  # a batch: every block
                op.results[index] = ECANCELED
            self._finish(op, ECANCELED)
            return
        if op.kind in BATCH_KINDS:
            self._cancel_batch(op)
            return
        self._queue_cancel(op.id)

    def _queue_cancel(self, op_id: int) -> None:
        """Queue an ASYNC_CANCEL for ``op_id``; the next wait submits it (with whatever else is queued)."""
        self._cancel_descriptor.id = op_id
        if lib.iokit_ring_queue_ops(self._ring, self._cancel_descriptor, 1) != 1:
            self._cancel_backlog.append(op_id)

    def _expire_deadlines(self, timeout: float | None) -> float | None:
        """The deadlines kept here (batches', and every op's without linked timeouts): cancel the ops whose deadline
        passed; shorten the wait to the next."""
        for timers in (self._batch_deadlines, self._deadline_timers):
            if timers is None:
                continue
            for op, _is_deadline in timers.expired():
                self._cancel(op)  # not op.cancel_requested: a late accept keeps its fd, as with a linked timeout
            timeout = timers.timeout(timeout)
        return timeout

    # --- completion -------------------------------------------------------------------------------------------------

    def _process_completions(self, count: int) -> None:
        table = self._in_flight
        finish = self._finish
        ids = ffi.unpack(self._out_ids, count)
        results = ffi.unpack(self._out_results, count)
        cqe_flags = ffi.unpack(self._out_flags, count)
        self._report_round += 1
        for op_id, result, flags in zip(ids, results, cqe_flags):
            op = table[op_id]
            if op.__class__ is MultishotOp:
                self._stream_completion(op, result, flags)
            elif result == _ETIME and op.kind is OpKind.TIMEOUT:
                finish(op, 0)  # a TIMEOUT's expiry is its success
            elif op.size and op.kind is OpKind.RECV:
                self._receive_completion(op, result, flags)
            else:
                finish(op, result)
        if self._reported:
            self._completed.extend(op for op in self._reported if op.state is not OpState.DONE)
            self._reported.clear()

    def _start_stream(self, op: MultishotOp) -> MultishotOp:
        self._admit(op)
        self._prepare([op], submit=True)
        return op

    def _stream_completion(self, op: MultishotOp, result: int, cqe_flags: int) -> None:
        if op.kind is OpKind.ACCEPT:
            got_item = result >= 0
            if got_item and op.cancel_requested:
                os.close(result)  # the caller gave the stream up: nobody will take this connection
            elif got_item:
                self._deliver(op, result)
        else:
            got_item = result > 0
            if got_item:
                self._deliver(op, self._received_bytes(op, result, cqe_flags))
        if cqe_flags & _CQE_F_MORE:
            return
        # This request is over. Re-arm it unless it ended for good: a cancel, an error, or the end of a recv stream.
        if op.cancel_requested:
            self._finish(op, ECANCELED)
        elif got_item or result == _ENOBUFS:
            # Single-shot (the fallback) or a multishot the kernel stopped (CQ overflow, all provided buffers lent):
            # the same id goes back in; provided buffers return to the kernel before the next submit.
            self._rearms += 1
            self._prepare([op], submit=False)
        else:
            self._finish(op, result)

    def _receive_completion(self, op: Op, result: int, cqe_flags: int) -> None:
        """An ``ops.receive`` completed: its bytes go to ``op.data`` (copied out of the provided buffer, which the next
        call into the ring gives back to the kernel)."""
        if result == _ENOBUFS and not op.cancel_requested:
            # Every provided buffer was lent out in this round: they return on the next call, so try again then.
            self._rearms += 1
            self._prepare([op], submit=False)
            return
        if result > 0:
            op.data = self._received_bytes(op, result, cqe_flags)
        self._finish(op, result)

    def _received_bytes(self, op: Op, size: int, cqe_flags: int) -> bytes:
        if cqe_flags & _CQE_F_BUFFER:
            # A provided buffer: ours until the next call into the ring, which gives it back to the kernel.
            buffer_id = cqe_flags >> _CQE_BUFFER_SHIFT
            return ffi.buffer(self._recv_buffers + buffer_id * RECV_BUFFER_SIZE, size)[:]
        return bytes(op.buffer[:size])

    def _deliver(self, op: MultishotOp, item: Any) -> None:
        op.items.append(item)
        if op.report_round != self._report_round:
            op.report_round = self._report_round
            self._reported.append(op)

    # --- helpers ----------------------------------------------------------------------------------------------------

    def _read_counters(self):
        if self._ring is None:
            return self._counters_at_close
        lib.iokit_ring_counters(self._ring, self._counters)
        return self._counters

    def _ring_error(self, err: int) -> OSError:
        if err == errno.EEXIST and self.features["defer_taskrun"]:
            return OSError(err, "this io_uring ring is SINGLE_ISSUER: only the thread that created the backend may "
                                "submit to it and wait on it")
        return OSError(err, os.strerror(err))


def _allowed_features(sqpoll: bool, forced: dict[str, bool]) -> int:
    unknown = set(forced) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown uring features {sorted(unknown)}; known: {sorted(FEATURES)}")
    allowed = 0
    for name, bit in FEATURES.items():
        if forced.get(name, True) and (name != "sqpoll" or sqpoll):
            allowed |= bit
    return allowed


def _sockaddr(family: int, address: Any) -> bytes:
    """The raw ``struct sockaddr`` (Linux layout) for ``address`` on a socket of ``family``; OSError if it cannot be."""
    if family == socket.AF_UNIX:
        if not isinstance(address, (str, bytes, os.PathLike)):
            raise OSError(errno.EINVAL, f"an AF_UNIX address is a path, not {type(address).__name__}")
        path = os.fsencode(address)
        if not path.startswith(b"\0"):  # abstract names (leading NUL) are not NUL-terminated
            path += b"\0"
        if len(path) > 108:
            raise OSError(errno.ENAMETOOLONG, "AF_UNIX path too long")
        return struct.pack("=H", family) + path
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise OSError(errno.EAFNOSUPPORT, f"connect on address family {family} is not supported")
    if not isinstance(address, tuple) or len(address) < 2 or not isinstance(address[1], int):
        raise OSError(errno.EINVAL, f"expected a (host, port) tuple, got {address!r}")
    host, port = address[0], address[1]
    if not 0 <= port <= 0xFFFF:
        raise OSError(errno.EINVAL, f"port out of range: {port}")
    if family == socket.AF_INET:
        return struct.pack("=H", family) + struct.pack(">H", port) + _packed_host(socket.AF_INET, host) + bytes(8)
    flowinfo = address[2] if len(address) > 2 else 0
    scope_id = address[3] if len(address) > 3 else 0
    return (struct.pack("=H", family) + struct.pack(">HI", port, flowinfo) + _packed_host(socket.AF_INET6, host)
            + struct.pack("=I", scope_id))


def _packed_host(family: int, host: str) -> bytes:
    """``host`` as the 4 or 16 bytes of a sockaddr; an IPv4 host on an IPv6 socket becomes ::ffff:a.b.c.d."""
    for candidate in (family, socket.AF_INET):
        try:
            packed = socket.inet_pton(candidate, host)
        except (OSError, TypeError):
            continue
        return packed if candidate == family else b"\0" * 10 + b"\xff\xff" + packed
    try:  # a name, as sock.connect() would accept it (resolved here, blocking, like theirs)
        resolved = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError):
        raise OSError(errno.EINVAL, f"cannot resolve host {host!r}") from None
    return socket.inet_pton(family, resolved)


def explain_setup_error(err: int) -> str:
    """Why ``io_uring_setup`` failed with ``err`` (a positive errno), and what to do about it."""
    if err == errno.ENOSYS:
        return ("io_uring_setup failed with ENOSYS: this kernel has no io_uring (older than 5.1, or built without "
                "CONFIG_IO_URING); iokit needs Linux 5.11 or later")
    if err == errno.EPERM:
        setting = _read_sysctl("/proc/sys/kernel/io_uring_disabled")
        if setting == "2":
            return ("io_uring_setup failed with EPERM: the sysctl kernel.io_uring_disabled is 2, which disables "
                    "io_uring for every process; as root, `sysctl -w kernel.io_uring_disabled=0` enables it")
        if setting == "1":
            return ("io_uring_setup failed with EPERM: the sysctl kernel.io_uring_disabled is 1, which allows io_uring "
                    "only to processes with CAP_SYS_ADMIN or in the group kernel.io_uring_group; join that group, "
                    "or set kernel.io_uring_disabled to 0")
        return (f"io_uring_setup failed with EPERM although kernel.io_uring_disabled is "
                f"{setting if setting is not None else 'absent'}: a seccomp filter blocks it (container runtimes "
                f"such as Docker block io_uring in their default profile); allow io_uring_setup, io_uring_enter and "
                f"io_uring_register in the profile")
    if err == errno.ENOMEM:
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
        return (f"io_uring_setup failed with ENOMEM: the locked-memory limit (RLIMIT_MEMLOCK, now {limit}) is too "
                f"low for the ring's memory on this kernel; raise it (`ulimit -l`, limits.conf, or the service's "
                f"LimitMEMLOCK=) or ask for fewer entries")
    if err == errno.EOPNOTSUPP:
        return ("this kernel's io_uring is too old for iokit: it lacks IORING_FEAT_NODROP or IORING_FEAT_EXT_ARG "
                "(Linux 5.11 or later is needed)")
    return f"io_uring_setup failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})"


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None


_probe_result: tuple[bool, str, dict] | None = None


def probe() -> tuple[bool, str, dict]:
    """Whether a ring can be created here: ``(available, reason, features)``. ``reason`` says why not and what to do;
    ``features`` maps each name of ``FEATURES`` (and the kernel facts nodrop, ext_arg, fast_poll) to whether this
    kernel has it. ``sqpoll`` is probed with a ring of its own. A success is remembered for the process."""
    global _probe_result
    if _probe_result is not None:
        return _probe_result
    try:
        with UringBackend(entries=8) as backend:
            features = dict(backend.features)
        with UringBackend(entries=2, sqpoll=True) as backend:
            features["sqpoll"] = backend.features["sqpoll"]
    except BackendUnavailable as exc:
        return False, exc.reason, {}
    _probe_result = (True, "", features)
    return _probe_result
