"""What an upload is on disk, and the few file operations that make it durable.

Each upload is two files in the upload directory, both named after its id (never after client text):

* ``<id>.data``: the bytes received, at their offsets;
* ``<id>.info``: its *record*, a small JSON document: length, metadata, concatenation, times, and ``durable_offset``,
  the number of bytes of ``.data`` known to be on stable storage.

The record is what a restarted server believes. It is replaced atomically (written to ``<id>.info.tmp``, fsync'd,
renamed over the old one, and the directory fsync'd so that the rename itself survives a power cut), and it is written
only *after* the data it counts was fdatasync'd. So after any crash, ``durable_offset`` never claims a byte that is not
on disk; the data file may hold more (bytes written but never synced, or a chunk refused half-way), and loading
truncates it back to the record: a byte that was not recorded as durable was not promised to anyone in sync mode.

Data and record writes, syncs, opens and closes go through the iokit backend in use (``iokit.open_file``,
``File.write_all_at``, gathered writes ``iokit.ops.writev_at``, ``File.fdatasync``, ``File.fsync``). iokit has no op for rename, unlink, ftruncate, fallocate or
statvfs; those touch only file metadata, are short, and are made inline.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import os

import iokit

from .protocol import Concat, is_upload_id

DATA_SUFFIX = ".data"
RECORD_SUFFIX = ".info"
TEMPORARY_SUFFIX = ".tmp"
_FILE_MODE = 0o644
_MAX_IOVECS = 1024  # IOV_MAX on Linux: the most pieces one gathered write takes


def is_disk_full(error: BaseException) -> bool:
    """Return ``True`` for the errors a full disk (or quota) gives."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@dataclasses.dataclass
class Record:
    """The durable facts about one upload (the content of ``<id>.info``).

    ``expired_at`` is set for an expired upload, whose data is gone: the record stays a while so that its URL answers
    410 rather than 404.
    """

    upload_id: str
    length: int = 0
    metadata: dict[str, bytes] = dataclasses.field(default_factory=dict)
    concat: Concat | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    durable_offset: int = 0
    expired_at: float | None = None

    def encode(self) -> bytes:
        document = {
            "id": self.upload_id, "length": self.length, "durable_offset": self.durable_offset,
            "created_at": self.created_at, "updated_at": self.updated_at, "expired_at": self.expired_at,
            "metadata": {key: base64.b64encode(value).decode("ascii") for key, value in self.metadata.items()},
            "concat": None if self.concat is None else {"kind": self.concat.kind, "parts": list(self.concat.part_ids)},
        }
        return json.dumps(document, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> "Record":
        """Return the record in ``data``; raise ``ValueError`` if it is not one we wrote."""
        try:
            document = json.loads(data)
            concat = document["concat"]
            record = cls(upload_id=document["id"], length=int(document["length"]),
                         durable_offset=int(document["durable_offset"]), created_at=float(document["created_at"]),
                         updated_at=float(document["updated_at"]), expired_at=document["expired_at"],
                         metadata={key: base64.b64decode(value) for key, value in document["metadata"].items()},
                         concat=None if concat is None else Concat(concat["kind"], tuple(concat["parts"])))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not an upload record: {error}") from None
        if not is_upload_id(record.upload_id) or not 0 <= record.durable_offset <= record.length:
            raise ValueError("not an upload record: bad id or offset")
        return record


class UploadFiles:
    """The paths of one upload's files, made from its id alone."""

    def __init__(self, directory: str, upload_id: str):
        if not is_upload_id(upload_id):
            raise ValueError(f"{upload_id!r} is not an upload id")  # a bug, never client input: that is looked up
        self.directory = directory
        self.data = os.path.join(directory, upload_id + DATA_SUFFIX)
        self.record = os.path.join(directory, upload_id + RECORD_SUFFIX)
        self.temporary_record = self.record + TEMPORARY_SUFFIX

    async def open_data(self, flags: int = os.O_RDWR) -> iokit.File:
        """Open the data file through the backend."""
        return await iokit.open_file(self.data, flags, _FILE_MODE)

    async def create_data(self) -> None:
        """Create the (empty) data file; ``FileExistsError`` if it exists (ids are random: it never should)."""
        file = await iokit.open_file(self.data, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        await file.aclose()

    async def write_record(self, record: Record) -> None:
        """Replace the record atomically and durably: temp file, fsync, rename, directory fsync.

        Raises ``OSError`` (a full disk among others); the old record is then still in place.
        """
        try:
            file = await iokit.open_file(self.temporary_record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
            try:
                await file.write_all_at(record.encode(), 0)
                await file.fsync()
            finally:
                await file.aclose()
            os.rename(self.temporary_record, self.record)
        except BaseException:
            remove_quietly(self.temporary_record)
            raise
        await fsync_directory(self.directory)

    def remove(self) -> None:
        """Remove both files (the record first: a data file without a record is cleaned up at the next start)."""
        remove_quietly(self.record)
        remove_quietly(self.data)


async def fsync_directory(directory: str) -> None:
    """fsync ``directory`` through the backend, so that the names created or renamed in it are durable."""
    file = await iokit.open_file(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        await file.fsync()
    finally:
        await file.aclose()


async def write_pieces_at(file: iokit.File, pieces: list, offset: int) -> None:
    """Write the byte strings ``pieces``, one after another, at ``offset``: gathered writes (pwritev) of up to
    ``IOV_MAX`` pieces each, so that a body received in many pieces reaches the file without first being joined
    (a copy of every byte) and in one op per thousand pieces, not one per piece. Continues after a short write;
    raises ``OSError`` (ENOSPC when the disk takes nothing)."""
    views = [memoryview(piece) for piece in pieces if len(piece)]
    first = 0
    while first < len(views):
        written = await iokit.perform(iokit.ops.writev_at(file.fd, views[first:first + _MAX_IOVECS], offset))
        if written == 0:
            raise disk_full_error()
        offset += written
        while written:  # step past what was written; a piece written in part goes on from where it stopped
            size = views[first].nbytes
            if written < size:
                views[first] = views[first][written:]
                break
            written -= size
            first += 1


async def read_small_file(path: str, max_bytes: int) -> bytes:
    """Return the content of ``path`` (at most ``max_bytes``), read through the backend."""
    file = await iokit.open_file(path)
    try:
        return await file.read_at(max_bytes, 0)
    finally:
        await file.aclose()


def reserve_space(file: iokit.File, offset: int, length: int, headroom: int) -> None:
    """Allocate ``length`` bytes of ``file`` from ``offset``, keeping ``headroom`` bytes of the disk free.

    Raises the ``OSError`` of a full disk *before* any byte is accepted, so that a chunk the disk cannot hold is refused
    up front (507) instead of failing half-way, and so that async mode never acknowledges bytes it cannot write later.
    On failure the file ends at ``offset`` again (where the accepted bytes end: nothing past it was accepted, and the
    flusher writes only below it, so this never cuts a byte it is writing from another thread).
    """
    if length <= 0:
        return
    space = os.fstatvfs(file.fd)
    if length + headroom > space.f_bavail * space.f_frsize:
        raise disk_full_error()
    try:
        os.posix_fallocate(file.fd, offset, length)
    except OSError:
        os.ftruncate(file.fd, offset)
        raise


def truncate(file: iokit.File, size: int) -> None:
    """Cut ``file`` to ``size`` bytes (to drop refused bytes, or the unused end of a reservation)."""
    os.ftruncate(file.fd, size)


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
