"""Conformance: the same program, through the runtime, behaves the same on every backend.

Each test runs once per backend (the ``run`` fixture) and asserts one expected outcome, so a backend that differs from
the others (the blocking backend being the reference) fails. Real files in ``tmp_path``, real TCP over 127.0.0.1
(and ::1 where the machine has it), no mocks.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import pytest

import iokit
from iokit import Cancelled, TaskGroup, fail_after, move_on_after, ops, perform, sleep

LOCALHOST = "127.0.0.1"


async def tcp_pair(host: str = LOCALHOST) -> tuple[iokit.SocketStream, iokit.SocketStream]:
    """A connected (client, server) pair of streams; the listener is closed again."""
    async with await iokit.open_tcp_listener(host, 0) as listener:
        client = await iokit.connect_tcp(host, listener.address[1])
        try:
            server = await listener.accept()
        except BaseException:
            await client.aclose()
            raise
    return client, server


async def receive_exactly(stream: iokit.SocketStream, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = await stream.recv_into(view[got:])
        if count == 0:
            break
        got += count
    view.release()
    return bytes(buffer[:got])


async def receive_until_eof(stream: iokit.SocketStream, chunk: int = 1 << 18) -> bytes:
    parts = []
    while True:
        data = await stream.receive_some(chunk)
        if not data:
            return b"".join(parts)
        parts.append(data)


def set_linger_zero(stream: iokit.SocketStream) -> None:
    """Make the next close send a RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# --- files ------------------------------------------------------------------------------------------------------------

def test_file_round_trip_at_offsets(run, tmp_path):
    path = tmp_path / "data"

    async def main():
        async with await iokit.open_file(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600) as file:
            assert await file.write_at(b"hello", 0) == 5
            assert await file.write_at(b"world", 100) == 5
            assert await file.write_at(b"HE", 0) == 2   # overwrite in place
            whole = await file.read_at(4096, 0)          # short read: the file is 105 bytes
            middle = await file.read_at(10, 3)
            tail = await file.read_at(10, 100)           # short read at the end
            at_eof = await file.read_at(10, 105)         # 0 bytes at EOF
            past_eof = await file.read_at(10, 1 << 20)   # and past it
            return whole, middle, tail, at_eof, past_eof

    whole, middle, tail, at_eof, past_eof = run(main)
    assert whole == b"HEllo" + bytes(95) + b"world"
    assert middle == b"lo" + bytes(8)
    assert tail == b"world"
    assert at_eof == b"" and past_eof == b""
    assert path.read_bytes() == whole


def test_file_ops_through_perform(run, tmp_path):
    path = tmp_path / "raw"

    async def main():
        fd = await perform(ops.open_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640))
        try:
            written = await perform(ops.write_at(fd, b"0123456789", 0))
            buffer = bytearray(4)
            count = await perform(ops.read_at(fd, buffer, 6))
            eof = await perform(ops.read_at(fd, bytearray(4), 10))
            await perform(ops.fsync(fd))
            await perform(ops.fdatasync(fd))
        finally:
            await perform(ops.close(fd))
        with pytest.raises(OSError) as closed:
            await perform(ops.read_at(fd, bytearray(1), 0))
        return written, count, bytes(buffer), eof, closed.value.errno

    assert run(main) == (10, 4, b"6789", 0, errno.EBADF)
    assert path.read_bytes() == b"0123456789"
    assert path.stat().st_mode & 0o777 == 0o640


def test_large_file_round_trip(run, tmp_path):
    data = os.urandom(3 << 20)
    path = tmp_path / "large"

    async def main():
        async with await iokit.open_file(path, os.O_RDWR | os.O_CREAT, 0o600) as file:
            await file.write_all_at(data, 4096)
            await file.fsync()
            return await file.read_at(len(data) + 8192, 0)

    back = run(main)
    assert len(back) == 4096 + len(data)
    assert back[:4096] == bytes(4096) and back[4096:] == data


def test_vectored_io(run, tmp_path):
    path = tmp_path / "vectored"

    async def main():
        async with await iokit.open_file(path, os.O_RDWR | os.O_CREAT, 0o600) as file:
            fd = file.fileno()
            written = await perform(ops.writev_at(fd, [b"abc", bytearray(b"defg"), memoryview(b"hij")], 10))
            first, second, third = bytearray(2), bytearray(5), bytearray(10)
            read = await perform(ops.readv_at(fd, [first, second, third], 11))
            at_eof = await perform(ops.readv_at(fd, [bytearray(3), bytearray(3)], 20))
            await file.fdatasync()
            return written, read, bytes(first), bytes(second), bytes(third[:2]), at_eof

    assert run(main) == (10, 9, b"bc", b"defgh", b"ij", 0)
    assert path.read_bytes() == bytes(10) + b"abcdefghij"


def test_open_errors(run, tmp_path):
    (tmp_path / "exists").write_bytes(b"x")

    async def main():
        outcomes = []
        for name, flags in (("missing", os.O_RDONLY), ("exists", os.O_RDWR | os.O_CREAT | os.O_EXCL),
                            (".", os.O_RDWR)):
            try:
                file = await iokit.open_file(tmp_path / name, flags)
            except OSError as exc:
                outcomes.append(type(exc))
            else:
                await file.aclose()
                outcomes.append(None)
        return outcomes

    assert run(main) == [FileNotFoundError, FileExistsError, IsADirectoryError]


def test_write_to_a_read_only_file_fails_with_ebadf(run, tmp_path):
    path = tmp_path / "ro"
    path.write_bytes(b"abc")

    async def main():
        async with await iokit.open_file(path, os.O_RDONLY) as file:
            with pytest.raises(OSError) as info:
                await file.write_at(b"x", 0)
            return info.value.errno

    assert run(main) == errno.EBADF


# --- sockets ----------------------------------------------------------------------------------------------------------

def test_accept_and_connect(run):
    async def main():
        async with await iokit.open_tcp_listener(LOCALHOST, 0) as listener:
            host, port = listener.address
            async with await iokit.connect_tcp(LOCALHOST, port) as client:
                async with await listener.accept() as server:
                    peer = server.socket.getpeername()
                    local = client.socket.getsockname()
                    nodelay = client.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                    return host, peer == local, nodelay != 0, server.socket.getblocking()

    assert run(main) == (LOCALHOST, True, True, False)


def test_connect_to_a_closed_port_is_refused(run):
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused

        async def main():
            with pytest.raises(ConnectionRefusedError):
                await iokit.connect_tcp(LOCALHOST, port)

        run(main)


async def echo_through_a_connection(data: bytes) -> bytes:
    """Send ``data`` through a TCP echo (server task: recv, sendall, until end of stream); return what came back."""
    client, server = await tcp_pair()
    async with client, server:
        async def echo():
            while chunk := await server.receive_some():
                await server.sendall(chunk)
            await server.shutdown_write()

        async def send():
            await client.sendall(data)
            await client.shutdown_write()

        async with TaskGroup() as group:
            group.spawn(echo)
            group.spawn(send)
            return await receive_until_eof(client)


@pytest.mark.parametrize("size", [1, 64 << 10, 1 << 20, 8 << 20], ids=["1B", "64KiB", "1MiB", "8MiB"])
def test_echo(run, size):
    data = os.urandom(size)
    echoed = run(echo_through_a_connection, data)
    assert len(echoed) == size
    assert echoed == data


def test_peer_close_gives_empty_bytes(run):
    async def main():
        client, server = await tcp_pair()
        async with server:
            await client.sendall(b"last words")
            await client.aclose()
            first = await receive_exactly(server, 10)
            return first, await server.receive_some(), await server.receive_some()

    assert run(main) == (b"last words", b"", b"")


def test_shutdown_write_half_closes(run):
    async def main():
        client, server = await tcp_pair()
        async with client, server:
            await client.shutdown_write()
            eof = await server.receive_some()
            await server.sendall(b"still open")  # the other direction still works
            return eof, await receive_exactly(client, 10)

    assert run(main) == (b"", b"still open")


def test_reset_by_peer_gives_connection_reset_error(run):
    async def main():
        client, server = await tcp_pair()
        async with server:
            set_linger_zero(client)
            await client.aclose()
            with pytest.raises(ConnectionResetError):
                with fail_after(5):
                    await server.receive_some()

    run(main)


def test_send_to_a_closed_peer_fails(run):
    async def main():
        client, server = await tcp_pair()
        async with client:
            await server.aclose()
            with fail_after(10):
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    for _ in range(1000):
                        await client.sendall(b"x" * 1024)
                        await sleep(0.005)

    run(main)


@pytest.mark.timeout(60)
def test_sendall_32_mib_to_a_slow_reader(run):
    data = os.urandom(32 << 20)

    async def main():
        client, server = await tcp_pair()
        async with client, server:
            stalls = 0

            async def send():
                await client.sendall(data)
                await client.shutdown_write()

            async with TaskGroup() as group:
                group.spawn(send)
                buffer = bytearray(len(data) + 1)
                view = memoryview(buffer)
                got = reads = 0
                await sleep(0.05)  # let the sender fill the socket buffers and wait for room
                while True:
                    count = await server.recv_into(view[got:got + (64 << 10)])
                    if count == 0:
                        break
                    got += count
                    reads += 1
                    if reads % 16 == 0:
                        stalls += 1
                        await sleep(0.002)
                view.release()
        return bytes(buffer[:got]), stalls

    received, stalls = run(main)
    assert stalls > 10
    assert len(received) == len(data)
    assert received == data


@pytest.mark.timeout(60)
def test_cancelled_sendall_reports_bytes_sent(run):
    data = os.urandom(32 << 20)

    async def main():
        client, server = await tcp_pair()
        async with client, server:
            outcome = {}
            with move_on_after(0.3) as scope:
                try:
                    await client.sendall(data)
                except Cancelled as exc:
                    outcome["sent"] = exc.bytes_sent
                    raise
            assert scope.cancelled_caught
            await client.shutdown_write()
            received = await receive_until_eof(server)
        return outcome["sent"], received

    sent, received = run(main)
    assert 0 < sent < len(data)
    assert len(received) == sent
    assert received == data[:sent]


# --- timeouts and cancellation ------------------------------------------------------------------------------------------

CANCEL_WAYS = ["move_on_after", "fail_after", "task.cancel"]


async def blocked_then_cancelled(way: str, blocking_call) -> tuple[str, float]:
    """Run ``blocking_call()`` (which waits forever) and cut it short the ``way`` asked; return what was seen."""
    started = time.monotonic()
    if way == "move_on_after":
        with move_on_after(0.2) as scope:
            await blocking_call()
        outcome = "moved on" if scope.cancelled_caught else "returned"
    elif way == "fail_after":
        try:
            with fail_after(0.2):
                await blocking_call()
            outcome = "returned"
        except TimeoutError:
            outcome = "timed out"
    else:
        async with TaskGroup() as group:
            task = group.spawn(blocking_call)
            await sleep(0.2)
            task.cancel()
            await task.wait()
        try:
            task.result()
            outcome = "returned"
        except Cancelled:
            outcome = "cancelled"
    return outcome, time.monotonic() - started


EXPECTED = {"move_on_after": "moved on", "fail_after": "timed out", "task.cancel": "cancelled"}


@pytest.mark.parametrize("way", CANCEL_WAYS)
def test_cancel_a_blocked_recv_then_the_stream_still_works(run, way):
    async def main():
        client, server = await tcp_pair()
        async with client, server:
            outcome, elapsed = await blocked_then_cancelled(way, server.receive_some)
            await client.sendall(b"after the cancel")
            after = await receive_exactly(server, 16)
            await server.sendall(b"reply")
            reply = await receive_exactly(client, 5)
        return outcome, elapsed, after, reply

    outcome, elapsed, after, reply = run(main)
    assert outcome == EXPECTED[way]
    assert 0.15 <= elapsed < 3, elapsed
    assert after == b"after the cancel" and reply == b"reply"


@pytest.mark.parametrize("way", CANCEL_WAYS)
def test_cancel_a_blocked_accept_then_the_listener_still_works(run, way):
    async def main():
        async with await iokit.open_tcp_listener(LOCALHOST, 0) as listener:
            outcome, elapsed = await blocked_then_cancelled(way, listener.accept)
            async with await iokit.connect_tcp(LOCALHOST, listener.address[1]) as client:
                async with await listener.accept() as server:
                    await client.sendall(b"hi")
                    greeting = await receive_exactly(server, 2)
        return outcome, elapsed, greeting

    outcome, elapsed, greeting = run(main)
    assert outcome == EXPECTED[way]
    assert 0.15 <= elapsed < 3, elapsed
    assert greeting == b"hi"


@pytest.mark.timeout(60)
def test_recvs_cancelled_while_bytes_arrive_lose_no_byte(run):
    """Cancel-versus-completion race: a receiver keeps cutting its recvs short while a sender trickles bytes in.
    Whichever wins each race, every byte arrives exactly once, in order."""
    total = 300
    data = bytes(index % 251 for index in range(total))

    async def main():
        client, server = await tcp_pair()
        async with client, server:
            async def trickle():
                for index in range(total):
                    await client.sendall(data[index:index + 1])
                    if index % 3 == 0:
                        await sleep(0.0005)
                await client.shutdown_write()

            received = bytearray()
            timeouts = (0, 0.0002, 0.0005, 0.001, 0.003)
            async with TaskGroup() as group:
                group.spawn(trickle)
                rounds = 0
                while True:
                    rounds += 1
                    chunk = None
                    with move_on_after(timeouts[rounds % len(timeouts)]):
                        chunk = await server.receive_some(7)
                    if chunk is None:
                        continue
                    if not chunk:
                        break
                    received += chunk
        return bytes(received)

    assert run(main) == data


def test_a_deadline_reaches_an_op_in_flight(run):
    async def main():
        client, server = await tcp_pair()
        async with client, server:
            started = time.monotonic()
            with move_on_after(0.25) as scope:
                await server.receive_some()
            return scope.cancelled_caught, time.monotonic() - started

    caught, elapsed = run(main)
    assert caught and 0.2 <= elapsed < 3, elapsed


def test_error_in_main_with_ops_in_flight_cancels_and_closes(run):
    """run() ends with the main task's error while children wait on a recv and an accept: they are cancelled, their
    ops settle, and nothing is left in flight (the fixture checks the backend)."""
    async def main():
        client, server = await tcp_pair()
        async with client, server, await iokit.open_tcp_listener(LOCALHOST, 0) as listener:
            async with TaskGroup() as group:
                group.spawn(server.receive_some)
                group.spawn(listener.accept)
                await sleep(0.1)
                raise KeyError("main failed")

    with pytest.raises(KeyError):
        run(main)


def test_closing_the_runtime_backend_with_ops_in_flight(run):
    """Closing the backend under the runtime cancels the ops in flight: the task parked on one is woken (with
    Cancelled, as on the blocking reference backend), the program goes on, and later ops raise BackendClosed."""
    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        try:
            seen = {}

            async def reader():
                try:
                    await perform(ops.recv(a.fileno(), 16))
                    seen["reader"] = "returned"
                except BaseException as exc:
                    seen["reader"] = type(exc).__name__
                    raise

            async with TaskGroup() as group:
                group.spawn(reader)
                await sleep(0.1)
                backend = iokit.current_backend()
                assert backend.statistics().in_flight == 1
                backend.close()
                assert backend.statistics().in_flight == 0
            with pytest.raises(iokit.BackendClosed):
                await perform(ops.nop())
            return seen["reader"]
        finally:
            a.close()
            b.close()

    assert run(main) in ("Cancelled", "BackendClosed")


def test_the_runtime_keeps_working_after_its_backend_is_closed(run):
    """After close() the tasks can still sleep, time out and wake each other (no op needed), and no stray wake-up
    lands on an fd opened after the close (a closed eventfd's number is reused by the next socket)."""

    async def main():
        iokit.current_backend().close()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        try:
            started = time.monotonic()
            await sleep(0.05)
            slept = time.monotonic() - started
            with move_on_after(0.05) as scope:
                await sleep_forever_without_ops()
            event = iokit.Event()

            async def setter():
                await sleep(0.02)
                event.set()

            async with TaskGroup() as group:
                group.spawn(setter)
                with fail_after(2):
                    await event.wait()
            stray = b""
            for sock in (a, b):
                try:
                    stray += sock.recv(64)
                except BlockingIOError:
                    pass
            return slept >= 0.04, scope.cancelled_caught, stray
        finally:
            a.close()
            b.close()

    assert run(main) == (True, True, b"")


async def sleep_forever_without_ops():
    await iokit.sleep_forever()


# --- ops seen the same way everywhere -----------------------------------------------------------------------------------

def test_poll_op_reports_readiness(run):
    import select

    async def main():
        client, server = await tcp_pair()
        async with client, server:
            writable = await perform(ops.poll(client.fileno(), select.POLLOUT))

            async def later():
                await sleep(0.05)
                await client.sendall(b"!")

            async with TaskGroup() as group:
                group.spawn(later)
                started = time.monotonic()
                readable = await perform(ops.poll(server.fileno(), select.POLLIN))
                waited = time.monotonic() - started
            return bool(writable & select.POLLOUT), bool(readable & select.POLLIN), waited, \
                await server.receive_some()

    writable, readable, waited, data = run(main)
    assert writable and readable and data == b"!"
    assert waited >= 0.03


def test_recv_with_msg_peek_leaves_the_bytes(run):
    async def main():
        client, server = await tcp_pair()
        async with client, server:
            await client.sendall(b"peekaboo")
            await sleep(0.02)
            peeked = await perform(ops.recv(server.fileno(), 4, socket.MSG_PEEK))
            return peeked, await receive_exactly(server, 8)

    assert run(main) == (4, b"peekaboo")


def test_reads_and_writes_at_the_file_position(run, tmp_path):
    path = tmp_path / "positional"

    async def main():
        fd = await perform(ops.open_file(path, os.O_RDWR | os.O_CREAT, 0o600))
        try:
            assert await perform(ops.write_at(fd, b"abc")) == 3        # offset -1: at the file position
            assert await perform(ops.write_at(fd, b"def")) == 3
            position_after_writes = os.lseek(fd, 0, os.SEEK_CUR)
            os.lseek(fd, 1, os.SEEK_SET)
            buffer = bytearray(2)
            count = await perform(ops.read_at(fd, buffer))
            position_after_read = os.lseek(fd, 0, os.SEEK_CUR)
            return position_after_writes, count, bytes(buffer), position_after_read
        finally:
            await perform(ops.close(fd))

    assert run(main) == (6, 2, b"bc", 3)
    assert path.read_bytes() == b"abcdef"


def test_new_fds_are_close_on_exec_and_accepted_sockets_non_blocking(run, tmp_path):
    import fcntl

    async def main():
        fd = await perform(ops.open_file(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600))
        file_cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
        await perform(ops.close(fd))
        async with await iokit.open_tcp_listener(LOCALHOST, 0) as listener:
            async with await iokit.connect_tcp(LOCALHOST, listener.address[1]):
                accepted = await perform(ops.accept(listener.socket.fileno()))
                try:
                    accepted_cloexec = bool(fcntl.fcntl(accepted, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                    accepted_nonblocking = bool(fcntl.fcntl(accepted, fcntl.F_GETFL) & os.O_NONBLOCK)
                finally:
                    await perform(ops.close(accepted))
        return file_cloexec, accepted_cloexec, accepted_nonblocking

    assert run(main) == (True, True, True)


# --- IPv6 ----------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_loopback_echo(run):
    data = os.urandom(100_000)

    async def main():
        client, server = await tcp_pair("::1")
        async with client, server:
            assert client.socket.family == socket.AF_INET6
            await client.sendall(data)
            await client.shutdown_write()
            got = await receive_until_eof(server)
            await server.sendall(got[:10])
            return got, await receive_exactly(client, 10)

    got, reply = run(main)
    assert got == data and reply == data[:10]


def test_a_refused_connect_leaves_the_next_connect_working(run):
    """A connect that failed after waiting must not leave its fd's registration behind (epoll): the next socket that
    gets the same number would never see its readiness, and its connect would hang."""
    async def main():
        unused = socket.socket()
        unused.bind((LOCALHOST, 0))
        refused_port = unused.getsockname()[1]
        unused.close()  # nobody listens there
        for _ in range(3):
            with pytest.raises(ConnectionRefusedError):
                await iokit.connect_tcp(LOCALHOST, refused_port)
        async with await iokit.open_tcp_listener(LOCALHOST, 0) as listener:
            with fail_after(5):
                client = await iokit.connect_tcp(LOCALHOST, listener.address[1])
                server = await listener.accept()
            async with client, server:
                await client.sendall(b"ok")
                return await receive_exactly(server, 2)

    assert run(main) == b"ok"
