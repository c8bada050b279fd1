"""Each op kind's one home (iokit/_kinds.py): the facts, the completeness checks of the per-kind tables, and the C enum.

The checks run when the backend modules load, so a missing entry never reaches a test of I/O; these tests show that
the checks themselves catch what they are for, on deliberately incomplete tables and on a C enum that disagrees.
"""

from __future__ import annotations

import errno
import types

import pytest

from iokit._kinds import (BATCH_KINDS, FD_RESULT_KINDS, FILE_KINDS, KINDS, SYSCALL_KINDS, WAITS_FOR_WRITABLE,
                          OpKind, check_c_enum, check_complete)
from iokit.backends import _syscalls, faults

from conftest import require_backend

C_ONLY_KINDS = ("ACCEPT_MULTISHOT", "RECV_MULTISHOT", "CANCEL", "RECV_SELECT")


def test_every_kind_has_its_facts():
    check_complete(KINDS, "KINDS")
    # The sets the backends read, as they were written by hand before they were derived.
    assert FD_RESULT_KINDS == {OpKind.ACCEPT, OpKind.OPEN}
    assert FILE_KINDS == {OpKind.READ, OpKind.WRITE, OpKind.READV, OpKind.WRITEV, OpKind.FSYNC, OpKind.FDATASYNC,
                          OpKind.OPEN, OpKind.READ_BATCH, OpKind.WRITE_BATCH}
    assert BATCH_KINDS == {OpKind.READ_BATCH, OpKind.WRITE_BATCH}
    assert WAITS_FOR_WRITABLE == {OpKind.SEND, OpKind.WRITE, OpKind.WRITEV, OpKind.CONNECT}
    assert set(OpKind) - SYSCALL_KINDS == {OpKind.TIMEOUT}  # a timer in each backend


def test_the_op_module_builds_ops_of_the_one_op_kind():
    from iokit import _op
    assert _op.OpKind is OpKind


@pytest.mark.parametrize("table, owner, kinds", [
    (_syscalls._ATTEMPTS, "_syscalls._ATTEMPTS", SYSCALL_KINDS),
    (faults._FAULTS_BY_KIND, "faults._FAULTS_BY_KIND", OpKind),
], ids=["syscalls", "faults"])
def test_a_table_missing_a_kind_is_an_import_error_naming_it(table, owner, kinds):
    check_complete(table, owner, kinds)  # the real table is complete
    incomplete = {kind: entry for kind, entry in table.items() if kind is not OpKind.RECV}
    with pytest.raises(ImportError, match=r"no entry for RECV\b"):
        check_complete(incomplete, owner, kinds)


def test_a_table_with_a_kind_it_must_not_have_is_an_import_error():
    with pytest.raises(ImportError, match="must not have: TIMEOUT"):
        check_complete({**_syscalls._ATTEMPTS, OpKind.TIMEOUT: None}, "_ATTEMPTS", SYSCALL_KINDS)


def test_the_uring_describer_table_is_checked():
    require_backend("uring")
    from iokit.backends import uring
    single_sqe_kinds = set(OpKind) - BATCH_KINDS  # a batch is no one descriptor: N SQEs of its own
    check_complete(uring._DESCRIBER_NAMES, "uring", single_sqe_kinds)
    incomplete = dict(uring._DESCRIBER_NAMES)
    del incomplete[OpKind.POLL]
    with pytest.raises(ImportError, match="no entry for POLL"):
        check_complete(incomplete, "uring", single_sqe_kinds)


def _uring_lib():
    require_backend("uring")
    from iokit._uring_ffi import lib
    return lib


def test_c_enum_values_are_the_python_ones():
    lib = _uring_lib()
    for kind in OpKind:
        assert getattr(lib, f"IOKIT_{kind.name}") == kind.value, kind
    c_kinds = [getattr(lib, f"IOKIT_{name}") for name in C_ONLY_KINDS]
    assert sorted([*OpKind, *c_kinds]) == list(range(lib.IOKIT_KIND_COUNT))
    check_c_enum(lib, C_ONLY_KINDS, "iokit_uring.h")


def _fake_lib(lib, **changes):
    names = {f"IOKIT_{name}": getattr(lib, f"IOKIT_{name}") for name in [*OpKind.__members__, *C_ONLY_KINDS]}
    names["IOKIT_KIND_COUNT"] = lib.IOKIT_KIND_COUNT
    names.update(changes)
    return types.SimpleNamespace(**{name: value for name, value in names.items() if value is not None})


@pytest.mark.parametrize("changes, complaint", [
    ({"IOKIT_READ": 2}, "IOKIT_READ is 2, OpKind.READ is 1"),
    ({"IOKIT_POLL": None}, "IOKIT_POLL is missing"),
    ({"IOKIT_KIND_COUNT": None}, "IOKIT_KIND_COUNT is missing"),
    ({"IOKIT_KIND_COUNT": 23}, "IOKIT_KIND_COUNT is 23"),  # a kind added to the C, unknown to Python
    ({"IOKIT_KIND_COUNT": 21}, "IOKIT_KIND_COUNT is 21"),  # the bound forgot the last kind: C would refuse it
    ({"IOKIT_CANCEL": 1}, "IOKIT_CANCEL and IOKIT_READ are both 1"),
])
def test_a_c_enum_that_disagrees_is_an_import_error(changes, complaint):
    lib = _uring_lib()
    check_c_enum(_fake_lib(lib), C_ONLY_KINDS, "iokit_uring.h")  # the copy of the real one passes
    with pytest.raises(ImportError, match=complaint):
        check_c_enum(_fake_lib(lib, **changes), C_ONLY_KINDS, "iokit_uring.h")


def test_c_refuses_a_kind_past_the_bound():
    lib = _uring_lib()
    from iokit._uring_ffi import ffi
    from iokit.backends.uring import UringBackend
    with UringBackend() as backend:
        descriptor = ffi.new("struct iokit_op *", {"id": 1, "kind": lib.IOKIT_KIND_COUNT, "fd": -1})
        assert lib.iokit_ring_queue_ops(backend._ring, descriptor, 1) == -errno.EINVAL
        # A batch kind is no single SQE: as a descriptor it is refused too (it goes through iokit_ring_submit_batch).
        descriptor.kind = lib.IOKIT_READ_BATCH
        assert lib.iokit_ring_queue_ops(backend._ring, descriptor, 1) == -errno.EINVAL
