"""The chunked, resumable upload pattern: a tus 1.0.0 server, on any iokit backend.

Extensions: creation, termination, checksum (sha1, md5), expiration, concatenation.

    OPTIONS /files          what the server supports (Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm)
    POST /files             create an upload (Upload-Length, Upload-Metadata, Upload-Concat) -> 201 + Location
    HEAD /files/{id}        where it stands: Upload-Offset, Upload-Length, Iokit-Durable-Offset
    PATCH /files/{id}       append a chunk at Upload-Offset (application/offset+octet-stream) -> 204 + new offset
    DELETE /files/{id}      terminate it
    GET /files/{id}         download a finished upload

``--durability sync`` acknowledges a chunk once it is fdatasync'd and recorded; ``--durability async`` once it is in
memory, with a flusher syncing every 200 ms. The logic lives in ``iokit.tus``; this file is the command line.
Run: ``python examples/upload_server.py --backend epoll --port 8080 --dir uploads --durability sync``.
"""

from __future__ import annotations

import os
import sys

import iokit
from iokit import serve
from iokit.http import HttpLimits, HttpServer
from iokit.tus import Durability, UploadLimits, UploadStore
from iokit.tus.server import build_app, serve_uploads

DEFAULT_DIRECTORY = "uploads"


def main(argv: list[str] | None = None) -> int:
    parser = serve.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.path.join(os.getcwd(), DEFAULT_DIRECTORY),
                        help=f"where uploads live (default: ./{DEFAULT_DIRECTORY})")
    parser.add_argument("--durability", choices=[mode.value for mode in Durability], default=Durability.SYNC.value,
                        help="sync: fdatasync before each 204; async: 204 from memory, synced every flush interval")
    serve.add_limit_arguments(parser, HttpLimits)
    serve.add_limit_arguments(parser, UploadLimits)
    arguments = parser.parse_args(argv)
    if arguments.workers != 1:
        # Which request holds an upload (423) and async mode's buffers live in one process's memory.
        parser.error("the upload server runs as one process: --workers must be 1")
    store = UploadStore(arguments.dir, Durability(arguments.durability),
                        serve.limits_from_arguments(arguments, UploadLimits))
    service = HttpServer(build_app(store), serve.limits_from_arguments(arguments, HttpLimits))
    try:
        return iokit.run(serve_uploads, store, service, arguments, backend=arguments.backend)
    except iokit.BackendUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
