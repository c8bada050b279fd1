"""The tus routes on the shared HTTP core, and the service that serves them with the store's lifespan.

Each header is read with ``protocol.single_header`` (sent twice, it is a 400: neither copy wins). Each handler checks
the request in the order tus (and tusd) give the statuses, so that a request refused for one reason
is not also half-processed for another: first the protocol version (412: the request must then not be processed at
all), then the headers' own shape (415, 400), then the upload (404, 410), then what the request would do to it (403,
423, 409, 413), and only then the body. The store does the work; these functions only translate between headers and
store calls.

``GET /files/{id}`` is not part of tus (tusd offers it too): it downloads a finished upload, so a client can check what
it sent, and it does not ask for ``Tus-Resumable`` (a browser or curl may fetch it).

The HTTP core serves connections; the upload store also has a lifespan (``store_lifespan``): it is loaded before the
first request, runs a task of its own beside the server (the flusher and the expiry sweep), and makes every accepted
byte durable once the last connection has closed. Which request holds an upload (423) and async mode's buffers live in
one process's memory, so the service is ``single_process``.
"""

from __future__ import annotations

import contextlib

import iokit

from ..http import App, HttpLimits, HttpServer, Response
from . import protocol
from .protocol import TUS_VERSION, tus_error, upload_path
from .store import Upload, UploadStore


def _state_headers(store: UploadStore, upload: Upload) -> list[tuple[str, str]]:
    """The headers that tell where an upload stands, on HEAD and PATCH answers."""
    headers = [("Tus-Resumable", TUS_VERSION), ("Upload-Offset", str(upload.offset)),
               ("Upload-Length", str(upload.length)), ("Iokit-Durable-Offset", str(upload.durable_offset))]
    expires_at = store.expires_at(upload)
    if expires_at is not None:
        headers.append(("Upload-Expires", protocol.http_date(expires_at)))
    return headers


class UploadHandlers:
    """The handlers of the tus routes over one ``UploadStore``."""

    def __init__(self, store: UploadStore):
        self.store = store

    async def options(self, request) -> Response:
        return Response(204, headers=protocol.options_headers(self.store.limits.max_upload_bytes))

    async def create(self, request) -> Response:
        headers = request.headers
        protocol.check_tus_resumable(protocol.single_header(headers, "tus-resumable"))
        limits = self.store.limits
        concat = protocol.parse_concat(protocol.single_header(headers, "upload-concat"))
        metadata = protocol.parse_metadata(protocol.single_header(headers, "upload-metadata"),
                                           limits.max_metadata_bytes)
        if "upload-defer-length" in headers:
            raise tus_error(400, "defer_length_unsupported", "this server needs Upload-Length at creation")
        if concat is not None and concat.kind == "final":
            if "upload-length" in headers:
                raise tus_error(400, "invalid_upload_length", "a final upload's length is the sum of its parts; "
                                                              "do not send Upload-Length")
            upload = await self.store.concatenate(concat.part_ids, metadata)
        else:
            length = protocol.parse_upload_length(protocol.single_header(headers, "upload-length"),
                                                  limits.max_upload_bytes)
            upload = await self.store.create(length, metadata, concat)
        response_headers = [("Location", upload_path(upload.id)), *_state_headers(self.store, upload)]
        return Response(201, headers=response_headers)

    async def head(self, request) -> Response:
        protocol.check_tus_resumable(protocol.single_header(request.headers, "tus-resumable"))
        upload = await self.store.lookup(request.path_params["upload_id"])
        if upload.committing:  # a PATCH is making its chunk the offset: the one we have is about to change
            raise tus_error(423, "committing", "a chunk is being committed to this upload; retry in a moment",
                            headers=[("Retry-After", "1")])
        headers = [*_state_headers(self.store, upload), ("Cache-Control", "no-store")]
        if upload.metadata:
            headers.append(("Upload-Metadata", protocol.encode_metadata(upload.metadata)))
        if upload.concat is not None:
            headers.append(("Upload-Concat", upload.concat.header_value()))
        return Response(200, headers=headers)

    async def patch(self, request) -> Response:
        headers = request.headers
        protocol.check_tus_resumable(protocol.single_header(headers, "tus-resumable"))
        protocol.check_patch_content_type(protocol.single_header(headers, "content-type"))
        offset = protocol.parse_upload_offset(protocol.single_header(headers, "upload-offset"))
        checksum = protocol.parse_checksum(protocol.single_header(headers, "upload-checksum"))
        upload = await self.store.lookup(request.path_params["upload_id"])
        async with self.store.patch(upload, offset, request.head.content_length, checksum) as chunk:
            async for piece in request.body():
                await chunk.write(piece)
            await chunk.complete()
        return Response(204, headers=_state_headers(self.store, upload))

    async def delete(self, request) -> Response:
        protocol.check_tus_resumable(protocol.single_header(request.headers, "tus-resumable"))
        upload = await self.store.lookup(request.path_params["upload_id"])
        await self.store.delete(upload)
        return Response(204, headers=[("Tus-Resumable", TUS_VERSION)])

    async def download(self, request) -> Response:
        upload = await self.store.lookup(request.path_params["upload_id"])
        pieces = await self.store.download(upload)
        return Response(200, pieces, headers=[("Content-Length", str(upload.length)), ("Cache-Control", "no-store")],
                        content_type="application/octet-stream")


def build_app(store: UploadStore) -> App:
    """Return the routes of the upload server over ``store``."""
    handlers = UploadHandlers(store)
    app = App()
    collection = protocol.COLLECTION_PATH
    one_upload = collection + "/{upload_id}"
    app.add_route("OPTIONS", collection, handlers.options)
    app.add_route("POST", collection, handlers.create)
    app.add_route("HEAD", one_upload, handlers.head)
    # The body of a PATCH is streamed to disk; the upload's own length bounds it (413), not the 1 MiB default.
    app.add_route("PATCH", one_upload, handlers.patch, max_body_size=None)
    app.add_route("DELETE", one_upload, handlers.delete)
    app.add_route("GET", one_upload, handlers.download)
    return app


def build_server(store: UploadStore, limits: HttpLimits) -> HttpServer:
    """Return the upload service over ``store``, for ``iokit.serve.main``."""
    return HttpServer(build_app(store), limits, lifespan=lambda: store_lifespan(store), single_process=True)


@contextlib.asynccontextmanager
async def store_lifespan(store: UploadStore):
    """Return an async context manager that loads ``store``, runs its housekeeping while the block runs, and at the end
    makes every accepted byte durable (the last flush, also when the block fails)."""
    await store.open()
    try:
        async with iokit.TaskGroup() as tasks:
            tasks.spawn(store.run_housekeeping, name="upload-housekeeping")
            yield
            tasks.cancel_scope.cancel()
    finally:
        await store.close()
