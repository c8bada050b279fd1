"""The HTTP/1.1 client on iokit's streams (``iokit.http.client``), on every backend, against the example HTTP server
(a real process) and against raw sockets that answer badly: keep-alive reuse, HEAD, streamed bodies, a server that
closes, a malformed answer, and a deadline."""

from __future__ import annotations

import socket
import threading

import pytest

import iokit
from example_servers import EXAMPLES, ServerProcess, backend_name  # noqa: F401
from iokit.http.client import (ConnectionFailed, Endpoint, HttpConnection, RequestTimedOut, ResponseMalformed)


@pytest.fixture(scope="module")
def http_server(backend_name):
    with ServerProcess(EXAMPLES / "http_server.py", backend_name) as process:
        yield process


def run_client(backend: str, function, *arguments):
    return iokit.run(function, *arguments, backend=backend)


def test_endpoint_from_url():
    assert Endpoint.from_url("http://127.0.0.1:8080") == Endpoint("127.0.0.1", 8080)
    assert Endpoint.from_url("http://[::1]:9/").host_header == "[::1]:9"
    for bad in ("https://127.0.0.1:1", "http://127.0.0.1", "127.0.0.1:80"):
        with pytest.raises(ValueError):
            Endpoint.from_url(bad)


def test_requests_reuse_one_connection(backend_name, http_server):
    async def main():
        async with HttpConnection(Endpoint(*http_server.address)) as connection:
            first = await connection.request("GET", "/")
            stream = connection._stream
            echoed = await connection.request("POST", "/echo", body=b"x" * 100_000)
            head = await connection.request("HEAD", "/")
            assert connection._stream is stream  # keep-alive: the same socket throughout

            async def pieces():
                for _ in range(4):
                    yield b"abc" * 1000
            streamed = await connection.request("POST", "/echo", body=pieces(), content_length=12_000)
            return first, echoed, head, streamed

    first, echoed, head, streamed = run_client(backend_name, main)
    assert first.status == 200 and first.body
    assert echoed.status == 200 and echoed.body == b"x" * 100_000
    assert head.status == 200 and head.body == b"" and int(head.headers.get("content-length")) == len(first.body)
    assert streamed.body == b"abc" * 4000


def serve_raw_once(answer: bytes | None, close: bool = True) -> tuple[socket.socket, threading.Thread]:
    """A listener that reads one request and sends ``answer`` (``None``: nothing, and keeps the socket open)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            if answer is not None:
                connection.sendall(answer)
            if not close or answer is None:
                connection.recv(65536)  # until the client gives up and closes
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("answer, error", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", ConnectionFailed),   # closed mid-body
    (b"SSH-2.0-OpenSSH\r\n\r\n", ResponseMalformed),
    (None, RequestTimedOut),
])
def test_failures_are_typed_and_close_the_connection(backend_name, answer, error):
    listener, thread = serve_raw_once(answer)

    async def main():
        connection = HttpConnection(Endpoint(*listener.getsockname()), timeout=0.5)
        try:
            with pytest.raises(error):
                await connection.request("GET", "/")
            assert connection._stream is None
        finally:
            await connection.aclose()
    try:
        run_client(backend_name, main)
    finally:
        listener.close()
        thread.join(5)


def test_connection_refused_is_connection_failed(backend_name):
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]

        async def main():
            with pytest.raises(ConnectionFailed):
                await HttpConnection(Endpoint("127.0.0.1", port)).request("GET", "/")
        run_client(backend_name, main)
