"""Our echo server on the iokit runtime: the server of the socket workloads, one process per backend.

    python -m iokit.bench.echo_server --backend NAME [--host 127.0.0.1] [--port 0] [--buffer-bytes 65536]
                                     [--style streams|protocol]

It is written the way an iokit application is: the shared example-server plumbing (``iokit.serve``: the ready line
``listening on HOST:PORT backend=NAME``, a task per connection, a clean stop on SIGINT/SIGTERM) and, per connection,
a receive into one reusable buffer and a ``sendall`` of what arrived. Nothing here is tuned for the benchmark, so its
rows show the runtime and the backend as users get them. On ``blocking`` each connection is an OS thread; on the
others it is a task on one thread.

The wait for the next message is deliberately *not* wrapped in ``shutdown.interruptible()``: that would add a cancel
scope per message to the path being measured. On stop, open connections are cancelled after ``--shutdown-grace``
(the harness stops a server only once its load has closed every connection).
"""

from __future__ import annotations

import sys

from iokit import protocols, serve

DEFAULT_BUFFER_BYTES = 65536
STYLES = ("streams", "protocol")


class EchoService:
    """Sends every byte back. No connection limit beyond the process's file descriptors.

    Each connection owns a receive buffer of ``buffer_bytes``, held while it waits for its next message (a pending
    receive needs its buffer on every backend), so the waiting-clients workload runs this server with a small one.
    """

    max_connections = 1_000_000

    def __init__(self, buffer_bytes: int = DEFAULT_BUFFER_BYTES):
        self.buffer_bytes = buffer_bytes

    async def handle_connection(self, stream, shutdown) -> None:
        buffer = bytearray(self.buffer_bytes)
        view = memoryview(buffer)
        while True:
            received = await stream.recv_into(buffer)
            if not received:
                return
            await stream.sendall(view[:received])

    async def reject_connection(self, stream) -> None:
        return


class EchoProtocol(protocols.Protocol):
    """The same echo in the callback style: every chunk received is written back."""

    def connection_made(self, transport) -> None:
        self.write = transport.write

    def data_received(self, data: bytes) -> None:
        self.write(data)


class EchoProtocolService(EchoService):
    """Each connection driven by an ``EchoProtocol`` (on epoll and uring the engine calls it from C)."""

    async def handle_connection(self, stream, shutdown) -> None:
        await protocols.drive(stream, EchoProtocol())


def main(argv: list[str] | None = None) -> int:
    parser = serve.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--buffer-bytes", type=int, default=DEFAULT_BUFFER_BYTES,
                        help=f"receive buffer per connection (default: {DEFAULT_BUFFER_BYTES})")
    parser.add_argument("--style", choices=STYLES, default="streams",
                        help="a task per connection over streams, or a protocol (callbacks) per connection")
    parser.set_defaults(port=0, shutdown_grace=1.0)
    services = {"streams": EchoService, "protocol": EchoProtocolService}
    return serve.main(lambda arguments: services[arguments.style](arguments.buffer_bytes), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
