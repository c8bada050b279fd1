"""The floor of a Python echo server on io_uring: no runtime, no task per connection, only the Backend API.

    python scripts/echo_floor.py [--port 0]        # prints "listening on HOST:PORT backend=uring-floor"

One multishot accept, one multishot recv per connection (the kernel picks a provided buffer for each message: nothing
to re-arm), and one SEND op per message; one ``wait()`` per round. This is about the least Python a message can cost
through iokit's uring backend, so its CPU per message, next to ``iokit.bench.echo_server --backend uring`` (the same
backend under the task runtime) and uvloop, says how much of the gap is the runtime and how much is Python itself.
docs/benchmarks.md gives the figures. A measuring tool only: a short send is not resumed, a slow reader is not bounded.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from iokit import ops
from iokit.backends._base import ECANCELED
from iokit.backends.uring import MultishotOp, UringBackend


def serve(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]} backend=uring-floor", flush=True)
    stopping = []
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    with UringBackend(entries=1024) as backend:
        acceptor = backend.accept_multishot(listener.fileno())
        streams: dict[int, MultishotOp] = {}   # fd -> its recv stream
        send, submit = ops.send, backend.submit
        while not stopping:
            for op in backend.wait(0.5):
                if op.__class__ is not MultishotOp:    # a send finished (or failed: the recv stream will end too)
                    continue
                if op is acceptor:
                    while op.items:
                        fd = op.items.popleft()
                        connection = socket.socket(fileno=fd)
                        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        connection.detach()  # the fd stays ours: the socket object was only for setsockopt
                        streams[fd] = backend.recv_multishot(fd)
                    continue
                while op.items:
                    submit(send(op.fd, op.items.popleft()))
                if op.done:                                 # the peer closed, or an error
                    streams.pop(op.fd, None)
                    if op.result != ECANCELED:
                        os.close(op.fd)
        for stream in streams.values():
            backend.cancel(stream)
        backend.cancel(acceptor)
    for fd in streams:
        os.close(fd)
    listener.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    serve(parser.parse_args(argv).port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
