"""Echo server: an asyncio ``Protocol`` under the default event loop, under uvloop, or under iokit's loop.

This is what "a well-written asyncio server" looks like to most Python programmers: callbacks, no coroutine per
message, the transport's own write buffering. It is the bar the ``epoll`` backend is held to (default loop) and the
bar the ``uring`` backend is held to (uvloop, libuv underneath). The very same server on ``iokit.asyncio``'s loop
(``--loop iokit-uring`` / ``iokit-epoll``) is the ``uring:asyncio`` / ``epoll:asyncio`` row: what an unchanged asyncio
program gains from our loop.

    python -m iokit.bench.asyncio_echo --loop asyncio|uvloop|iokit-uring|iokit-epoll [--host 127.0.0.1] [--port 0]

prints ``listening on HOST:PORT backend=LABEL`` when ready (``ref:asyncio``, ``ref:uvloop``, ``uring:asyncio``,
``epoll:asyncio``) and exits on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio

from .http_refs import serve_protocol  # the one place a reference server is started and stopped


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    # Backpressure: a client that stops reading its replies stops being read from.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


async def serve(host: str, port: int, label: str) -> None:
    await serve_protocol(EchoProtocol, host, port, label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "iokit-uring", "iokit-epoll"), default="asyncio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop
        uvloop.run(serve(args.host, args.port, "ref:uvloop"))
    elif args.loop.startswith("iokit-"):
        import iokit.asyncio
        backend = args.loop.removeprefix("iokit-")
        iokit.asyncio.run(serve(args.host, args.port, f"{backend}:asyncio"), backend=backend)
    else:
        asyncio.run(serve(args.host, args.port, "ref:asyncio"))


if __name__ == "__main__":
    main()
