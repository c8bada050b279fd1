"""The chunked, resumable upload pattern: a tus 1.0.0 server, on any iokit backend.

Extensions: creation, termination, checksum (sha1, md5), expiration, concatenation.

    OPTIONS /files          what the server supports (Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm)
    POST /files             create an upload (Upload-Length, Upload-Metadata, Upload-Concat) -> 201 + Location
    HEAD /files/{id}        where it stands: Upload-Offset, Upload-Length, Iokit-Durable-Offset
    PATCH /files/{id}       append a chunk at Upload-Offset (application/offset+octet-stream) -> 204 + new offset
    DELETE /files/{id}      terminate it
    GET /files/{id}         download a finished upload

``--durability sync`` acknowledges a chunk once it is fdatasync'd and recorded; ``--durability async`` once it is in
memory, with a flusher syncing every 200 ms.

Replication: ``--replica http://HOST:PORT`` (repeatable) sends every chunk to another upload server started with
``--accept-replication``, which keeps this server's upload ids. ``--replication sync``: the 204 waits for every
replica (a replica down or slower than ``--replica-timeout``: 503 with Retry-After); ``--replication async``: the 204
at once, a sender per replica ships chunks in order with a bounded backlog (``--replica-backlog-bytes``; full: clients
wait), and ``GET /stats`` shows each replica's lag. The logic lives in ``iokit.tus``; this file is the command line.
Run: ``python examples/upload_server.py --backend epoll --port 8080 --dir uploads --durability sync``.
"""

from __future__ import annotations

import os
import sys

from iokit import serve
from iokit.http import HttpLimits, cors
from iokit.tus import Durability, UploadLimits, UploadStore
from iokit.tus.replication import DEFAULT_MAX_BACKLOG_BYTES, DEFAULT_REPLICA_TIMEOUT, Replication, ReplicationMode
from iokit.tus.server import build_server

DEFAULT_DIRECTORY = "uploads"


def make_service(arguments):
    if os.path.exists(arguments.dir) and not os.path.isdir(arguments.dir):
        raise ValueError(f"--dir {arguments.dir!r} is not a directory")
    store = UploadStore(arguments.dir, Durability(arguments.durability),
                        serve.limits_from_arguments(arguments, UploadLimits))
    replication = None
    if arguments.replica:
        try:
            replication = Replication(store, arguments.replica, ReplicationMode(arguments.replication),
                                      arguments.replica_timeout, arguments.replica_backlog_bytes)
        except ValueError as error:
            raise ValueError(f"--replica: {error}") from None
    server = build_server(store, serve.limits_from_arguments(arguments, HttpLimits), replication,
                          arguments.accept_replication)
    server.cors = cors.policy_from_arguments(arguments)  # browser tus clients on other origins
    return server


def main(argv: list[str] | None = None) -> int:
    parser = serve.argument_parser(__doc__.splitlines()[0], HttpLimits, UploadLimits)
    parser.add_argument("--dir", default=os.path.join(os.getcwd(), DEFAULT_DIRECTORY),
                        help=f"where uploads live (default: ./{DEFAULT_DIRECTORY})")
    parser.add_argument("--durability", choices=[mode.value for mode in Durability], default=Durability.SYNC.value,
                        help="sync: fdatasync before each 204; async: 204 from memory, synced every flush interval")
    parser.add_argument("--replica", action="append", default=[], metavar="URL",
                        help="http://HOST:PORT of an upload server to replicate every chunk to (repeatable)")
    parser.add_argument("--replication", choices=[mode.value for mode in ReplicationMode],
                        default=ReplicationMode.SYNC.value,
                        help="sync: the 204 waits for every replica; async: the 204 at once, replicas follow")
    parser.add_argument("--replica-timeout", type=float, default=DEFAULT_REPLICA_TIMEOUT,
                        help=f"sync: a replica slower than this makes the primary answer 503 (default: "
                             f"{DEFAULT_REPLICA_TIMEOUT} s); async: the longest a client waits for backlog room")
    parser.add_argument("--replica-backlog-bytes", type=int, default=DEFAULT_MAX_BACKLOG_BYTES,
                        help="async: unshipped bytes per replica past which clients wait (default: 64 MiB)")
    parser.add_argument("--accept-replication", action="store_true",
                        help="be a replica: keep a primary's upload ids (Iokit-Upload-Id) and rewinds")
    cors.add_argument(parser)
    return serve.main(make_service, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
