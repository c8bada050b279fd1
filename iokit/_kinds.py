"""Each op kind's one home: its number, and the facts about it that do not depend on the backend.

A kind is known in many places that must agree: the C enum that prepares its SQE (``csrc/iokit_uring.h``), how the
uring backend describes it to that C (``backends/uring.py``), the syscall the Python-level backends make for it
(``backends/_syscalls.py``), what the fault injector may do to it (``backends/faults.py``), and the readiness a
waiting op parks on (epoll, and the poll(2) wait of blocking and threads). When they disagree nothing fails at once:
an op of a forgotten kind takes a wrong default (waits for POLLIN, runs inline instead of on the file pool) or meets a
``KeyError`` the first time one runs, perhaps in production.

So the facts live here once, in ``KINDS``; the sets the backends test against (``FILE_KINDS``, ``FD_RESULT_KINDS``,
``WAITS_FOR_WRITABLE``, ``SYSCALL_KINDS``, ``BATCH_KINDS``) are derived from it; each backend's own per-kind table is
checked complete with ``check_complete`` when its module loads, so a missing entry is an ``ImportError`` naming the
kind; and the uring backend checks the C enum against ``OpKind`` with ``check_c_enum`` when it loads.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Iterable, Mapping


class OpKind(enum.IntEnum):
    """What an op does. The values are shared with the C extension (``csrc/iokit_uring.h``, checked at import)."""

    NOP = 0
    READ = 1        # pread(fd, buffer, offset); offset -1 means "at the file position"
    WRITE = 2       # pwrite(fd, buffer, offset)
    READV = 3       # preadv(fd, buffers, offset)
    WRITEV = 4      # pwritev(fd, buffers, offset)
    FSYNC = 5
    FDATASYNC = 6
    OPEN = 7        # openat(AT_FDCWD, path, flags, mode) -> fd
    CLOSE = 8
    ACCEPT = 9      # -> fd of the new connection (non-blocking, close-on-exec)
    CONNECT = 10    # -> 0
    RECV = 11       # recv(fd, buffer, flags) -> bytes received, 0 at end of stream; with no buffer (``receive``)
                    # the backend picks one only when data arrives and leaves the bytes in ``op.data``
    SEND = 12       # send(fd, buffer, flags | MSG_NOSIGNAL) -> bytes sent
    SHUTDOWN = 13
    TIMEOUT = 14    # completes with 0 after ``timeout`` seconds
    POLL = 15       # waits until fd is ready for ``flags`` (POLLIN/POLLOUT); -> ready mask
    READ_BATCH = 16   # N preads: block i into its buffer at offsets[i]; each block's result in ``op.results``;
                      # -> N, or the first failed block's -errno (-ECANCELED if the cancel stopped any block)
    WRITE_BATCH = 17  # N pwrites, the same way


class Readiness(enum.Enum):
    """What an op that cannot progress yet waits for (epoll's waiter lists, poll(2) in blocking and threads)."""

    NONE = "none"            # never told "not ready": regular files always are ready, a timer has no fd
    READABLE = "readable"
    WRITABLE = "writable"
    EVENTS = "its events"    # POLL: the events in its flags


class Target(enum.Enum):
    """What the fd of an op is. File ops block on the disk, which readiness cannot help: epoll sends them to a pool."""

    FILE = "file"            # a regular file (or a pipe: any fd that pread/pwrite and fsync accept)
    SOCKET = "socket"
    ANY = "any fd"           # close, poll
    NONE = "no fd"           # nop, timeout (open makes one; see makes_fd)


@dataclasses.dataclass(frozen=True)
class KindFacts:
    waits_for: Readiness
    target: Target
    syscall: str | None      # the plain syscall that performs it; None: a timer, kept by each backend itself
    makes_fd: bool = False   # its result is a new fd, which a cancelled op's late success must close
    batched: bool = False    # N blocks at N offsets, each with a result of its own (``op.results``): not one SQE


_FILE, _SOCKET = Target.FILE, Target.SOCKET
_READABLE, _WRITABLE, _NEVER = Readiness.READABLE, Readiness.WRITABLE, Readiness.NONE

KINDS: Mapping[OpKind, KindFacts] = {
    OpKind.NOP: KindFacts(_NEVER, Target.NONE, "none: completes with 0"),
    OpKind.READ: KindFacts(_READABLE, _FILE, "pread(2), or read(2) at the file position"),
    OpKind.WRITE: KindFacts(_WRITABLE, _FILE, "pwrite(2), or write(2) at the file position"),
    OpKind.READV: KindFacts(_READABLE, _FILE, "preadv(2), or readv(2) at the file position"),
    OpKind.WRITEV: KindFacts(_WRITABLE, _FILE, "pwritev(2), or writev(2) at the file position"),
    OpKind.FSYNC: KindFacts(_NEVER, _FILE, "fsync(2)"),
    OpKind.FDATASYNC: KindFacts(_NEVER, _FILE, "fdatasync(2)"),
    OpKind.OPEN: KindFacts(_NEVER, _FILE, "openat(2)", makes_fd=True),
    OpKind.CLOSE: KindFacts(_NEVER, Target.ANY, "close(2)"),
    OpKind.ACCEPT: KindFacts(_READABLE, _SOCKET, "accept4(2)", makes_fd=True),
    OpKind.CONNECT: KindFacts(_WRITABLE, _SOCKET, "connect(2), then getsockopt(SO_ERROR)"),
    OpKind.RECV: KindFacts(_READABLE, _SOCKET, "recv(2)"),
    OpKind.SEND: KindFacts(_WRITABLE, _SOCKET, "send(2) with MSG_NOSIGNAL"),
    OpKind.SHUTDOWN: KindFacts(_NEVER, _SOCKET, "shutdown(2)"),
    OpKind.TIMEOUT: KindFacts(_NEVER, Target.NONE, None),
    OpKind.POLL: KindFacts(Readiness.EVENTS, Target.ANY, "poll(2)"),
    # Regular files never say "not ready": a batch never waits for readiness, whatever its direction.
    OpKind.READ_BATCH: KindFacts(_NEVER, _FILE, "pread(2) per block, all in one C call", batched=True),
    OpKind.WRITE_BATCH: KindFacts(_NEVER, _FILE, "pwrite(2) per block, all in one C call", batched=True),
}


def _kinds_where(predicate) -> frozenset[OpKind]:
    return frozenset(kind for kind, facts in KINDS.items() if predicate(facts))


# Kinds whose result is a new fd: if such an op completes after its cancel was asked for, nobody will take the fd, so
# the backend closes it (see ``Backend._finish``).
FD_RESULT_KINDS = _kinds_where(lambda facts: facts.makes_fd)
FILE_KINDS = _kinds_where(lambda facts: facts.target is Target.FILE)
WAITS_FOR_WRITABLE = _kinds_where(lambda facts: facts.waits_for is Readiness.WRITABLE)
SYSCALL_KINDS = _kinds_where(lambda facts: facts.syscall is not None)
# Kinds with many blocks: the uring backend submits them as N SQEs of their own (no descriptor of a single SQE), the
# worker pools split them across workers.
BATCH_KINDS = _kinds_where(lambda facts: facts.batched)


def check_complete(table: Mapping, owner: str, kinds: Iterable[OpKind] = OpKind) -> None:
    """Raise ``ImportError`` unless ``table`` has an entry for each of ``kinds`` and for nothing else. ``owner`` says
    where the table is, for the message. Called by each backend module on its per-kind tables as it loads."""
    expected = frozenset(kinds)
    missing = sorted(expected - table.keys())
    unexpected = sorted(set(table.keys()) - expected, key=repr)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append("no entry for " + ", ".join(kind.name for kind in missing))
        if unexpected:
            problems.append("entries for kinds it must not have: " + ", ".join(map(_name_of, unexpected)))
        raise ImportError(f"{owner}: {'; '.join(problems)} (the kinds are in iokit/_kinds.py)")


def _name_of(key: Any) -> str:
    return key.name if isinstance(key, OpKind) else repr(key)


def check_c_enum(lib: Any, c_only: Iterable[str], header: str, prefix: str = "IOKIT_",
                 count_name: str = "IOKIT_KIND_COUNT") -> None:
    """Raise ``ImportError`` unless the C enum in ``lib`` gives each ``OpKind`` member its value (``IOKIT_READ`` is
    ``OpKind.READ``), and the members plus the C-only kinds ``c_only`` (names without ``prefix``) are exactly
    ``0 .. count_name - 1``: the C refuses kinds from ``count_name`` on, so that bound must cover every kind and no
    more (a kind added to the C without its name here, or a hole, fails too)."""
    problems = []
    values: dict[int, str] = {}
    for name in [*(kind.name for kind in OpKind), *c_only]:
        c_value = getattr(lib, prefix + name, None)
        if c_value is None:
            problems.append(f"{prefix}{name} is missing")
            continue
        if name in OpKind.__members__ and c_value != OpKind[name]:
            problems.append(f"{prefix}{name} is {c_value}, OpKind.{name} is {OpKind[name].value}")
        if c_value in values:
            problems.append(f"{prefix}{name} and {prefix}{values[c_value]} are both {c_value}")
        values[c_value] = name
    count = getattr(lib, count_name, None)
    if count is None:
        problems.append(f"{count_name} is missing")
    elif set(values) != set(range(count)):
        problems.append(f"{count_name} is {count}, but the kinds known to Python are {sorted(values)}")
    if problems:
        raise ImportError(f"the op kinds of {header} do not match iokit/_kinds.py: {'; '.join(problems)}")
