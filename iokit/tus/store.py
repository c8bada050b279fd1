"""The upload store: a table of uploads, their bytes on disk, and the two ways of making those bytes durable.

Every upload has two offsets. ``offset`` counts the bytes the server *accepted* (what HEAD and PATCH answer, what the
client resumes from); ``durable_offset`` counts the bytes known to be on stable storage and written down in the
upload's record (``files.py``), which is what a restarted server starts from. ``Iokit-Durable-Offset`` shows the second.

* ``Durability.SYNC`` keeps them equal: a chunk's bytes are written to the data file, fdatasync'd, and the record is
  replaced (temp file, fsync, rename, directory fsync) before the 204 goes out. A crash loses no acknowledged byte.
* ``Durability.ASYNC`` (PostgreSQL's ``synchronous_commit = off``, the seed's "asynchronous commit"): the 204 goes out
  once the bytes are in this process's memory; a flusher task writes them, fdatasyncs and records the new durable
  offset at least every ``flush_interval`` (200 ms). A crash loses at most what arrived in the last interval (plus a
  flush in progress), and the restarted server says so: its offset is the durable one, and the client resumes there.
  Memory is bounded: past ``max_buffered_bytes`` waiting in one upload's buffer the flusher runs at once and the
  PATCH waits until it has taken them (not until they are on disk: the next bytes arrive while those are written and
  synced, so an upload holds at most twice ``max_buffered_bytes``, and a long upload runs at the disk's pace, not at
  the pace of one flush after another).

A chunk that can still be refused after all its bytes arrived (it carries ``Upload-Checksum``, or it has no
``Content-Length`` and so may run past the upload's length) must not reach the flusher, which would make it durable.
Such a chunk is written *in place* past the accepted offset, and a refusal truncates it away; an accepted one is handed
to the flusher for its fdatasync. Disk space for a chunk of known size is reserved (fallocate) before its first byte is
accepted, so a full disk is a 507 up front, in both modes, and async mode never acknowledges bytes it cannot write.

Refused requests change nothing: a wrong offset (409), a checksum mismatch (460), a body past the length (413) or a
full disk (507) leave the data file and record as they were. A body cut off mid-way is not a refusal: the bytes that
arrived are kept (unless a checksum was promised, which can then never be checked).

Tasks on the ``blocking`` backend are threads, so the table and each upload's flags and buffer are changed under one
``threading.Lock`` (never held across an await); each upload's file state is changed under its ``io_lock`` (an
``iokit.Lock``: the flusher, a commit, an expiry or a delete, one at a time).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
import secrets
import threading
import time
from typing import AsyncIterator, Callable, Protocol

import iokit

from ..http.errors import BodyIncomplete, HttpError
from .files import (DATA_SUFFIX, RECORD_SUFFIX, TEMPORARY_SUFFIX, Record, UploadFiles, fsync_directory, is_disk_full,
                    read_small_file, remove_quietly, reserve_space, truncate, write_pieces_at)
from .limits import DEFAULT_UPLOAD_LIMITS, UploadLimits
from .protocol import CHECKSUM_MISMATCH, Checksum, Concat, is_upload_id, new_upload_id, tus_error

log = logging.getLogger("iokit.tus")

_MAX_RECORD_BYTES = 64 * 1024  # a record is a few hundred bytes; metadata is capped far below this


class Durability(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"


def _disk_full(detail: str):
    return tus_error(507, "insufficient_storage", detail)


class Upload:
    """One upload as the store holds it. ``record`` is what is on disk; the rest is this process's view."""

    def __init__(self, record: Record, files: UploadFiles):
        self.record = record
        self.files = files
        self.offset = record.durable_offset
        self.updated_at = record.updated_at      # last time it grew: expiry counts from here
        self.busy = False                        # a PATCH, concatenation, delete or expiry has it (423 for others)
        self.committing = False                  # a PATCH is making its chunk the new offset (HEAD: 423 meanwhile)
        self.removed = False
        self.buffer: list[tuple[int, bytes]] = []  # async: accepted bytes not yet written, (offset, piece) as received
        self.buffered_bytes = 0                  # ... and their total, until a flush takes them
        self.io_lock = iokit.Lock()
        self.buffer_taken = iokit.Event()        # set (and replaced) when a flush takes the buffer: room for more

    @property
    def id(self) -> str:
        return self.record.upload_id

    @property
    def length(self) -> int:
        return self.record.length

    @property
    def durable_offset(self) -> int:
        return self.record.durable_offset

    @property
    def finished(self) -> bool:
        return self.offset == self.length

    @property
    def concat(self) -> Concat | None:
        return self.record.concat

    @property
    def metadata(self) -> dict[str, bytes]:
        return self.record.metadata

    def __repr__(self) -> str:
        return f"<Upload {self.id} {self.offset}/{self.length} durable={self.durable_offset}>"


class UploadStore:
    """The uploads under ``directory``, made durable as ``durability`` says.

    ``clock`` (seconds since the epoch) decides expiry and ``Upload-Expires``; a test passes its own. Call ``open()``
    inside the runtime before serving, run ``run_housekeeping()`` as a task (the flusher and the expiry sweep), and
    ``close()`` at the end (the last flush).
    """

    def __init__(self, directory: str, durability: Durability, limits: UploadLimits = DEFAULT_UPLOAD_LIMITS,
                 clock: Callable[[], float] = time.time):
        self.directory = os.path.abspath(directory)
        self.durability = durability
        self.limits = limits
        self.clock = clock
        self._uploads: dict[str, Upload] = {}
        self._expired: dict[str, float] = {}  # id -> when it expired (410 for a while, then 404)
        self._lock = threading.Lock()
        self._wake_flusher = iokit.Event()
        self._creating: list[int] = []  # the lengths of creations under way: promised, not yet in the table
        self.epoch = secrets.token_hex(8)  # this run of the store: a primary tells a restarted replica by it

    # -- starting and stopping ---------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the directory if needed and load every upload in it, each at its recorded durable offset.

        A data file longer than its record says is cut back (those bytes were never recorded as durable); one shorter
        (a disk that lost synced data) lowers the offset to what is there: never claim a byte that is not on disk.
        Leftovers of a crash (temp records, data files without a record) are removed.
        """
        os.makedirs(self.directory, exist_ok=True)
        names = os.listdir(self.directory)
        for name in names:
            if name.endswith(TEMPORARY_SUFFIX):
                remove_quietly(os.path.join(self.directory, name))
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix == RECORD_SUFFIX and is_upload_id(stem):
                await self._load(stem)
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix == DATA_SUFFIX and is_upload_id(stem) and stem not in self._uploads:
                remove_quietly(os.path.join(self.directory, name))  # a creation that never got its record

    async def _load(self, upload_id: str) -> None:
        files = UploadFiles(self.directory, upload_id)
        try:
            record = Record.decode(await read_small_file(files.record, _MAX_RECORD_BYTES))
            if record.upload_id != upload_id:
                raise ValueError(f"the record of {upload_id} names {record.upload_id}")
        except (OSError, ValueError) as error:
            log.warning(f"ignoring {files.record}: {error}")
            return
        if record.expired_at is not None:
            if self.clock() - record.expired_at > self.limits.expired_memory_seconds:
                files.remove()
            else:
                self._expired[upload_id] = record.expired_at
            return
        try:
            size = os.stat(files.data).st_size
        except FileNotFoundError:
            log.warning(f"ignoring {upload_id}: its data file is missing")
            return
        if size < record.durable_offset:
            log.warning(f"{upload_id}: the data file has {size} bytes, the record says {record.durable_offset} are durable")
            record = dataclasses.replace(record, durable_offset=size)
        elif size > record.durable_offset:
            os.truncate(files.data, record.durable_offset)
        self._uploads[upload_id] = Upload(record, files)

    async def run_housekeeping(self) -> None:
        """Run until cancelled: the flusher (async durability) and the sweep that expires abandoned uploads."""
        async with iokit.TaskGroup() as tasks:
            if self.durability is Durability.ASYNC:
                tasks.spawn(self._flush_loop, name="upload-flusher")
            tasks.spawn(self._sweep_loop, name="upload-expiry")

    async def close(self) -> None:
        """Make every accepted byte durable (async mode's last flush). Not cancellable: it is the last word."""
        with iokit.CancelScope(shield=True):
            await self.flush_all()

    # -- looking up --------------------------------------------------------------------------------------------------

    def uploads(self) -> list[Upload]:
        """Return every upload in the table (a copy: the table may change once the caller awaits)."""
        with self._lock:
            return list(self._uploads.values())

    async def lookup(self, upload_id: str) -> Upload:
        """Return the upload with this id. Raises 404 for an unknown id (any text that is not one of our ids is just
        a key that is not in the table), 410 for an expired one."""
        with self._lock:
            upload = self._uploads.get(upload_id)
            expired = upload_id in self._expired
        if upload is None:
            if expired:
                raise tus_error(410, "expired", "this upload expired and its data was removed")
            raise tus_error(404, "not_found", "no such upload")
        if self.has_expired(upload) and await self._expire(upload):
            raise tus_error(410, "expired", "this upload expired and its data was removed")
        return upload

    def expires_at(self, upload: Upload) -> float | None:
        """Return when ``upload`` expires (seconds since the epoch), or ``None`` for a finished one, which does not."""
        return None if upload.finished else upload.updated_at + self.limits.expiry_seconds

    def has_expired(self, upload: Upload) -> bool:
        expires_at = self.expires_at(upload)
        return expires_at is not None and self.clock() >= expires_at

    def _claim(self, upload: Upload) -> None:
        """Mark ``upload`` busy for this request; raise 423 if another request has it (or 404 if it is gone)."""
        with self._lock:
            if upload.removed:
                raise tus_error(404, "not_found", "no such upload")
            if upload.busy:
                raise tus_error(423, "locked", "another request is writing to this upload; retry when it is done")
            upload.busy = True

    def _release(self, upload: Upload) -> None:
        with self._lock:
            upload.busy = False

    # -- creating, concatenating, deleting ---------------------------------------------------------------------------

    async def create(self, length: int, metadata: dict[str, bytes], concat: Concat | None = None,
                     upload_id: str | None = None) -> Upload:
        """Create an empty upload of ``length`` bytes, durably (data file and record) in both modes. 507 if the disk
        is full.

        ``upload_id`` is for a replica, which keeps its primary's ids (``replication.py``): an upload of that id that
        exists already with the same length is returned as it is (the primary may ask again after losing an answer);
        with another length, or an expired one, it is a 409."""
        if upload_id is not None:
            existing = self._existing_for_replication(upload_id, length)
            if existing is not None:
                return existing
        self._promise(length)
        try:
            now = self.clock()
            record = Record(upload_id or new_upload_id(), length, metadata, concat, created_at=now, updated_at=now)
            files = UploadFiles(self.directory, record.upload_id)
            try:
                await files.create_data()
                await files.write_record(record)
            except BaseException as error:
                files.remove()
                if is_disk_full(error):
                    raise _disk_full("the disk is full; no upload can be created now") from None
                raise
            return self._add(Upload(record, files))
        finally:
            with self._lock:
                self._creating.remove(length)

    def _existing_for_replication(self, upload_id: str, length: int) -> Upload | None:
        with self._lock:
            upload = self._uploads.get(upload_id)
            expired = upload_id in self._expired
        if expired or (upload is not None and upload.length != length):
            raise tus_error(409, "upload_id_taken", f"upload {upload_id} exists here with another length, or expired")
        return upload

    def _promise(self, length: int) -> None:
        """Count a creation of ``length`` bytes against ``max_live_uploads`` and ``max_promised_bytes`` (503, 413),
        before its first await, so that creations running at once cannot all pass the same check."""
        limits = self.limits
        with self._lock:
            live = [upload.length for upload in self._uploads.values() if not upload.finished] + self._creating
            if len(live) >= limits.max_live_uploads:
                raise tus_error(503, "too_many_uploads", f"{len(live)} unfinished uploads are open, this server's "
                                f"limit; finish or delete one, or retry later",
                                headers=(("Retry-After", str(math.ceil(limits.sweep_interval))),))
            if sum(live) + length > limits.max_promised_bytes:
                raise tus_error(413, "too_many_bytes_promised", f"the unfinished uploads already promise {sum(live)} "
                                f"bytes; {length} more would pass this server's limit of {limits.max_promised_bytes}")
            self._creating.append(length)

    def _add(self, upload: Upload) -> Upload:
        with self._lock:
            self._uploads[upload.id] = upload
        return upload

    async def concatenate(self, part_ids: tuple[str, ...], metadata: dict[str, bytes],
                          upload_id: str | None = None) -> Upload:
        """Create a final upload joining the finished partial uploads ``part_ids`` in order, durably, and return it.

        Raises 404/410 for a part that does not exist, 400 for one that is not a finished partial upload, 413 when they
        add up to more than ``max_upload_bytes``, 423 when one is busy, 507 on a full disk (nothing is left behind).
        """
        parts = [await self.lookup(part_id) for part_id in part_ids]
        for part in parts:
            if part.concat is None or part.concat.kind != "partial":
                raise tus_error(400, "invalid_concat", f"upload {part.id} is not a partial upload")
            if not part.finished:
                raise tus_error(400, "partial_not_finished", f"partial upload {part.id} has {part.offset} of its "
                                                             f"{part.length} bytes; finish it first")
        total = sum(part.length for part in parts)
        if upload_id is not None:
            existing = self._existing_for_replication(upload_id, total)
            if existing is not None:
                return existing
        if total > self.limits.max_upload_bytes:
            raise tus_error(413, "upload_too_large", f"the parts add up to {total} bytes, over the Tus-Max-Size of "
                                                     f"{self.limits.max_upload_bytes}")
        distinct = list({part.id: part for part in parts}.values())  # a part may be listed twice
        claimed = []
        try:
            for part in distinct:
                self._claim(part)
                claimed.append(part)
            for part in distinct:
                await self.flush(part)
            now = self.clock()
            record = Record(upload_id or new_upload_id(), total, metadata, Concat("final", tuple(part_ids)),
                            created_at=now, updated_at=now, durable_offset=total)
            files = UploadFiles(self.directory, record.upload_id)
            try:
                await self._join(parts, files, total)
                await files.write_record(record)
            except BaseException as error:
                files.remove()
                if is_disk_full(error):
                    raise _disk_full(f"the disk has no room for a final upload of {total} bytes") from None
                raise
        finally:
            for part in claimed:
                self._release(part)
        upload = Upload(record, files)
        return self._add(upload)

    async def _join(self, parts: list[Upload], files: UploadFiles, total: int) -> None:
        await files.create_data()
        destination = await files.open_data(os.O_WRONLY)
        try:
            reserve_space(destination, 0, total, self.limits.disk_headroom_bytes)
            offset = 0
            for part in parts:
                pieces = await self._open_pieces(part)
                try:
                    async for piece in pieces:
                        await destination.write_all_at(piece, offset)
                        offset += len(piece)
                finally:
                    await pieces.aclose()
            await destination.fdatasync()
        finally:
            await destination.aclose()

    async def delete(self, upload: Upload) -> None:
        """Remove ``upload`` and its files (termination). Raises 423 while a request is writing to it."""
        self._claim(upload)
        try:
            async with upload.io_lock:
                with self._lock:
                    upload.removed = True
                    self._uploads.pop(upload.id, None)
                upload.files.remove()
                await fsync_directory(self.directory)
        finally:
            self._release(upload)

    async def _expire(self, upload: Upload) -> bool:
        """Remove an expired upload's data and remember its id (410). Return ``False`` if a request holds it."""
        try:
            self._claim(upload)
        except HttpError:  # busy (a PATCH is making it grow: not abandoned after all) or already removed
            return upload.removed
        try:
            async with upload.io_lock:
                now = self.clock()
                with self._lock:
                    upload.removed = True
                    self._uploads.pop(upload.id, None)
                    self._expired[upload.id] = now
                    upload.buffer, upload.buffered_bytes = [], 0
                try:
                    await upload.files.write_record(dataclasses.replace(upload.record, expired_at=now))
                    remove_quietly(upload.files.data)
                except OSError as error:
                    log.warning(f"could not record the expiry of {upload.id} ({error}); removing it")
                    upload.files.remove()
        finally:
            self._release(upload)
        return True

    async def _sweep_loop(self) -> None:
        while True:
            await iokit.sleep(min(self.limits.sweep_interval, self.limits.expiry_seconds / 2))
            with self._lock:
                uploads = list(self._uploads.values())
                forgotten = [upload_id for upload_id, expired_at in self._expired.items()
                             if self.clock() - expired_at > self.limits.expired_memory_seconds]
                for upload_id in forgotten:
                    del self._expired[upload_id]
            for upload_id in forgotten:
                UploadFiles(self.directory, upload_id).remove()
            for upload in uploads:
                if self.has_expired(upload):
                    await self._expire(upload)

    # -- writing -----------------------------------------------------------------------------------------------------

    def patch(self, upload: Upload, offset: int, declared_length: int | None, checksum: Checksum | None,
              replicator: "Replicator | None" = None) -> "Chunk":
        """Return the ``Chunk`` (an async context manager) that takes one PATCH's bytes into ``upload``.

        Entering it raises 403 for a final upload, 423 if another request is writing, 409 if ``offset`` is not the
        upload's offset, 413 if ``declared_length`` runs past the upload's length, 507 if the disk cannot hold it.

        ``replicator`` (replication, see ``Replicator``) is given every chunk that is kept, the upload still held and
        HEAD answering 423: if it raises, the chunk is taken back (``rewind``) and the error goes to the client.
        """
        return Chunk(self, upload, offset, declared_length, checksum, replicator)

    async def rewind(self, upload: Upload, offset: int) -> None:
        """Cut ``upload`` back to ``offset`` bytes, durably (a replica, on its primary's word: the primary took back a
        chunk this replica may have received). Raises 423 while a request writes to it, 409 past its offset."""
        self._claim(upload)
        try:
            if offset > upload.offset:
                raise tus_error(409, "rewind_past_offset", f"cannot rewind to {offset}: the upload is at "
                                                           f"{upload.offset}")
            await self._rewind_claimed(upload, offset)
        finally:
            self._release(upload)

    async def _rewind_claimed(self, upload: Upload, offset: int) -> None:
        with iokit.CancelScope(shield=True):
            async with upload.io_lock:
                with self._lock:
                    upload.buffer = [(start, data[:offset - start]) for start, data in upload.buffer if start < offset]
                    upload.buffered_bytes = sum(len(data) for _, data in upload.buffer)
                    upload.offset = min(upload.offset, offset)
                file = await upload.files.open_data(os.O_RDWR)
                try:
                    truncate(file, offset)
                    if upload.durable_offset > offset:
                        await file.fdatasync()
                        await self._record_durable(upload, offset, upload.updated_at)
                finally:
                    await file.aclose()

    async def read_accepted(self, upload: Upload, offset: int, size: int) -> list[bytes | bytearray]:
        """Return ``size`` accepted bytes of ``upload`` from ``offset`` as a list of pieces (what a replication sender
        ships), whether async mode still holds them in memory or they are in the data file. Buffered pieces are
        returned as they are (no copy: they are immutable, and the flusher only drops its references); the rest is
        read from the file. Raises ``OSError`` (the file), 404 if the upload was removed."""
        if offset + size > upload.offset:
            raise ValueError(f"bytes up to {offset + size} of {upload.id} are not accepted (offset {upload.offset})")
        end = offset + size
        async with upload.io_lock:  # the flusher moves bytes from the buffer to the file under this lock
            if upload.removed:
                raise tus_error(404, "not_found", "no such upload")
            with self._lock:
                pending = [(start, piece) for start, piece in upload.buffer
                           if start < end and start + len(piece) > offset]
            # The buffered pieces are in offset order; the gaps between them (flushed already, or written in place:
            # a chunk with a checksum) are read from the file, one read per gap, from one open.
            pieces: list[bytes | bytearray] = []
            file = None
            try:
                cursor = offset
                for start, piece in [*pending, (end, b"")]:
                    if start > cursor:
                        if file is None:
                            file = await upload.files.open_data(os.O_RDONLY)
                        pieces.append(await _read_exactly(file, upload, cursor, start - cursor))
                    low, high = max(start, offset), min(start + len(piece), end)
                    if high > low:
                        whole = low == start and high == start + len(piece)
                        pieces.append(piece if whole else piece[low - start:high - start])
                    cursor = max(cursor, high)
            finally:
                if file is not None:
                    await file.aclose()
        return pieces

    def _accept_buffered(self, upload: Upload, piece: bytes) -> None:
        """Async mode: ``piece`` is accepted (it counts in the offset) and waits in memory for the flusher, as it is:
        the received ``bytes`` (immutable) are kept, not copied; the flusher writes them gathered (``pwritev``)."""
        with self._lock:
            upload.buffer.append((upload.offset, piece))
            upload.buffered_bytes += len(piece)
            upload.offset += len(piece)
            upload.updated_at = self.clock()

    def _accept_in_place(self, upload: Upload, new_offset: int) -> None:
        """Async mode: bytes already written in place up to ``new_offset`` are accepted; the flusher syncs them."""
        with self._lock:
            upload.offset = new_offset
            upload.updated_at = self.clock()
        self._wake_flusher_if_full(upload)

    async def _wait_for_buffer_room(self, upload: Upload) -> None:
        """Async mode: wait while more than ``max_buffered_bytes`` of ``upload`` wait for a flush (backpressure)."""
        while True:
            taken = upload.buffer_taken  # before the check: the flusher counts the bytes off, then sets this event
            if upload.buffered_bytes <= self.limits.max_buffered_bytes or upload.removed:
                return
            self._wake_flusher.set()
            await taken.wait()

    def _wake_flusher_if_full(self, upload: Upload) -> None:
        if upload.offset - upload.durable_offset > self.limits.max_buffered_bytes:
            self._wake_flusher.set()

    async def _record_durable(self, upload: Upload, durable_offset: int, updated_at: float) -> None:
        """Replace ``upload``'s record with one saying ``durable_offset`` bytes are durable. Raises ``OSError``."""
        record = dataclasses.replace(upload.record, durable_offset=durable_offset, updated_at=updated_at)
        await upload.files.write_record(record)
        upload.record = record

    # -- the flusher (async durability) ------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        interval = self.limits.flush_interval
        next_flush = iokit.current_time() + interval
        while True:
            wake = self._wake_flusher
            with iokit.CancelScope(deadline=next_flush):
                await wake.wait()
            if wake.is_set():
                self._wake_flusher = iokit.Event()
            next_flush = iokit.current_time() + interval  # flushes start at most one interval apart
            await self.flush_all()

    async def flush_all(self) -> None:
        """Flush every upload with accepted bytes that are not yet durable."""
        with self._lock:
            uploads = list(self._uploads.values())
        for upload in uploads:
            await self.flush(upload)

    async def flush(self, upload: Upload) -> None:
        """Write ``upload``'s buffered bytes, fdatasync, and record the new durable offset (no-op when nothing is
        pending, and in sync mode). Not cancellable half-way: a flush that started finishes. On an error (the disk)
        the bytes go back to the buffer for the next flush, and the error is logged."""
        with iokit.CancelScope(shield=True):
            async with upload.io_lock:
                with self._lock:
                    if upload.removed or (upload.offset == upload.durable_offset and not upload.buffer):
                        return
                    entries, upload.buffer = upload.buffer, []
                    taken_bytes = sum(len(data) for _, data in entries)
                    upload.buffered_bytes -= taken_bytes
                    target, updated_at = upload.offset, upload.updated_at
                taken, upload.buffer_taken = upload.buffer_taken, iokit.Event()
                taken.set()  # a PATCH waiting for room goes on while these are written and synced
                try:
                    file = await upload.files.open_data(os.O_WRONLY)
                    try:
                        for offset, pieces in _contiguous_runs(entries):
                            await write_pieces_at(file, pieces, offset)
                        await file.fdatasync()
                    finally:
                        await file.aclose()
                    await self._record_durable(upload, target, updated_at)
                except OSError as error:
                    log.warning(f"flushing {upload.id} failed, retrying at the next flush: {error}")
                    with self._lock:
                        upload.buffer[:0] = entries
                        upload.buffered_bytes += taken_bytes

    # -- reading -----------------------------------------------------------------------------------------------------

    async def download(self, upload: Upload) -> "FilePieces":
        """Return the bytes of a finished upload as ``FilePieces`` (flushed first; the caller closes it).
        Raises 409 for an unfinished upload."""
        if not upload.finished:
            raise tus_error(409, "upload_not_finished", f"the upload has {upload.offset} of its {upload.length} bytes")
        await self.flush(upload)
        return await self._open_pieces(upload)

    async def _open_pieces(self, upload: Upload) -> "FilePieces":
        file = await upload.files.open_data(os.O_RDONLY)
        return FilePieces(file, upload.length, self.limits.copy_piece_bytes)


async def _read_exactly(file: iokit.File, upload: Upload, offset: int, size: int) -> bytearray:
    data = bytearray(size)
    count = await file.read_into_at(data, offset)
    if count != size:
        raise OSError(f"{upload.files.data} ends at {offset + count}, before accepted byte {offset + size}")
    return data


def _contiguous_runs(entries: list[tuple[int, bytes]]) -> list[tuple[int, list[bytes]]]:
    """Group buffered ``(offset, piece)`` entries into runs of pieces that follow one another: one gathered write each
    (the entries of one upload are one run, unless a rewind cut them)."""
    runs: list[tuple[int, list[bytes]]] = []
    end = -1
    for offset, piece in entries:
        if offset != end:
            runs.append((offset, []))
        runs[-1][1].append(piece)
        end = offset + len(piece)
    return runs


MAX_HELD_CHUNK_BYTES = 4 * 1024 * 1024
"""A chunk replicated before it is accepted is kept in memory up to this size (as the pieces received, no copy), so
that it is shipped while it is made durable here; a larger one is shipped after, read back from the data file."""


class Replicator(Protocol):
    """What ``UploadStore.patch`` gives each kept chunk to (``replication.Replication``).

    With ``confirms_before_accepting`` (sync replication) no byte of a chunk may count in the offset before
    ``replicate`` returned: the chunk is written in place, not through async mode's buffer, and a chunk of known size
    up to ``MAX_HELD_CHUNK_BYTES`` is handed over *while* it is synced here (``pieces``: what was received of
    ``[start, end)``, the offset still at ``start``), so that the local fdatasync and the replicas' overlap. Otherwise
    ``replicate`` is called once the chunk is kept (``pieces`` is ``None``: the bytes are accepted, the store has
    them). ``took_back`` says that a chunk handed over was not kept here after all (the local commit failed), so what
    the replicas took of it is not ours."""

    confirms_before_accepting: bool

    async def replicate(self, upload: Upload, start: int, end: int, pieces: list[bytes] | None) -> None: ...

    def took_back(self, upload: Upload, start: int) -> None: ...


class FilePieces:
    """The first ``length`` bytes of an open file as an async iterable of pieces; ``aclose()`` closes the file.

    The file is opened before this is handed out (so a missing file fails before a response starts), and closed by
    ``aclose`` whether or not the iteration ever started: the HTTP server closes a response body either way.
    """

    def __init__(self, file: iokit.File, length: int, piece_bytes: int):
        self._file = file
        self._length = length
        self._piece_bytes = piece_bytes

    async def __aiter__(self) -> AsyncIterator[bytes]:
        offset = 0
        while offset < self._length:
            piece = await self._file.read_at(min(self._piece_bytes, self._length - offset), offset)
            if not piece:
                raise OSError(f"the file ends at {offset}, not at {self._length}")
            offset += len(piece)
            yield piece

    async def aclose(self) -> None:
        await self._file.aclose()


class Chunk:
    """One PATCH's bytes on their way into an upload: ``write`` each piece, then ``complete``.

    Leaving the ``async with`` block without ``complete`` keeps the bytes that arrived if the body was cut off (the
    client went away, stalled, or the server is stopping) and no checksum was promised; any other way out (413, 507, an
    error) discards them, leaving the upload as it was.
    """

    def __init__(self, store: UploadStore, upload: Upload, offset: int, declared_length: int | None,
                 checksum: Checksum | None, replicator: Replicator | None = None):
        self.store = store
        self.upload = upload
        self.start = offset
        self.declared_length = declared_length
        self.checksum = checksum
        self.received = 0
        self.replicator = replicator
        confirms = replicator is not None and replicator.confirms_before_accepting
        # The whole chunk's pieces, kept to replicate it while it is committed (see Replicator).
        self._held: list[bytes] | None = [] if confirms and declared_length is not None \
            and declared_length <= MAX_HELD_CHUNK_BYTES else None
        self._hasher = checksum.new_hasher() if checksum is not None else None
        # Bytes that may still be refused once the body is in must not reach the flusher: write them in place.
        self._in_place = (store.durability is Durability.SYNC or checksum is not None or declared_length is None
                          or confirms)
        self._unwritten: list[bytes] = []  # in place: pieces received, not yet written (one gathered write per MiB)
        self._unwritten_bytes = 0
        self._settled = False
        self._file: iokit.File | None = None

    async def __aenter__(self) -> "Chunk":
        upload, store = self.upload, self.store
        if upload.concat is not None and upload.concat.kind == "final":
            raise tus_error(403, "final_upload", "a final upload is made by concatenation and cannot be patched")
        store._claim(upload)
        try:
            if self.start != upload.offset:
                raise tus_error(409, "offset_mismatch", f"Upload-Offset is {self.start} but the upload is at "
                                                        f"{upload.offset}; HEAD it and resume from there")
            if self.declared_length is not None and self.declared_length > upload.length - upload.offset:
                raise tus_error(413, "beyond_upload_length", f"{self.declared_length} bytes at offset {upload.offset} "
                                                             f"run past the Upload-Length of {upload.length}")
            self._file = await upload.files.open_data(os.O_RDWR)
            try:
                reserve_space(self._file, self.start, self.declared_length or 0, store.limits.disk_headroom_bytes)
            except OSError as error:
                await self._file.aclose()
                if is_disk_full(error):
                    raise _disk_full(f"the disk has no room for {self.declared_length} more bytes") from None
                raise
        except BaseException:
            store._release(upload)
            raise
        return self

    async def write(self, piece: bytes) -> None:
        """Take the next piece of the body. Raises 413 past the upload's length, 507 on a full disk.

        The piece is kept by reference until written (``bytes``, as the HTTP core hands it over); any other buffer is
        copied first, since its owner may reuse it."""
        if type(piece) is not bytes:
            piece = bytes(piece)
        if self.received + len(piece) > self.upload.length - self.start:
            raise tus_error(413, "beyond_upload_length", f"the body runs past the Upload-Length of "
                                                         f"{self.upload.length}", close=True)
        self.received += len(piece)
        if self._hasher is not None:
            self._hasher.update(piece)
        if self._held is not None:
            self._held.append(piece)
        if self._in_place:
            self._unwritten.append(piece)
            self._unwritten_bytes += len(piece)
            if self._unwritten_bytes >= self.store.limits.copy_piece_bytes:
                await self._write_unwritten()
        else:
            self.store._accept_buffered(self.upload, piece)
            await self.store._wait_for_buffer_room(self.upload)

    async def complete(self) -> None:
        """The whole body arrived: verify the checksum (460, chunk discarded, on a mismatch) and keep the chunk
        (in sync mode: durably, before returning). Raises 507 if the disk fills (the chunk is then discarded)."""
        if self._hasher is not None and self._hasher.digest() != self.checksum.digest:
            await self._discard()
            raise tus_error(CHECKSUM_MISMATCH, "checksum_mismatch",
                            f"the {self.checksum.algorithm} of the {self.received} bytes received differs from "
                            f"Upload-Checksum; the chunk was discarded")
        await self._keep()

    async def _write_unwritten(self) -> None:
        pieces, size = self._unwritten, self._unwritten_bytes
        self._unwritten, self._unwritten_bytes = [], 0
        try:
            await write_pieces_at(self._file, pieces, self.start + self.received - size)
        except OSError as error:
            if is_disk_full(error):
                raise _disk_full("the disk filled up during this chunk; it was discarded") from None
            raise

    async def _keep(self) -> None:
        # Until the offset is updated (or the chunk discarded), a HEAD would report the offset before the chunk: for
        # ~20 ms after a client died mid-PATCH in sync mode, then the real one. It answers 423 meanwhile (as tusd).
        self.upload.committing = True
        try:
            if self.replicator is None:
                await self._commit()
            elif self._held is not None and self.received:
                await self._commit_while_replicating()
            else:
                await self._commit()
                if self.upload.offset > self.start:
                    await self._replicate(self.upload.offset, None)
        finally:
            self.upload.committing = False

    async def _replicate(self, end: int, pieces: list[bytes] | None) -> None:
        """Hand the kept chunk to the replicator; if it fails, take the chunk back (durably) and raise."""
        try:
            await self.replicator.replicate(self.upload, self.start, end, pieces)
        except BaseException:
            await self.store._rewind_claimed(self.upload, self.start)
            raise

    async def _commit_while_replicating(self) -> None:
        """Sync replication: ship the chunk from memory while it is made durable here; the 204 waits for both."""
        end = self.start + self.received
        shipped: list[BaseException | None] = []

        async def ship() -> None:
            try:
                await self.replicator.replicate(self.upload, self.start, end, self._held)
            except BaseException as error:  # judged once the local commit is known, below
                shipped.append(error)
            else:
                shipped.append(None)

        try:
            async with iokit.TaskGroup() as tasks:
                tasks.spawn(ship, name="replicate-chunk")
                await self._commit()
        except BaseException:
            self.replicator.took_back(self.upload, self.start)  # not kept here: what the replicas took is not ours
            raise
        if shipped[0] is not None:
            await self.store._rewind_claimed(self.upload, self.start)
            raise shipped[0]

    async def _commit(self) -> None:
        self._settled = True
        upload, store = self.upload, self.store
        new_offset = self.start + self.received
        try:
            if self._in_place:
                await self._write_unwritten()
            truncate(self._file, new_offset)  # drop the unused end of the reservation (a body cut short)
            if store.durability is Durability.ASYNC:
                if self._in_place:
                    store._accept_in_place(upload, new_offset)
                return
            await self._file.fdatasync()
            async with upload.io_lock:
                await store._record_durable(upload, new_offset, store.clock())
        except BaseException as error:
            await self._discard()
            if is_disk_full(error):
                raise _disk_full("the disk filled up during this chunk; it was discarded") from None
            raise
        with store._lock:
            upload.offset = new_offset
            upload.updated_at = upload.record.updated_at

    async def _discard(self) -> None:
        """Put the data file back as it was: in place, nothing past the accepted offset survives."""
        self._settled = True
        self._unwritten, self._unwritten_bytes = [], 0
        truncate(self._file, self.upload.offset)

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            with iokit.CancelScope(shield=True):
                if exc is not None and not self._settled:
                    cut_off = isinstance(exc, (BodyIncomplete, iokit.Cancelled))
                    if cut_off and self.checksum is None:
                        try:
                            await self._keep()
                        except Exception as error:  # the client is gone: nobody to tell but the log
                            log.warning(f"keeping the {self.received} bytes of a cut-off chunk of {self.upload.id} failed: "
                                 f"{error}")
                    else:
                        await self._discard()
        finally:
            await self._file.aclose()
            self.store._release(self.upload)
