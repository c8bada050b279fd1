"""iokit.asyncio's event loop on uring and epoll: asyncio's API over real sockets, pipes, processes and signals.

Each test is an ordinary asyncio program run with ``iokit.asyncio.run(..., backend=...)``; where a transport should
be the native engine's, the test says so (``EngineTransport``), so a silent fallback to asyncio's selector transport
fails. At teardown the process has the fds it had before (engine connections closed, nothing leaked).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading

import pytest

import iokit.asyncio
from iokit.asyncio import EngineTransport

from conftest import fd_count, require_backend, settle

LOOP_BACKENDS = ["epoll", "uring"]


@pytest.fixture(params=LOOP_BACKENDS)
def loop_backend(request) -> str:
    require_backend(request.param)
    before = fd_count()
    yield request.param
    assert settle(lambda: fd_count() <= before), f"fds leaked: {before} before, {fd_count()} after"


def run(loop_backend: str, coro):
    return iokit.asyncio.run(coro, backend=loop_backend)


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def _echo_round_trips(reader, writer, count: int = 50) -> None:
    for i in range(count):
        message = b"message %d " % i * (i + 1)
        writer.write(message)
        assert await reader.readexactly(len(message)) == message


# --- loops and policies -------------------------------------------------------------------------------------------

def test_the_loop_is_on_the_backend_asked_for(loop_backend):
    async def main():
        return asyncio.get_running_loop()
    loop = run(loop_backend, main())
    assert isinstance(loop, asyncio.AbstractEventLoop) and loop.backend_name == loop_backend and loop.is_closed()


def test_runner_and_policy(loop_backend):
    async def main():
        return asyncio.get_running_loop().backend_name
    with asyncio.Runner(loop_factory=iokit.asyncio.loop_factory(loop_backend)) as runner:
        assert runner.run(main()) == loop_backend
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(iokit.asyncio.EventLoopPolicy(loop_backend))
    try:
        assert asyncio.run(main()) == loop_backend
    finally:
        asyncio.set_event_loop_policy(previous)


@pytest.mark.parametrize("name", ["blocking", "threads"])
def test_blocking_and_threads_are_refused_with_a_reason(name):
    with pytest.raises(NotImplementedError, match="runs on epoll or uring"):
        iokit.asyncio.new_event_loop(name)


def test_an_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend"):
        iokit.asyncio.new_event_loop("kqueue")


# --- stream transports on the engine ------------------------------------------------------------------------------

def test_protocol_server_and_stream_client(loop_backend):
    async def main():
        loop = asyncio.get_running_loop()
        protocols = []
        server = await loop.create_server(lambda: protocols.append(Echo()) or protocols[-1], "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert isinstance(writer.transport, EngineTransport)
        await _echo_round_trips(reader, writer)
        (protocol,) = protocols
        assert isinstance(protocol.transport, EngineTransport)
        assert protocol.transport.get_extra_info("peername") == writer.get_extra_info("sockname")
        sock = protocol.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        with pytest.raises(TypeError, match="engine owns"):
            sock.close()
        writer.close()
        await writer.wait_closed()
        assert await asyncio.wait_for(protocol.lost, 5) is None  # the peer's close ended the server side
        assert protocol.transport.fileno() == -1 and sock.fileno() == -1
        server.close()
        await server.wait_closed()
    run(loop_backend, main())


def test_unix_server_and_connection(loop_backend):
    async def main():
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "echo.sock")
            server = await asyncio.start_unix_server(_stream_echo, path)
            reader, writer = await asyncio.open_unix_connection(path)
            assert isinstance(writer.transport, EngineTransport)
            await _echo_round_trips(reader, writer)
            writer.close()
            await writer.wait_closed()
            server.close()
            await server.wait_closed()
    run(loop_backend, main())


async def _stream_echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_half_close_keeps_the_other_direction(loop_backend):
    """eof_received() returning True keeps the transport open: the server answers after the client's write_eof."""
    class Collect(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.data = transport, b""

        def data_received(self, data):
            self.data += data

        def eof_received(self):
            self.transport.write(b"got %d bytes" % len(self.data))
            self.transport.close()
            return True

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Collect, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(b"x" * 100_000)
        writer.write_eof()
        assert await reader.read() == b"got 100000 bytes"
        writer.close()
        server.close()
        await server.wait_closed()
    run(loop_backend, main())


def test_flow_control_pauses_and_resumes_writing(loop_backend):
    """A peer that does not read fills the kernel's buffers; the engine's queue then passes the high-water mark."""
    class Writer(asyncio.Protocol):
        def __init__(self):
            self.paused = asyncio.Event()
            self.resumed = asyncio.Event()

        def connection_made(self, transport):
            self.transport = transport
            transport.set_write_buffer_limits(high=64 * 1024)

        def pause_writing(self):
            self.paused.set()

        def resume_writing(self):
            self.resumed.set()

    async def main():
        loop = asyncio.get_running_loop()
        accepted = asyncio.Queue()
        server = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", 0)
        transport, protocol = await loop.create_connection(Writer, *server.sockets[0].getsockname()[:2])
        reader, writer = await accepted.get()
        chunk = b"y" * 65536
        sent = 0
        while not protocol.paused.is_set() and sent < 64 << 20:
            transport.write(chunk)
            sent += len(chunk)
            await asyncio.sleep(0)
        assert protocol.paused.is_set() and transport.get_write_buffer_size() > 0
        assert transport._protocol_paused
        received = 0
        while received < sent:
            received += len(await reader.read(1 << 20))
        await asyncio.wait_for(protocol.resumed.wait(), 5)
        assert received == sent
        transport.close()
        writer.close()
        server.close()
        await server.wait_closed()
    run(loop_backend, main())


def test_set_protocol_redirects_received_data(loop_backend):
    class First(asyncio.Protocol):
        def __init__(self):
            self.data = []

        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.data.append(data)

    class Second(First):
        def __init__(self):
            super().__init__()
            self.got = asyncio.Event()

        def data_received(self, data):
            super().data_received(data)
            self.got.set()

    async def main():
        loop = asyncio.get_running_loop()
        accepted = asyncio.Queue()
        server = await asyncio.start_server(lambda r, w: accepted.put_nowait(w), "127.0.0.1", 0)
        transport, first = await loop.create_connection(First, *server.sockets[0].getsockname()[:2])
        peer = await accepted.get()
        second = Second()
        transport.set_protocol(second)
        assert transport.get_protocol() is second
        peer.write(b"for the second")
        await asyncio.wait_for(second.got.wait(), 5)
        assert first.data == [] and b"".join(second.data) == b"for the second"
        transport.close()
        peer.close()
        server.close()
        await server.wait_closed()
    run(loop_backend, main())


def test_connection_lost_comes_from_the_loop_not_from_abort(loop_backend):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        transport, protocol = await loop.create_connection(Echo, *server.sockets[0].getsockname()[:2])
        transport.abort()
        assert not protocol.lost.done()  # asyncio calls connection_lost soon after, never inside abort()
        assert await asyncio.wait_for(protocol.lost, 5) is None
        server.close()
        await server.wait_closed()
    run(loop_backend, main())


def test_connection_refused(loop_backend):
    async def main():
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
    run(loop_backend, main())


# --- TLS ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def tls_contexts():
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    return server_context, client_context


def test_tls_server_and_client(loop_backend, tls_contexts):
    server_context, client_context = tls_contexts

    async def main():
        server = await asyncio.start_server(_stream_echo, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context,
                                                       server_hostname="localhost")
        assert writer.get_extra_info("ssl_object").version().startswith("TLS")
        await _echo_round_trips(reader, writer)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
    run(loop_backend, main())


def test_start_tls_on_an_engine_transport(loop_backend, tls_contexts):
    server_context, client_context = tls_contexts

    async def upgrade_then_echo(reader, writer):
        assert await reader.readexactly(9) == b"STARTTLS\n"
        writer.write(b"go\n")
        await writer.drain()
        await writer.start_tls(server_context)
        await _stream_echo(reader, writer)

    async def main():
        server = await asyncio.start_server(upgrade_then_echo, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        assert isinstance(writer.transport, EngineTransport)
        writer.write(b"STARTTLS\n")
        assert await reader.readexactly(3) == b"go\n"
        await writer.start_tls(client_context, server_hostname="localhost")
        assert writer.get_extra_info("ssl_object") is not None
        await _echo_round_trips(reader, writer, 10)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
    run(loop_backend, main())


# --- the rest of asyncio's API, on this loop ----------------------------------------------------------------------

def test_sock_methods(loop_backend):
    async def main():
        loop = asyncio.get_running_loop()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            listener.setblocking(False)
            client = socket.socket()
            client.setblocking(False)
            with client:
                accepting = asyncio.ensure_future(loop.sock_accept(listener))
                await loop.sock_connect(client, listener.getsockname())
                conn, _ = await accepting
                with conn:
                    payload = os.urandom(1 << 20)
                    sending = asyncio.ensure_future(loop.sock_sendall(client, payload))
                    received = bytearray()
                    buffer = bytearray(65536)
                    while len(received) < len(payload):
                        count = await loop.sock_recv_into(conn, buffer)
                        received += buffer[:count]
                    await sending
                    assert received == payload
                    await loop.sock_sendall(conn, b"back")
                    assert await loop.sock_recv(client, 10) == b"back"
    run(loop_backend, main())


def test_add_reader_and_add_writer(loop_backend):
    async def main():
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        try:
            writable = loop.create_future()
            loop.add_writer(write_end, lambda: writable.done() or writable.set_result(True))
            assert await asyncio.wait_for(writable, 5)
            assert loop.remove_writer(write_end)
            got = asyncio.Queue()
            loop.add_reader(read_end, lambda: got.put_nowait(os.read(read_end, 100)))
            threading.Timer(0.05, os.write, (write_end, b"from a thread")).start()
            assert await asyncio.wait_for(got.get(), 5) == b"from a thread"
            assert loop.remove_reader(read_end)
        finally:
            os.close(read_end)
            os.close(write_end)
    run(loop_backend, main())


def test_call_soon_threadsafe_call_later_and_executor(loop_backend):
    async def main():
        loop = asyncio.get_running_loop()
        order = []
        loop.call_later(0.05, order.append, "later")
        loop.call_soon(order.append, "soon")
        woken = loop.create_future()

        def from_another_thread():
            loop.call_soon_threadsafe(woken.set_result, threading.get_ident())
        threading.Timer(0.05, from_another_thread).start()  # the loop is waiting in the backend meanwhile
        assert await asyncio.wait_for(woken, 5) != threading.get_ident()
        assert await loop.run_in_executor(None, sum, range(10)) == 45
        start = loop.time()
        await asyncio.sleep(0.1)
        assert loop.time() - start >= 0.1
        assert order == ["soon", "later"]
        infos = await loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
        assert infos[0][4] == ("127.0.0.1", 80)
    run(loop_backend, main())


def test_signal_handler(loop_backend):
    async def main():
        loop = asyncio.get_running_loop()
        got = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, got.set_result, "usr1")
        try:
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            assert await asyncio.wait_for(got, 5) == "usr1"  # the loop was waiting in the backend when it came
        finally:
            assert loop.remove_signal_handler(signal.SIGUSR1)
    run(loop_backend, main())


def test_datagram_endpoint(loop_backend):
    class UdpEcho(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, address):
            self.transport.sendto(data.upper(), address)

    class Client(asyncio.DatagramProtocol):
        def __init__(self):
            self.replies = asyncio.Queue()

        def datagram_received(self, data, address):
            self.replies.put_nowait(data)

    async def main():
        loop = asyncio.get_running_loop()
        server, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
        client, protocol = await loop.create_datagram_endpoint(Client, remote_addr=server.get_extra_info("sockname"))
        for word in (b"one", b"two", b"three"):
            client.sendto(word)
            assert await asyncio.wait_for(protocol.replies.get(), 5) == word.upper()
        client.close()
        server.close()
    run(loop_backend, main())


def test_subprocess(loop_backend):
    async def main():
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read().upper()); sys.exit(3)",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(process.communicate(b"through a pipe"), 30)
        assert out == b"THROUGH A PIPE" and process.returncode == 3
        shell = await asyncio.create_subprocess_shell("echo $((6 * 7))", stdout=subprocess.PIPE)
        assert (await shell.stdout.read()).strip() == b"42"
        assert await shell.wait() == 0
    run(loop_backend, main())


def test_sendfile_over_an_engine_transport(loop_backend):
    async def main():
        loop = asyncio.get_running_loop()
        content = os.urandom(3 * 1024 * 1024 + 17)
        received = bytearray()
        done = loop.create_future()

        class Sink(asyncio.Protocol):
            def data_received(self, data):
                received.extend(data)

            def eof_received(self):
                done.set_result(None)

        server = await loop.create_server(Sink, "127.0.0.1", 0)
        transport, _ = await loop.create_connection(asyncio.Protocol, *server.sockets[0].getsockname()[:2])
        with tempfile.TemporaryFile() as file:
            file.write(content)
            file.flush()
            file.seek(0)
            assert await loop.sendfile(transport, file, offset=5) == len(content) - 5
        transport.write_eof()
        await asyncio.wait_for(done, 10)
        assert received == content[5:]
        transport.close()
        server.close()
        await server.wait_closed()
    run(loop_backend, main())


def test_many_connections_at_once(loop_backend):
    async def main():
        server = await asyncio.start_server(_stream_echo, "127.0.0.1", 0, backlog=512)
        port = server.sockets[0].getsockname()[1]

        async def one(i):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await _echo_round_trips(reader, writer, 5)
            writer.close()
            await writer.wait_closed()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 60)
        server.close()
        await server.wait_closed()
    run(loop_backend, main())
