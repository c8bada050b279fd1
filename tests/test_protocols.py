"""The protocol interface (iokit.protocols) on every backend: the same callbacks and transport behaviour whether the
native engine calls the protocol from C (epoll, uring) or two tasks drive it over a stream (blocking, threads).

Real sockets on 127.0.0.1; the peer is a plain iokit stream, so each test reads as one conversation.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys

import pytest

import iokit
from iokit import TaskGroup, move_on_after, protocols

from test_conformance import receive_exactly, receive_until_eof

pytestmark = pytest.mark.timeout(60)


class Recorder(protocols.Protocol):
    """Writes back what it receives (unless told not to) and records every callback."""

    def __init__(self, echo: bool = True, keep_open_on_eof: bool = False) -> None:
        self.echo = echo
        self.keep_open_on_eof = keep_open_on_eof
        self.events: list = []
        self.received = bytearray()
        self.lost = iokit.Event()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(data)

    def eof_received(self):
        self.events.append("eof")
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    def connection_lost(self, exc) -> None:
        self.events.append(("lost", exc))
        self.lost.set()


async def served(protocol, body):
    """Run ``body(client)`` against one connection driven by ``protocol``; return what body returns."""
    async with await iokit.open_tcp_listener("127.0.0.1", 0) as listener:
        async with TaskGroup() as group:
            async def drive_one():
                stream = await listener.accept()
                await protocols.drive(stream, protocol)

            group.spawn(drive_one)
            client = await iokit.connect_tcp("127.0.0.1", listener.address[1])
            async with client:
                result = await body(client)
            with move_on_after(5):
                await protocol.lost.wait()
    return result


def test_echo_then_the_peer_closes(run):
    protocol = Recorder()

    async def body(client):
        replies = []
        for index in range(200):
            message = b"message %03d" % index
            await client.sendall(message)
            replies.append(await receive_exactly(client, len(message)))
        await client.shutdown_write()
        return replies, await receive_until_eof(client)

    replies, rest = run(served, protocol, body)
    assert replies == [b"message %03d" % index for index in range(200)]
    assert rest == b""
    assert protocol.events == ["made", "eof", ("lost", None)]


def test_a_protocol_with_only_data_received_echoes_and_is_closed_at_the_peer_s_end(run):
    # Not our base class: connection_made, eof_received, pause/resume_writing and connection_lost are all optional.
    class Bare:
        def __init__(self):
            self.transports = []

        def data_received(self, data: bytes) -> None:
            self.transports[0].write(data)

    bare = Bare()

    async def main():
        async with await iokit.open_tcp_listener("127.0.0.1", 0) as listener:
            async with TaskGroup() as group:
                async def drive_one():
                    stream = await listener.accept()
                    with move_on_after(5):
                        await protocols.drive(stream, _MadeRecorder(bare))

                group.spawn(drive_one)
                async with await iokit.connect_tcp("127.0.0.1", listener.address[1]) as client:
                    await client.sendall(b"ping")
                    assert await receive_exactly(client, 4) == b"ping"
                    await client.shutdown_write()
                    assert await receive_until_eof(client) == b""  # no eof_received: the transport closed
    run(main)


class _MadeRecorder:
    """Forwards data_received to a bare protocol and keeps its transport, having no other method either."""

    def __init__(self, bare) -> None:
        self.bare = bare
        self.data_received = bare.data_received

    def __getattr__(self, name):
        if name == "connection_made":
            return self.bare.transports.append
        raise AttributeError(name)


def test_eof_received_true_keeps_the_transport_open_for_writing(run):
    protocol = Recorder(echo=False, keep_open_on_eof=True)

    async def body(client):
        await client.sendall(b"question")
        await client.shutdown_write()
        while "eof" not in protocol.events:
            await iokit.sleep(0.01)
        protocol.transport.write(b"answer after your eof")
        protocol.transport.close()
        return await receive_until_eof(client)

    assert run(served, protocol, body) == b"answer after your eof"
    assert bytes(protocol.received) == b"question"
    assert protocol.events[-1] == ("lost", None)


def test_write_buffer_limits_pause_and_resume_writing(run):
    protocol = Recorder(echo=False)
    chunk = b"z" * 65536

    async def body(client):
        while protocol.transport is None:
            await iokit.sleep(0.01)
        protocol.transport.set_write_buffer_limits(high=64 * 1024)
        assert protocol.transport.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
        for _ in range(200):  # 12.5 MiB, far past what the kernel buffers while nobody reads
            protocol.transport.write(chunk)
        paused = "pause_writing" in protocol.events
        received = len(await receive_exactly(client, 200 * len(chunk)))
        for _ in range(100):
            if "resume_writing" in protocol.events:
                break
            await iokit.sleep(0.01)
        protocol.transport.close()
        return paused, received

    paused, received = run(served, protocol, body)
    assert paused
    assert received == 200 * 65536
    assert protocol.events.index("pause_writing") < protocol.events.index("resume_writing")


def test_pause_reading_holds_data_received_and_loses_nothing(run):
    protocol = Recorder(echo=False)

    async def body(client):
        while protocol.transport is None:
            await iokit.sleep(0.01)
        protocol.transport.pause_reading()
        assert not protocol.transport.is_reading()
        await client.sendall(b"held back")
        await iokit.sleep(0.2)
        while_paused = bytes(protocol.received)
        protocol.transport.resume_reading()
        for _ in range(200):
            if len(protocol.received) == 9:
                break
            await iokit.sleep(0.01)
        protocol.transport.close()
        return while_paused

    assert run(served, protocol, body) == b""
    assert bytes(protocol.received) == b"held back"


def test_what_resume_reading_delivers_wakes_a_waiting_task_at_once(run):
    """On epoll the bytes that waited in the socket are read, and data_received called, by the flush that starts the
    next turn. A task that data_received wakes must run in that turn, not after the wait that follows (which,
    with nothing more to come, would block until the deadline)."""
    class Notifier(Recorder):
        def __init__(self) -> None:
            super().__init__(echo=False)
            self.arrived = iokit.Event()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.arrived.set()

    protocol = Notifier()

    async def body(client):
        while protocol.transport is None:
            await iokit.sleep(0.01)
        protocol.transport.pause_reading()
        await client.sendall(b"held back")
        await iokit.sleep(0.2)  # the bytes are in the server's socket (or its queue), the edge long gone
        started = iokit.current_time()
        protocol.transport.resume_reading()
        with move_on_after(5):
            await protocol.arrived.wait()
        waited = iokit.current_time() - started
        protocol.transport.close()
        return waited

    waited = run(served, protocol, body)
    assert bytes(protocol.received) == b"held back"
    assert waited < 2.5, f"the woken task waited {waited:.1f} s for a turn"


def test_writes_to_a_peer_that_reset_end_in_connection_lost_with_the_error(run):
    """The peer resets; the protocol goes on writing. Once the kernel refuses a send the connection is lost, and
    connection_lost gets the OSError (asyncio's transports do the same): writes never vanish silently."""
    protocol = Recorder(echo=False)

    async def body(client):
        while protocol.transport is None:
            await iokit.sleep(0.01)
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.socket.close()  # RST
        with move_on_after(10):
            while not protocol.lost.is_set():
                protocol.transport.write(b"w" * 65536)
                await iokit.sleep(0.01)

    with contextlib.suppress(OSError):
        run(served, protocol, body)
    lost = [event for event in protocol.events if isinstance(event, tuple) and event[0] == "lost"]
    assert len(lost) == 1, protocol.events
    assert isinstance(lost[0][1], OSError), lost


def test_abort_ends_a_connection_whose_send_waits_for_a_peer_that_never_reads(run):
    """16 MiB queued to a peer that reads nothing, and reading paused (on uring no recv is then armed, whose cancel
    would take the send's along): a send waits in the kernel for room. abort() must not wait for it:
    connection_lost comes at once (the send is cancelled)."""
    protocol = Recorder(echo=False)

    async def body(client):
        while protocol.transport is None:
            await iokit.sleep(0.01)
        protocol.transport.pause_reading()
        await iokit.sleep(0.05)
        for _ in range(256):
            protocol.transport.write(b"a" * 65536)
        await iokit.sleep(0.3)  # the kernel's buffers are full, a send waits
        protocol.transport.abort()
        with move_on_after(5):
            await protocol.lost.wait()
        return protocol.lost.is_set()

    assert run(served, protocol, body)
    assert [event for event in protocol.events if isinstance(event, tuple)] == [("lost", None)]


def test_eof_received_is_called_once_on_a_half_open_transport(run):
    """eof_received returning true keeps the transport open for writing; what follows (reading paused and resumed,
    events that still say the peer hung up) must not report the end again."""
    protocol = Recorder(echo=False, keep_open_on_eof=True)

    async def body(client):
        await client.sendall(b"last words")
        await client.shutdown_write()
        for _ in range(300):
            if "eof" in protocol.events:
                break
            await iokit.sleep(0.01)
        protocol.transport.pause_reading()
        await iokit.sleep(0.02)
        protocol.transport.resume_reading()
        for _ in range(5):  # more events on the server's side of the socket: sends, their completions
            protocol.transport.write(b"still here")
            await iokit.sleep(0.02)
        answer = await receive_exactly(client, 50)
        protocol.transport.close()
        return answer

    assert run(served, protocol, body) == b"still here" * 5
    assert bytes(protocol.received) == b"last words"
    assert protocol.events.count("eof") == 1, protocol.events


def test_abort_drops_the_queue_and_ends_the_connection(run):
    protocol = Recorder(echo=False)

    async def body(client):
        while protocol.transport is None:
            await iokit.sleep(0.01)
        protocol.transport.write(b"x" * (8 << 20))  # far more than the kernel takes while nobody reads
        protocol.transport.abort()
        assert protocol.transport.is_closing()
        protocol.transport.write(b"dropped: the connection is gone")
        received = 0
        try:
            while chunk := await client.receive_some(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        return received

    assert run(served, protocol, body) < 8 << 20
    assert protocol.events[-1] == ("lost", None)


def test_a_callback_that_raises_ends_only_its_connection(run, monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_value))

    class Faulty(Recorder):
        def data_received(self, data: bytes) -> None:
            if data == b"boom":
                raise ValueError("the protocol's own bug")
            super().data_received(data)

    protocol = Faulty()

    async def body(client):
        await client.sendall(b"fine")
        assert await receive_exactly(client, 4) == b"fine"
        await client.sendall(b"boom")
        return await receive_until_eof(client)

    assert run(served, protocol, body) == b""
    lost = protocol.events[-1]
    assert lost[0] == "lost" and isinstance(lost[1], ValueError)
    assert [type(error) for error in reported] == [ValueError]


def test_a_method_whose_lookup_fails_later_is_the_protocol_s_failure(run, monkeypatch):
    # The engine looks eof_received up when it calls it: a lookup that raises (a property, __getattr__) must end the
    # connection as a raising callback does. It left the exception set in C: SystemError further on, and
    # connection_lost got None.
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_value))

    class LookupFails(Recorder):
        fail_lookup = False

        @property
        def eof_received(self):
            if self.fail_lookup:
                raise RuntimeError("the lookup of eof_received failed")
            return super().eof_received

        def data_received(self, data: bytes) -> None:
            self.fail_lookup = True
            super().data_received(data)

    protocol = LookupFails()

    async def body(client):
        await client.sendall(b"ping")
        assert await receive_exactly(client, 4) == b"ping"
        await client.shutdown_write()
        return await receive_until_eof(client)

    assert run(served, protocol, body) == b""
    lost = protocol.events[-1]
    assert lost[0] == "lost" and isinstance(lost[1], RuntimeError), protocol.events
    assert [type(error) for error in reported] == [RuntimeError]


def test_write_after_close_is_an_error_and_get_extra_info_names_the_peer(run):
    protocol = Recorder(echo=False)

    async def body(client):
        while protocol.transport is None:
            await iokit.sleep(0.01)
        peer = protocol.transport.get_extra_info("peername")
        protocol.transport.close()
        with pytest.raises(RuntimeError):
            protocol.transport.write(b"too late")
        return peer, client.socket.getsockname()

    peer, client_address = run(served, protocol, body)
    assert tuple(peer[:2]) == tuple(client_address[:2])


def test_serve_aborts_open_connections_when_cancelled(run):
    protocols_made: list[Recorder] = []

    def factory():
        protocols_made.append(Recorder())
        return protocols_made[-1]

    async def main():
        async with await iokit.open_tcp_listener("127.0.0.1", 0) as listener:
            clients = []
            async with TaskGroup() as group:
                group.spawn(protocols.serve, listener, factory)
                for _ in range(5):
                    client = await iokit.connect_tcp("127.0.0.1", listener.address[1])
                    await client.sendall(b"hi")
                    assert await receive_exactly(client, 2) == b"hi"
                    clients.append(client)
                group.cancel_scope.cancel()
            # serve returned: every connection has had connection_lost, and the clients see the end.
            ends = [await receive_until_eof(client) for client in clients]
            for client in clients:
                await client.aclose()
            return ends

    assert run(main) == [b""] * 5
    assert [protocol.events[-1] for protocol in protocols_made] == [("lost", None)] * 5


def test_connect_drives_a_client_protocol(run):
    async def main():
        async with await iokit.open_tcp_listener("127.0.0.1", 0) as listener:
            async with TaskGroup() as group:
                async def echo_once():
                    stream = await listener.accept()
                    async with stream:
                        await stream.sendall(await receive_exactly(stream, 5))

                group.spawn(echo_once)
                transport, protocol = await protocols.connect("127.0.0.1", listener.address[1],
                                                              lambda: Recorder(echo=False))
                transport.write(b"hello")
                with move_on_after(5):
                    await protocol.lost.wait()  # echo_once closes after its one reply: eof, then lost
            return bytes(protocol.received), protocol.events

    received, events = run(main)
    assert received == b"hello"
    assert events == ["made", "eof", ("lost", None)]
