"""Reference HTTP servers for the ``http`` workload: what Python people use, and how fast Python can answer at all.

Each serves what ``examples/http_server.py`` serves, byte for byte in the body and the same status and
``Content-Type``: ``GET /`` answers ``hello from iokit\\n`` as ``text/plain; charset=utf-8``; ``POST /echo`` answers the
request body with the request's ``Content-Type`` (``application/octet-stream`` when it has none); anything else is a
404. Like ours, each response carries ``Date`` and ``Server``.

* ``uvicorn``: uvicorn on uvloop with its httptools parser, running a minimal ASGI app (:func:`asgi_app`), access log
  off, no lifespan. This is the server most Python HTTP services run on.
* ``granian``: granian (Rust: hyper and tokio) running the same ASGI app, one worker, one runtime thread, uvloop,
  HTTP/1 only, no lifespan. Granian always runs its worker in a child process, so the bench measures the whole process
  tree (``processes.measure``).
* ``uvicorn-iokit``: the same uvicorn, app and options on ``iokit.asyncio``'s loop (``--loop
  iokit.asyncio:new_event_loop``; the backend is ``auto``, so uring here, or what ``IOKIT_BACKEND`` says).
* ``httptools-uvloop`` and ``httptools-asyncio``: ours, the least Python an HTTP server can be (:class:`HttpProtocol`):
  an ``asyncio.Protocol`` feeding llhttp (through httptools), answering from ``on_message_complete`` with one write of
  head and body, the ``Date`` header formatted once a second; on uvloop, and on the stdlib loop. They are the floor for
  the HTTP core, as ``asyncio_echo`` is for the echo server.

    python -m iokit.bench.http_refs --server uvicorn|granian|httptools-uvloop|httptools-asyncio [--host H] [--port P]

prints ``listening on HOST:PORT backend=ref:SERVER`` once it answers, and exits on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import signal
import socket
import threading
import time

SERVERS = ("uvicorn", "granian", "httptools-uvloop", "httptools-asyncio", "uvicorn-iokit")
# What each server needs installed (its import name).
REQUIRES = {"uvicorn": ("uvicorn", "uvloop", "httptools"), "granian": ("granian", "uvloop"),
            "httptools-uvloop": ("httptools", "uvloop"), "httptools-asyncio": ("httptools",),
            "uvicorn-iokit": ("uvicorn", "httptools")}
GREETING = b"hello from iokit\n"
GREETING_TYPE = b"text/plain; charset=utf-8"
DEFAULT_ECHO_TYPE = b"application/octet-stream"
MAX_ECHO_BYTES = 1 << 20   # as examples/http_server.py


# -- the ASGI app that uvicorn and granian run ----------------------------------------------------------------------

async def asgi_app(scope, receive, send) -> None:
    """``GET /`` and ``POST /echo`` as in the module docstring; the smallest ASGI app that serves them."""
    if scope["type"] != "http":
        return
    if scope["method"] == "GET" and scope["path"] == "/":
        await _asgi_respond(send, 200, GREETING_TYPE, GREETING)
    elif scope["method"] == "POST" and scope["path"] == "/echo":
        parts, more = [], True
        while more:
            message = await receive()
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        content_type = next((value for name, value in scope["headers"] if name == b"content-type"), DEFAULT_ECHO_TYPE)
        await _asgi_respond(send, 200, content_type, b"".join(parts))
    else:
        await _asgi_respond(send, 404, b"text/plain", b"not found\n")


async def _asgi_respond(send, status: int, content_type: bytes, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


# -- the httptools Protocol server ----------------------------------------------------------------------------------

_date_cache = [0, b""]


def _http_date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True).encode("ascii")]
    return _date_cache[1]


def _response(status: bytes, content_type: bytes, body: bytes, keep_alive: bool) -> bytes:
    connection = b"" if keep_alive else b"Connection: close\r\n"
    return b"".join((b"HTTP/1.1 ", status, b"\r\nDate: ", _http_date(), b"\r\nServer: httptools-ref\r\n"
                     b"Content-Type: ", content_type, b"\r\nContent-Length: ", b"%d" % len(body), b"\r\n",
                     connection, b"\r\n", body))


class HttpProtocol(asyncio.Protocol):
    """One connection: httptools parses, each complete request is answered at once (pipelined ones in order).

    It keeps only what the two routes need: the URL, the ``Content-Type`` header and the body. Having ``on_header`` at
    all makes httptools call back into Python once per header (two ``bytes`` each); a server that routes on headers
    pays that, so the reference does too."""

    def __init__(self) -> None:
        import httptools
        self.parser = httptools.HttpRequestParser(self)
        self.parser_error = httptools.HttpParserError
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.content_type = DEFAULT_ECHO_TYPE
        self.body: list[bytes] = []
        self.body_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.parser_error:
            self.transport.write(_response(b"400 Bad Request", b"text/plain", b"bad request\n", False))
            self.transport.close()

    # Backpressure: a client that stops reading its responses stops being read from.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.content_type, self.body, self.body_bytes = b"", DEFAULT_ECHO_TYPE, [], 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 12 and name.lower() == b"content-type":
            self.content_type = value

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_ECHO_BYTES:
            raise ValueError("body too large")   # httptools turns it into HttpParserCallbackError (a parser error)
        self.body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        if method == b"GET" and self.url == b"/":
            response = _response(b"200 OK", GREETING_TYPE, GREETING, keep_alive)
        elif method == b"POST" and self.url == b"/echo":
            response = _response(b"200 OK", self.content_type, b"".join(self.body), keep_alive)
        else:
            response = _response(b"404 Not Found", b"text/plain", b"not found\n", keep_alive)
        self.transport.write(response)
        if not keep_alive:
            self.transport.close()


async def serve_protocol(protocol_factory, host: str, port: int, label: str) -> None:
    """Serve ``protocol_factory`` on the running loop until SIGINT or SIGTERM; print the ready line once listening."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signo in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signo, stop.set)
    server = await loop.create_server(protocol_factory, host, port, backlog=4096)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"listening on {bound_host}:{bound_port} backend={label}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


# -- uvicorn and granian, started as their users start them -----------------------------------------------------------

def run_uvicorn(host: str, port: int, loop: str = "uvloop", label: str = "ref:uvicorn") -> None:
    import uvicorn

    class ReadyServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            bound_host, bound_port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"listening on {bound_host}:{bound_port} backend={label}", flush=True)

    config = uvicorn.Config(asgi_app, host=host, port=port, loop=loop, http="httptools", lifespan="off",
                            access_log=False, log_level="warning", interface="asgi3", backlog=4096)
    ReadyServer(config).run()


def _free_port(host: str) -> int:
    # Granian binds by number and does not report the port it got for 0; the port is free now, and nothing else on
    # this machine binds fixed ports, so the window until granian binds it is harmless.
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _announce_when_answering(host: str, port: int, label: str, timeout: float = 20.0) -> None:
    """Print the ready line once ``host:port`` accepts a connection (granian's worker starts after its main returns
    control, in another process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
            continue
        print(f"listening on {host}:{port} backend={label}", flush=True)
        return


def run_granian(host: str, port: int) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.log import LogLevels

    port = port or _free_port(host)
    threading.Thread(target=_announce_when_answering, args=(host, port, "ref:granian"), daemon=True).start()
    Granian(f"{__name__}:asgi_app", address=host, port=port, interface=Interfaces.ASGINL, workers=1,
            runtime_threads=1, loop=Loops.uvloop, http=HTTPModes.http1, websockets=False, backlog=4096,
            log_level=LogLevels.warning).serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=SERVERS, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.server == "uvicorn":
        run_uvicorn(args.host, args.port)
    elif args.server == "uvicorn-iokit":
        run_uvicorn(args.host, args.port, "iokit.asyncio:new_event_loop", "ref:uvicorn-iokit")
    elif args.server == "granian":
        run_granian(args.host, args.port)
    elif args.server == "httptools-uvloop":
        import uvloop
        uvloop.run(serve_protocol(HttpProtocol, args.host, args.port, "ref:httptools-uvloop"))
    else:
        asyncio.run(serve_protocol(HttpProtocol, args.host, args.port, "ref:httptools-asyncio"))


if __name__ == "__main__":
    main()
