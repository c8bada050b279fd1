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

from ..http import App, HttpError, HttpLimits, HttpServer, Response
from . import protocol
from .protocol import TUS_VERSION, tus_error, upload_path
from .replication import REWIND_HEADER, STOP_DRAIN_SECONDS, UPLOAD_ID_HEADER, Replication
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
    """The handlers of the tus routes over one ``UploadStore``.

    ``replication`` (a primary) sends every creation, chunk and deletion to the replicas as its mode says;
    ``accept_replication`` (a replica) honours the primary's ``Iokit-Upload-Id`` and ``Iokit-Rewind``
    (``replication.py``).
    """

    def __init__(self, store: UploadStore, replication: Replication | None = None, accept_replication: bool = False):
        self.store = store
        self.replication = replication
        self.accept_replication = accept_replication

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
        upload_id = self._primary_upload_id(headers)
        if concat is not None and concat.kind == "final":
            if "upload-length" in headers:
                raise tus_error(400, "invalid_upload_length", "a final upload's length is the sum of its parts; "
                                                              "do not send Upload-Length")
            upload = await self.store.concatenate(concat.part_ids, metadata, upload_id)
        else:
            length = protocol.parse_upload_length(protocol.single_header(headers, "upload-length"),
                                                  limits.max_upload_bytes)
            upload = await self.store.create(length, metadata, concat, upload_id)
        if self.replication is not None:
            try:
                await self.replication.created(upload)
            except HttpError:  # not on every replica (sync): it does not exist here either
                await self.store.delete(upload)
                raise
        response_headers = [("Location", upload_path(upload.id)), *_state_headers(self.store, upload)]
        return Response(201, headers=response_headers)

    async def head(self, request) -> Response:
        protocol.check_tus_resumable(protocol.single_header(request.headers, "tus-resumable"))
        upload = await self.store.lookup(request.path_params["upload_id"])
        # A PATCH is writing (what it received is kept even if its client dies now) or making its chunk the offset:
        # the offset we have is about to change. 423 until it is settled, as tusd (whose HEAD takes the lock too).
        if upload.committing or upload.busy:
            raise tus_error(423, "committing" if upload.committing else "locked",
                            "a chunk is being written to this upload; retry in a moment", headers=[("Retry-After", "1")])
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
        if self.accept_replication and protocol.single_header(headers, REWIND_HEADER) == "1" \
                and offset < upload.offset:
            await self.store.rewind(upload, offset)  # the primary took these bytes back: so do we
        replication = self.replication
        if replication is not None:
            await replication.wait_for_room()  # async mode's backpressure, before any byte is read
        async with self.store.patch(upload, offset, request.head.content_length, checksum, replication) as chunk:
            async for piece in request.body():
                await chunk.write(piece)
            await chunk.complete()
        return Response(204, headers=_state_headers(self.store, upload))

    async def delete(self, request) -> Response:
        protocol.check_tus_resumable(protocol.single_header(request.headers, "tus-resumable"))
        upload = await self.store.lookup(request.path_params["upload_id"])
        await self.store.delete(upload)
        if self.replication is not None:
            await self.replication.deleted(upload)
        return Response(204, headers=[("Tus-Resumable", TUS_VERSION)])

    def _primary_upload_id(self, headers) -> str | None:
        """Return the id a primary asks its replica to keep (``Iokit-Upload-Id``), or ``None``. Only a server started
        to accept replication honours it (elsewhere a client would choose its own id: ignored); an id not of our shape
        is a 400."""
        value = protocol.single_header(headers, UPLOAD_ID_HEADER)
        if value is None or not self.accept_replication:
            return None
        if not protocol.is_upload_id(value):
            raise tus_error(400, "invalid_upload_id", f"{UPLOAD_ID_HEADER} must be 32 lowercase hex digits")
        return value

    async def statistics(self, request) -> Response:
        """``GET /stats``: the uploads held, and the replication's lag per replica (bytes and seconds behind)."""
        figures = {"epoch": self.store.epoch, "uploads": len(self.store.uploads()),
                   "durability": self.store.durability.value,
                   "replication": None if self.replication is None else self.replication.statistics()}
        return Response.json(figures, headers=[("Cache-Control", "no-store")])

    async def download(self, request) -> Response:
        upload = await self.store.lookup(request.path_params["upload_id"])
        pieces = await self.store.download(upload)
        return Response(200, pieces, headers=[("Content-Length", str(upload.length)), ("Cache-Control", "no-store")],
                        content_type="application/octet-stream")


def build_app(store: UploadStore, replication: Replication | None = None, accept_replication: bool = False) -> App:
    """Return the routes of the upload server over ``store``."""
    handlers = UploadHandlers(store, replication, accept_replication)
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
    app.add_route("GET", "/stats", handlers.statistics)
    return app


def build_server(store: UploadStore, limits: HttpLimits, replication: Replication | None = None,
                 accept_replication: bool = False) -> HttpServer:
    """Return the upload service over ``store``, for ``iokit.serve.main``."""
    return HttpServer(build_app(store, replication, accept_replication), limits,
                      lifespan=lambda: store_lifespan(store, replication), single_process=True)


@contextlib.asynccontextmanager
async def store_lifespan(store: UploadStore, replication: Replication | None = None):
    """Return an async context manager that loads ``store``, runs its housekeeping (and the replication's senders)
    while the block runs, and at the end makes every accepted byte durable (the last flush, also when the block
    fails)."""
    await store.open()
    try:
        async with iokit.TaskGroup() as tasks:
            tasks.spawn(store.run_housekeeping, name="upload-housekeeping")
            if replication is not None:
                tasks.spawn(replication.run, name="replication")
            yield
            if replication is not None:  # the clients are gone: give the replicas what they have not got yet
                await replication.drain(STOP_DRAIN_SECONDS)
            tasks.cancel_scope.cancel()
    finally:
        try:
            await store.close()
        finally:
            if replication is not None:
                await replication.aclose()
