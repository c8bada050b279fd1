"""The native engine (csrc/iokit_engine.c) on the two backends that have it, epoll and uring: what it promises beyond
the conformance suite (which runs the same programs on all four backends).

Real sockets on 127.0.0.1, the real kernel ring. Each test says which promise it checks: socket ops make no Python
Op, the writes of one turn leave as one send, a mutable buffer may be reused as soon as sendall returns, received bytes
nobody asks for are bounded on uring, no reference or connection entry is left behind.
"""

from __future__ import annotations

import gc
import os
import socket

import pytest

import iokit
from iokit import TaskGroup, _engine, move_on_after

from iokit.backends.uring import RECV_BUFFER_COUNT, RECV_BUFFER_SIZE

from conftest import require_backend
from test_conformance import LOCALHOST, receive_exactly, tcp_pair

ENGINE_BACKENDS = ["epoll", "uring"]


@pytest.fixture(params=ENGINE_BACKENDS)
def engine_backend(request):
    require_backend(request.param)
    backend = iokit.open_backend(request.param)
    yield backend
    backend.close()


def engine_statistics(backend) -> dict:
    return backend.statistics().extra["engine"]


def test_the_loop_backends_run_tasks_on_the_engine_and_the_others_do_not():
    seen = {}

    async def main():
        seen[iokit.current_backend().name] = iokit.current_task().runtime.engine is not None

    for name in ("blocking", "threads", *ENGINE_BACKENDS):
        require_backend(name)
        iokit.run(main, backend=name)
    assert seen == {"blocking": False, "threads": False, "epoll": True, "uring": True}


def test_socket_ops_make_no_python_op(engine_backend):
    """1,000 round trips on a connection: the backend's Op table sees only the connect (and nothing per message)."""
    rounds = 1000

    async def main():
        client, server = await tcp_pair()
        async with client, server:
            for index in range(rounds):
                await client.sendall(b"%064d" % index)
                assert await receive_exactly(server, 64) == b"%064d" % index
        backend = iokit.current_backend()
        return backend.statistics().submitted, engine_statistics(backend)

    submitted, engine = iokit.run(main, backend=engine_backend)
    assert submitted <= 2, f"{submitted} Ops for {rounds} round trips: the socket path is not on the engine"
    assert engine["traps"] >= 2 * rounds
    assert engine["connections"] == 0 and engine["in_flight"] == 0


def test_the_writes_of_one_turn_leave_as_one_send(engine_backend):
    """A head and a body written back to back (no await that waits in between) reach the kernel in one send."""
    parts = [b"HTTP/1.1 200 OK\r\n", b"Content-Length: 5\r\n\r\n", b"hello"]

    async def main():
        client, server = await tcp_pair()
        async with client, server:
            before = engine_statistics(iokit.current_backend())["sends"]
            for part in parts:
                await server.sendall(part)
            received = await receive_exactly(client, sum(map(len, parts)))
            after = engine_statistics(iokit.current_backend())["sends"]
        return received, after - before

    received, sends = iokit.run(main, backend=engine_backend)
    assert received == b"".join(parts)
    assert sends == 1


def test_a_buffer_can_be_reused_as_soon_as_sendall_returns(engine_backend):
    """sendall of a bytearray returns before the bytes leave (they are queued); the engine must have copied them."""
    async def main():
        client, server = await tcp_pair()
        async with client, server:
            buffer = bytearray(b"a" * 1000)
            await client.sendall(buffer)
            buffer[:] = b"b" * 1000  # overwrite at once: the queued send must not see this
            await client.sendall(memoryview(buffer)[:10])
            return await receive_exactly(server, 1010)

    assert iokit.run(main, backend=engine_backend) == b"a" * 1000 + b"b" * 10


def test_unread_bytes_are_bounded_on_uring():
    """uring's multishot recv takes bytes whether or not a reader waits; past RECV_HIGH_WATER it stops, and the rest
    stays in the kernel (the peer's send waits): an unread connection cannot make the server hold unbounded memory."""
    require_backend("uring")
    total = 8 << 20

    async def main():
        client, server = await tcp_pair()
        async with client, server:
            await client.sendall(b"x")
            await server.receive_some(1)  # arms the multishot recv; nobody reads for the next second
            with move_on_after(1.0):
                await client.sendall(b"x" * total)
            first = len(await server.receive_some(total))  # all the engine held, in one piece
            await client.shutdown_write()
            rest = 0
            while chunk := await server.receive_some(1 << 20):
                rest += len(chunk)
            return first, first + rest

    first, everything = iokit.run(main, backend="uring")
    # The bound, plus what the kernel had put in provided buffers before the multishot's cancel reached it (at most
    # the whole buffer ring).
    ring_bytes = RECV_BUFFER_COUNT * RECV_BUFFER_SIZE
    assert first <= _engine.RECV_HIGH_WATER + ring_bytes, first
    assert first < total // 2
    assert 0 < everything <= total


def test_the_provided_buffers_grow_when_a_burst_finds_none_left():
    """64 connections whose 256 KiB arrive in the same turn need more provided buffers than the 128 given at the
    start (a multishot recv fills one after another while its socket has data): those whose recv found none
    (-ENOBUFS) re-arm, the ring grows, and every byte arrives."""
    require_backend("uring")
    connections, size = 64, 16 * RECV_BUFFER_SIZE

    async def main():
        async with await iokit.open_tcp_listener(LOCALHOST, 0) as listener:
            port = listener.address[1]
            clients, servers = [], []
            for _ in range(connections):
                clients.append(await iokit.connect_tcp(LOCALHOST, port))
                servers.append(await listener.accept())
        received = {}
        started = engine_statistics(iokit.current_backend())["recv_buffers"]

        async def read(number, server):
            received[number] = await receive_exactly(server, size)

        async with TaskGroup() as group:
            for number, server in enumerate(servers):
                group.spawn(read, number, server)
            await iokit.sleep(0.05)  # every reader parked, its multishot recv armed
            for number, client in enumerate(clients):
                await client.sendall(bytes([number % 251]) * size)
        grown = engine_statistics(iokit.current_backend())["recv_buffers"]
        for stream in clients + servers:
            await stream.aclose()
        return started, grown, received

    started, grown, received = iokit.run(main, backend="uring")
    assert started == 128 and 128 < grown <= RECV_BUFFER_COUNT, (started, grown)
    assert all(received[number] == bytes([number % 251]) * size for number in range(connections))


def test_no_reference_is_left_behind(engine_backend):
    """Traps, tasks and connection entries: the counts of live objects come back after 200 connections."""
    async def one_connection():
        client, server = await tcp_pair()
        async with client, server:
            await client.sendall(b"ping")
            await receive_exactly(server, 4)
            await server.sendall(bytearray(b"pong"))
            await receive_exactly(client, 4)

    async def main(count):
        for _ in range(count):
            await one_connection()

    def live(kind) -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if type(obj).__name__ == kind)

    iokit.run(main, 20, backend=engine_backend)  # warm: caches and first-use allocations
    tasks_before = live("Task")
    iokit.run(main, 200, backend=engine_backend)
    assert live("Task") <= tasks_before + 1
    assert engine_backend.statistics().in_flight == 0


def test_a_cancelled_receive_loses_no_byte_on_uring_or_epoll(engine_backend):
    """A receive cancelled while the multishot recv is armed: bytes that arrive afterwards go to the next reader."""
    async def main():
        client, server = await tcp_pair()
        async with client, server:
            with move_on_after(0.05):
                await server.receive_some()
            await client.sendall(b"after the cancel")
            return await receive_exactly(server, 16)

    assert iokit.run(main, backend=engine_backend) == b"after the cancel"


def test_a_cancelled_accept_closes_what_it_accepted(engine_backend):
    """Many accepts cancelled while connections arrive: every connection the kernel made is either handed to a task or
    closed by the engine (the process ends with no extra fd)."""
    async def main():
        async with await iokit.open_tcp_listener("127.0.0.1", 0) as listener:
            port = listener.address[1]
            accepted = []
            async with TaskGroup() as group:
                async def accept_briefly():
                    with move_on_after(0.001):
                        accepted.append(await listener.accept())

                for _ in range(50):
                    group.spawn(accept_briefly)
                    peer = socket.create_connection(("127.0.0.1", port))
                    peer.close()
            for stream in accepted:
                await stream.aclose()

    fds_before = len(os.listdir("/proc/self/fd"))
    iokit.run(main, backend=engine_backend)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds_before


def closed_by_the_other_end(peer: socket.socket) -> bool:
    peer.settimeout(5)
    try:
        return peer.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_made_while_no_task_accepts_wait_for_the_next_acceptor(engine_backend):
    """uring's multishot accept goes on accepting between a server's accept calls: 100 connections made while nobody
    accepts (past the engine's backlog of 64, the rest wait in the kernel's) are all handed out, in order, to the
    accepts that follow; connections nobody took are closed with the listener. No fd is left over."""
    async def main():
        async with await iokit.open_tcp_listener(LOCALHOST, 0, backlog=256) as listener:
            port = listener.address[1]
            first = socket.create_connection((LOCALHOST, port))
            streams = [await listener.accept()]  # the (multishot) accept is now armed
            peers = [socket.create_connection((LOCALHOST, port)) for _ in range(100)]
            for number, peer in enumerate(peers):
                peer.sendall(number.to_bytes(2, "big"))
            await iokit.sleep(0.1)  # nobody accepts meanwhile
            sqes = iokit.current_backend().statistics().extra.get("sqes", 0)
            for _ in range(90):
                streams.append(await listener.accept())
            accept_sqes = iokit.current_backend().statistics().extra.get("sqes", 0) - sqes
            numbers = [int.from_bytes(await receive_exactly(stream, 2), "big") for stream in streams[1:]]
        # The listener is closed: the 10 connections nobody accepted are closed too (with their 2 bytes unread:
        # the kernel resets them).
        ends = [closed_by_the_other_end(peer) for peer in peers[90:]]
        for stream in streams:
            await stream.aclose()
        for peer in [first, *peers]:
            peer.close()
        return numbers, ends, accept_sqes

    fds_before = len(os.listdir("/proc/self/fd"))
    numbers, ends, accept_sqes = iokit.run(main, backend=engine_backend)
    gc.collect()
    assert numbers == list(range(90))
    if engine_backend.name == "uring":  # one accept request made them all (it was re-armed once, after the backlog)
        assert accept_sqes <= 5, accept_sqes
    assert ends == [True] * 10
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_a_close_does_not_wait_for_a_peer_that_never_reads(engine_backend):
    """sendall queues; a close must not wait forever for bytes a peer never takes. After a cancelled send the queue
    is dropped at once (the stream is cut anyway); otherwise it gets ``flush_seconds``."""
    async def main():
        client, server = await tcp_pair()
        with move_on_after(0.3):
            await server.sendall(b"x" * (32 << 20))  # parks past the bound, cancelled there
        started = iokit.current_time()
        await server.aclose()
        after_cancel = iokit.current_time() - started

        client2, server2 = await tcp_pair()
        client2.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server2.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await server2.sendall(b"y" * _engine.SEND_HIGH_WATER)  # at the bound: queued, no wait; the kernel takes little
        started = iokit.current_time()
        await server2.aclose(flush_seconds=0.5)
        after_deadline = iokit.current_time() - started
        await client.aclose()
        await client2.aclose()
        return after_cancel, after_deadline

    after_cancel, after_deadline = iokit.run(main, backend=engine_backend)
    assert after_cancel < 0.2, after_cancel
    assert 0.4 < after_deadline < 2.0, after_deadline


def test_a_large_buffer_can_be_reused_as_soon_as_sendall_returns(engine_backend):
    """Past PIN_AT a mutable buffer is not copied: uring sends it from where it is and sendall returns only once the
    kernel has taken it all; epoll sends it at once and copies only what the kernel did not take. Either way the
    caller may overwrite it the moment sendall returns."""
    size = 4 << 20

    async def main():
        client, server = await tcp_pair()
        async with client, server:
            async with TaskGroup() as group:
                received = bytearray()

                async def read_all():
                    while len(received) < 2 * size:
                        received.extend(await server.receive_some(1 << 20))

                group.spawn(read_all)
                buffer = bytearray(b"a" * size)
                await client.sendall(buffer)
                buffer[:] = b"b" * size  # at once: nothing of the first send may see this
                await client.sendall(memoryview(buffer))
            return bytes(received)

    received = iokit.run(main, backend=engine_backend)
    assert received == b"a" * size + b"b" * size
