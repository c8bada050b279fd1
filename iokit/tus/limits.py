"""Every bound and timing of the upload server, in one place.

An upload server holds files for clients it does not know, so each thing a client can make it keep is bounded: the size
of one upload (``Tus-Max-Size``), how many unfinished uploads there are and what their lengths add up to (a creation
costs the client one request and the server a promise kept for a day), how long an unfinished upload lives
(``Upload-Expires``), how much acknowledged data
may sit in memory before the flusher writes it (async durability), and the free space kept on the disk so that the
small record files that say how far an upload got can always be written. ``serve.add_limit_arguments`` turns each field
into a flag (``expiry_seconds`` -> ``--expiry-seconds``), which is how the tests shorten the 24 h expiry to a second.

The HTTP limits (request head, idle and body timeouts) stay in ``iokit.http.limits``; the upload routes lift only the
body cap, because a PATCH body is bounded by the upload's declared length instead.
"""

from __future__ import annotations

import dataclasses

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclasses.dataclass(frozen=True)
class UploadLimits:
    """The bounds one upload store enforces. Sizes are in bytes, times in seconds."""

    max_upload_bytes: int = 4 * GIB
    """The largest upload (``Tus-Max-Size``); a larger ``Upload-Length``, or a final upload whose parts add up to more,
    gets 413."""

    max_live_uploads: int = 1024
    """Unfinished uploads at once: each is a promise the server keeps for ``expiry_seconds`` whether or not a byte
    follows. One creation more gets 503 with ``Retry-After`` (finishing, deleting or expiring one frees a place)."""

    max_promised_bytes: int = 64 * GIB
    """The ``Upload-Length`` of every unfinished upload, added up: what clients have said they will send. A creation
    that would take the sum past this gets 413 (``Tus-Max-Size`` still bounds one upload)."""

    expiry_seconds: float = 24 * 3600.0
    """An unfinished upload that has not grown for this long expires: its data is removed and its URL answers 410.
    Finished uploads do not expire (they stay downloadable until DELETE)."""

    expired_memory_seconds: float = 7 * 24 * 3600.0
    """How long an expired upload's id is remembered (to answer 410, not 404)."""

    sweep_interval: float = 60.0
    """How often expired uploads are looked for (a request for one finds it expired at once, whatever this is)."""

    flush_interval: float = 0.2
    """Async durability: the flusher writes and fsyncs the acknowledged bytes at least this often. It is also the most
    acknowledged data (in time) that a crash of the server can lose in that mode."""

    max_buffered_bytes: int = 32 * MIB
    """Async durability: acknowledged bytes one upload may hold in memory. Past this the flusher is woken at once, and
    the PATCH that filled the buffer waits for it (backpressure) rather than growing memory."""

    max_metadata_bytes: int = 4 * KIB
    """The ``Upload-Metadata`` header's size; a larger one is 400."""

    disk_headroom_bytes: int = 64 * KIB
    """Free space a chunk must leave on the disk, else 507: the room the record files (which hold each upload's durable
    offset) need, so that a full disk never leaves an upload whose offset cannot be written down."""

    copy_piece_bytes: int = 1 * MIB
    """Piece size for reading and writing files (concatenation copies, downloads)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value <= 0:
                raise ValueError(f"UploadLimits.{field.name} must be positive, not {value!r}")


DEFAULT_UPLOAD_LIMITS = UploadLimits()
