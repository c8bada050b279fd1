"""Reference echo server: an asyncio ``Protocol`` under the default event loop, or under uvloop.

This is what "a well-written asyncio server" looks like to most Python programmers: callbacks, no coroutine per
message, the transport's own write buffering. It is the bar the ``epoll`` backend is held to (default loop) and the
bar the ``uring`` backend is held to (uvloop, libuv underneath).

    python -m iokit.bench.asyncio_echo --loop asyncio|uvloop [--host 127.0.0.1] [--port 0]

prints ``listening on HOST:PORT backend=ref:LOOP`` when ready and exits on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal


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
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signo in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signo, stop.set)
    server = await loop.create_server(EchoProtocol, host, port, backlog=4096)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"listening on {bound_host}:{bound_port} backend={label}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop
        uvloop.run(serve(args.host, args.port, "ref:uvloop"))
    else:
        asyncio.run(serve(args.host, args.port, "ref:asyncio"))


if __name__ == "__main__":
    main()
