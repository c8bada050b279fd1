"""Our echo server on the iokit runtime: the server of the socket workloads, one process per backend.

    python -m iokit.bench.echo_server --backend NAME [--host 127.0.0.1] [--port 0]

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

from iokit import serve

BUFFER_SIZE = 65536


class EchoService:
    """Sends every byte back. No connection limit beyond the process's file descriptors."""

    max_connections = 1_000_000

    async def handle_connection(self, stream, shutdown) -> None:
        buffer = bytearray(BUFFER_SIZE)
        view = memoryview(buffer)
        while True:
            received = await stream.recv_into(buffer)
            if not received:
                return
            await stream.sendall(view[:received])

    async def reject_connection(self, stream) -> None:
        return


def main(argv: list[str] | None = None) -> int:
    parser = serve.argument_parser(__doc__.splitlines()[0])
    parser.set_defaults(port=0, shutdown_grace=1.0)
    return serve.main(lambda arguments: EchoService(), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
