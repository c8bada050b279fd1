"""Batched file ops (``ops.read_batch`` / ``ops.write_batch``) behave the same on every backend.

Real files in ``tmp_path``; each test runs on all four backends (the ``backend`` and ``run`` fixtures of conftest.py).
What must hold everywhere: every block gets its own result (a short read at end of file is a count, not an error),
the op's result is N or the first failed block's ``-errno``, a cancel settles every block (its real result or
``-ECANCELED``, never a block left unsettled), and the buffers stay pinned while the kernel or a worker may write them.
"""

from __future__ import annotations

import errno
import gc
import os

import pytest

import iokit
from iokit import move_on_after, ops, perform

from conftest import require_backend

BLOCK = 4096
ECANCELED = -errno.ECANCELED


def wait_for(backend, op, timeout: float = 10.0):
    """Wait until ``op`` has completed (other completions are dropped); fail after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.05)):
        if op.done:
            return op
        backend.wait(0.05)
    raise AssertionError(f"{op!r} did not complete within {timeout} s")


@pytest.fixture
def data_file(tmp_path):
    """A file of 64 blocks, block i filled with byte i; and its content."""
    content = b"".join(bytes([index]) * BLOCK for index in range(64))
    path = tmp_path / "blocks.dat"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    yield fd, content
    os.close(fd)


@pytest.fixture
def empty_pipe():
    """(reader, writer) of a pipe nobody writes to: io_uring reads a pipe at any offset, and waits for data."""
    reader, writer = os.pipe()
    yield reader, writer
    os.close(reader)
    os.close(writer)


def block_of(content: bytes, offset: int, size: int = BLOCK) -> bytes:
    return content[offset:offset + size]


# --- reads ------------------------------------------------------------------------------------------------------------

def test_read_batch_into_one_buffer(backend, data_file):
    fd, content = data_file
    offsets = [63 * BLOCK, 0, 17 * BLOCK, 17 * BLOCK, 5 * BLOCK + 100]  # any order, repeats, unaligned
    buffer = bytearray(len(offsets) * BLOCK)
    op = ops.read_batch(fd, buffer, offsets)
    backend.submit(op)
    wait_for(backend, op)
    assert op.result == len(offsets) and op.value() == len(offsets)
    assert list(op.results) == [BLOCK] * len(offsets)
    for index, offset in enumerate(offsets):
        assert buffer[index * BLOCK:(index + 1) * BLOCK] == block_of(content, offset), index


def test_read_batch_into_a_buffer_per_block_of_any_sizes(backend, data_file):
    fd, content = data_file
    buffers = [bytearray(1), bytearray(BLOCK), bytearray(3 * BLOCK + 7), memoryview(bytearray(512))[100:300]]
    offsets = [9, 2 * BLOCK, 40 * BLOCK + 1, 0]
    op = ops.read_batch(fd, buffers, offsets)
    backend.submit_many([op])
    wait_for(backend, op)
    assert list(op.results) == [len(buffer) for buffer in buffers]
    for buffer, offset in zip(buffers, offsets):
        assert bytes(buffer) == block_of(content, offset, len(buffer))


def test_explicit_block_size_leaves_the_rest_of_the_buffer_alone(backend, data_file):
    fd, content = data_file
    buffer = bytearray(b"\xee" * (3 * 100 + 50))
    op = ops.read_batch(fd, buffer, [BLOCK, 2 * BLOCK, 3 * BLOCK], block_size=100)
    backend.submit(op)
    wait_for(backend, op)
    assert list(op.results) == [100, 100, 100]
    assert buffer[:300] == content[BLOCK:BLOCK + 100] + content[2 * BLOCK:2 * BLOCK + 100] + \
        content[3 * BLOCK:3 * BLOCK + 100]
    assert buffer[300:] == b"\xee" * 50


def test_short_read_at_end_of_file_and_past_it_are_results(backend, data_file):
    fd, content = data_file
    size = len(content)
    op = ops.read_batch(fd, bytearray(4 * BLOCK), [0, size - 100, size, size + 10 * BLOCK])
    backend.submit(op)
    wait_for(backend, op)
    assert list(op.results) == [BLOCK, 100, 0, 0]
    assert op.result == 4  # no block failed


def test_a_large_batch_on_every_backend(backend, data_file):
    """More blocks than uring's SQ (256) and than a pool has workers: all of them, each at its place."""
    fd, content = data_file
    count = 600
    offsets = [((index * 37) % 64) * BLOCK for index in range(count)]
    buffer = bytearray(count * 512)
    op = ops.read_batch(fd, buffer, offsets, block_size=512)
    backend.submit(op)
    wait_for(backend, op)
    assert list(op.results) == [512] * count
    for index, offset in enumerate(offsets):
        assert buffer[index * 512:(index + 1) * 512] == block_of(content, offset, 512)


def test_a_batch_longer_than_a_small_sq_waits_for_room():
    """uring with an SQ of 8: the blocks that do not fit go in as the ring drains, and all complete."""
    require_backend("uring")
    with iokit.open_backend("uring", entries=8) as backend:
        path_fd = os.memfd_create("batch")
        try:
            os.write(path_fd, bytes(range(256)) * 64)
            ops_ = [ops.read_batch(path_fd, bytearray(50 * 16), [index * 16 for index in range(50)]) for _ in range(3)]
            backend.submit_many(ops_)
            for op in ops_:
                wait_for(backend, op)
                assert list(op.results) == [16] * 50
                assert bytes(op.buffer) == (bytes(range(256)) * 4)[:800]
        finally:
            os.close(path_fd)


# --- writes -----------------------------------------------------------------------------------------------------------

def test_write_batch_from_one_buffer_and_from_many(backend, tmp_path):
    fd = os.open(tmp_path / "out.dat", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        data = b"".join(bytes([65 + index]) * 1000 for index in range(4))
        one = ops.write_batch(fd, data, [3000, 0, 10000, 1000])
        many = ops.write_batch(fd, [b"xy", memoryview(b"--z--")[2:3], bytearray(b"tail")], [20000, 20002, 20003])
        backend.submit_many([one, many])
        wait_for(backend, one)
        wait_for(backend, many)
        assert list(one.results) == [1000] * 4 and list(many.results) == [2, 1, 4]
        written = os.pread(fd, 30000, 0)
        assert written[3000:4000] == b"A" * 1000 and written[0:1000] == b"B" * 1000
        assert written[10000:11000] == b"C" * 1000 and written[1000:2000] == b"D" * 1000
        assert written[2000:3000] == bytes(1000)  # the hole between the blocks reads as zeros
        assert written[20000:] == b"xyztail"
    finally:
        os.close(fd)


# --- failures ---------------------------------------------------------------------------------------------------------

def test_mixed_results_report_every_block_and_the_first_error(backend, data_file):
    fd, content = data_file
    size = len(content)
    too_far = (1 << 63) - 10  # offset + length overflows a file offset: EINVAL for that block alone
    op = ops.read_batch(fd, bytearray(5 * BLOCK), [BLOCK, too_far, size - 1, too_far - 1, 0])
    backend.submit(op)
    wait_for(backend, op)
    assert list(op.results) == [BLOCK, -errno.EINVAL, 1, -errno.EINVAL, BLOCK]
    assert op.result == -errno.EINVAL
    with pytest.raises(OSError) as caught:
        op.value()
    assert caught.value.errno == errno.EINVAL
    assert op.buffer[:BLOCK] == block_of(content, BLOCK) and op.buffer[4 * BLOCK:] == block_of(content, 0)


def test_a_file_not_open_for_the_direction_fails_every_block(backend, tmp_path):
    path = tmp_path / "f.dat"
    path.write_bytes(b"x" * BLOCK)
    write_only = os.open(path, os.O_WRONLY)
    read_only = os.open(path, os.O_RDONLY)
    try:
        read = ops.read_batch(write_only, bytearray(2 * 10), [0, 10])
        write = ops.write_batch(read_only, b"ab", [0, 1])
        backend.submit_many([read, write])
        wait_for(backend, read)
        wait_for(backend, write)
        assert list(read.results) == [-errno.EBADF] * 2 and read.result == -errno.EBADF
        assert list(write.results) == [-errno.EBADF] * 2 and write.result == -errno.EBADF
    finally:
        os.close(write_only)
        os.close(read_only)
    assert path.read_bytes() == b"x" * BLOCK


def test_a_directory_fails_each_block(backend, tmp_path):
    # (Not a socket or a pipe: pread says ESPIPE there, while io_uring reads a stream at offset 0 and waits.)
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        op = ops.read_batch(directory, bytearray(8), [0, 4])
        backend.submit(op)
        wait_for(backend, op)
        assert list(op.results) == [-errno.EISDIR] * 2 and op.result == -errno.EISDIR
    finally:
        os.close(directory)


@pytest.mark.parametrize("build, error", [
    (lambda fd: ops.read_batch(fd, bytearray(8), [0, -1]), ValueError),           # no "file position" in a batch
    (lambda fd: ops.read_batch(fd, bytearray(8), [0, 1 << 63]), ValueError),      # not a 64-bit offset
    (lambda fd: ops.read_batch(fd, bytearray(8), [0, 1.5]), TypeError),
    (lambda fd: ops.read_batch(fd, bytearray(8), []), ValueError),
    (lambda fd: ops.read_batch(fd, bytearray(9), [0, 1]), ValueError),            # 9 bytes in 2 equal blocks
    (lambda fd: ops.read_batch(fd, bytearray(8), [0, 1], block_size=5), ValueError),
    (lambda fd: ops.read_batch(fd, bytearray(8), [0, 1], block_size=0), ValueError),
    (lambda fd: ops.read_batch(fd, [bytearray(4)], [0, 1]), ValueError),          # a buffer per offset
    (lambda fd: ops.read_batch(fd, [bytearray(4)], [0], block_size=4), TypeError),
    (lambda fd: ops.read_batch(fd, b"read-only", [0]), TypeError),
    (lambda fd: ops.read_batch(-1, bytearray(8), [0]), ValueError),
    (lambda fd: ops.write_batch(fd, 12345, [0]), TypeError),
])
def test_bad_arguments_fail_at_once_with_a_typed_error(data_file, build, error):
    with pytest.raises(error):
        build(data_file[0])


# --- cancel -----------------------------------------------------------------------------------------------------------

def assert_settled(op, content: bytes, offsets, block: int = BLOCK) -> None:
    """Every block has its real result (with the right bytes) or -ECANCELED; the op's result follows from them."""
    results = list(op.results)
    assert all(result in (block, ECANCELED) for result in results), results
    for index, (result, offset) in enumerate(zip(results, offsets)):
        if result == block:
            assert op.buffer[index * block:(index + 1) * block] == block_of(content, offset, block)
    assert op.result == (ECANCELED if ECANCELED in results else len(results))


def test_cancel_right_after_submit_settles_every_block(backend, data_file):
    fd, content = data_file
    offsets = [(index % 64) * BLOCK for index in range(200)]
    op = ops.read_batch(fd, bytearray(200 * BLOCK), offsets)
    backend.submit(op)
    backend.cancel(op)
    wait_for(backend, op)
    assert_settled(op, content, offsets)
    assert backend.statistics().in_flight == 0


def test_cancel_wins_for_a_batch_no_worker_has_started(tmp_path, data_file):
    """threads and epoll with a single worker, held by a read that waits on an empty pipe: the batch's parts are
    queued, and the cancel settles all of its blocks with -ECANCELED."""
    fd, _content = data_file
    for name, options in (("threads", {"max_workers": 1}), ("epoll", {"file_workers": 1})):
        reader, writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with iokit.open_backend(name, **options) as backend:
                blocker = ops.read_at(reader, bytearray(1))  # the file pool's worker waits in poll(2) on the pipe
                batch = ops.read_batch(fd, bytearray(16 * BLOCK), [0] * 16)
                backend.submit_many([blocker, batch])
                backend.cancel(batch)
                wait_for(backend, batch)
                assert list(batch.results) == [ECANCELED] * 16 and batch.result == ECANCELED
                backend.cancel(blocker)
                wait_for(backend, blocker)
        finally:
            os.close(reader)
            os.close(writer)


def test_cancel_reaches_blocks_the_kernel_holds(empty_pipe):
    """uring reads a pipe at any offset and waits for data: the ASYNC_CANCEL of each block settles it."""
    require_backend("uring")
    reader, writer = empty_pipe
    with iokit.open_backend("uring") as backend:
        op = ops.read_batch(reader, bytearray(3 * 8), [0, 0, 0])
        backend.submit_many([op])
        backend.wait(0.05)
        assert not op.done and list(op.results) != [0, 0, 0]  # in flight: no block has settled
        os.write(writer, b"12345678")  # one block gets these bytes; the other two are cancelled
        backend.wait(0.05)
        backend.cancel(op)
        wait_for(backend, op)
        results = sorted(op.results)
        assert results == [ECANCELED, ECANCELED, 8], list(op.results)
        assert op.result == ECANCELED
        assert b"12345678" in bytes(op.buffer)


def test_cancel_of_blocks_not_yet_in_a_full_sq(empty_pipe):
    """uring with an SQ of 4 and a batch of 40 that waits on a pipe: the blocks never submitted settle at once."""
    require_backend("uring")
    reader, _writer = empty_pipe
    with iokit.open_backend("uring", entries=4) as backend:
        op = ops.read_batch(reader, bytearray(40), [0] * 40)
        backend.submit_many([op])
        backend.wait(0.05)
        backend.cancel(op)
        wait_for(backend, op)
        assert list(op.results) == [ECANCELED] * 40


def test_a_deadline_cancels_a_batch(empty_pipe):
    require_backend("uring")
    reader, _writer = empty_pipe
    with iokit.open_backend("uring") as backend:
        op = ops.read_batch(reader, bytearray(4), [0, 0])
        op.deadline = iokit.current_time() + 0.05
        backend.submit(op)
        wait_for(backend, op, timeout=5)
        assert list(op.results) == [ECANCELED] * 2


def test_cancelling_a_task_settles_its_batch(run, data_file):
    """Through the runtime: a task cancelled while its batch is in flight raises Cancelled or has its result, and
    the backend's table is empty afterwards (the run fixture checks)."""
    fd, content = data_file
    offsets = [(index % 64) * BLOCK for index in range(256)]

    async def main():
        op = ops.read_batch(fd, bytearray(256 * BLOCK), offsets)
        with move_on_after(0):
            await perform(op)
        assert op.done
        assert_settled(op, content, offsets)
        return True

    assert run(main)


# --- pins and the runtime ---------------------------------------------------------------------------------------------

def test_buffers_stay_pinned_until_the_final_completion(backend, data_file):
    fd, content = data_file
    buffer = bytearray(8 * BLOCK)
    op = ops.read_batch(fd, buffer, [index * BLOCK for index in range(8)])
    backend.submit(op)
    if not op.done:
        with pytest.raises(BufferError):
            buffer.extend(b"x")  # exported to the kernel or a worker: it cannot move
    del op
    gc.collect()
    done = []
    for _ in range(200):
        done += [op for op in backend.wait(0.05) if op.kind is iokit.ops.OpKind.READ_BATCH]
        if done:
            break
    else:
        assert False, "the batch never completed"
    assert done[0].buffer.obj is buffer and bytes(buffer) == content[:8 * BLOCK]
    done[0].buffer.release()
    del done
    buffer.extend(b"x")  # released with the completion


def test_through_the_runtime(run, data_file):
    fd, content = data_file

    async def main():
        op = ops.read_batch(fd, bytearray(3 * BLOCK), [2 * BLOCK, 0, len(content) - 10])
        count = await perform(op)
        failing = ops.read_batch(fd, bytearray(2), [0, (1 << 63) - 1])
        with pytest.raises(OSError) as caught:
            await perform(failing)
        return count, list(op.results), caught.value.errno, list(failing.results)

    count, results, error, failing_results = run(main)
    assert count == 3 and results == [BLOCK, BLOCK, 10]
    assert error == errno.EINVAL and failing_results == [1, -errno.EINVAL]


def test_under_the_fault_injector(backend_name, data_file):
    from iokit.backends.faults import FaultyBackend
    fd, content = data_file
    with FaultyBackend(iokit.open_backend(backend_name), seed=3, eintr=0.5, short=0.5, cancel_race=0.5) as backend:
        offsets = [index * BLOCK for index in range(10)]
        op = ops.read_batch(fd, bytearray(10 * BLOCK), offsets)
        backend.submit(op)
        wait_for(backend, op)
        assert list(op.results) == [BLOCK] * 10 and bytes(op.buffer) == content[:10 * BLOCK]


def test_a_cancel_scope_settles_a_batch_waiting_in_the_kernel(empty_pipe):
    require_backend("uring")
    reader, _writer = empty_pipe

    async def main():
        op = ops.read_batch(reader, bytearray(2), [0, 0])
        with move_on_after(0.05) as scope:
            await perform(op)
        return scope.cancelled_caught, list(op.results)

    assert iokit.run(main, backend="uring") == (True, [ECANCELED, ECANCELED])
