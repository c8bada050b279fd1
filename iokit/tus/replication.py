"""Replication: every chunk the upload server keeps is also written to other upload servers, its replicas.

A replica is an upload server started with ``--accept-replication``: it then honours two headers only a primary sends,
``Iokit-Upload-Id`` on a creation (the replica keeps its primary's ids, so a client that loses the primary resumes at
the same path on the replica) and ``Iokit-Rewind`` on a PATCH (see below). The primary talks to each replica over one
keep-alive connection of ``iokit.http.client``, on the server's own backend, with plain tus requests.

Two modes, the seed's two kinds of asynchrony side by side:

* ``sync``: a chunk is shipped to every replica while it is committed locally (from the pieces received, for a chunk
  of known size up to ``store.MAX_HELD_CHUNK_BYTES``; a larger one after, read back from the data file), and the 204
  leaves only once the local commit is done and every replica answered 204 (each replica's own ``--durability``
  decides what its 204 means). A replica that is down, or slower than ``--replica-timeout``, makes the primary take
  the chunk back (the upload is cut back to where the request found it) and answer 503 with ``Retry-After``: never an
  acknowledgement it cannot keep; a local commit that fails after the replicas took the chunk makes their copy
  untrusted (``took_back``: the next shipment asks where they stand, and rewinds them). HEAD answers 423 while a chunk is being
  confirmed, so no offset is shown before the replicas have it. A creation, too, is on every replica before its 201.
* ``async``: the 204 leaves once the chunk is kept locally; a sender task per replica ships chunks in the order they
  were accepted. What it has not shipped yet is its *backlog*, bounded by ``max_backlog_bytes``: past it, a PATCH waits
  before reading its body (up to ``--replica-timeout``, then 503): the clients are slowed down, memory does not grow
  (the backlog holds offsets, not bytes: the sender reads the bytes from the store). ``GET /stats`` reports each
  replica's lag, in bytes and in seconds (the age of the oldest unshipped chunk).

What the primary believes about a replica is ``confirmed``: per upload, the offset below which the replica's bytes are
the primary's own (each 204 of the replica moves it; at start, what the primary holds). A belief the replica has not
backed (at start; after the replica restarted) is ``unverified`` until the replica answered a HEAD: the lag counts such
an upload whole, since the replica may lack any of it (a primary killed with a backlog, then started again, reported 0
before). After any failure the primary no longer knows where the replica stands, and asks: HEAD the replica (404: create
it there; a final upload by joining its parts there, or, if they are gone here and not whole there, from its own bytes),
and go on from the smaller of its offset and ``confirmed``. The replica can be *ahead*: a chunk it made durable whose
204 never reached the primary (a timeout), which the primary then took back, and the client may send other bytes in its
place. The primary then sends ``Iokit-Rewind: 1`` with the PATCH at its own offset, and the replica cuts its copy back
first. The same path catches up a replica that restarted (it resumes from the offset it kept) and one that was away
while uploads were created (404, so created). At start the primary queues every upload it holds (async mode), so what
was not shipped before a restart is shipped after it. An idle link asks its replica every second for its epoch
(``GET /stats``: a new one each time its store opens); a replica that restarted may have lost what its own durability
had not kept, even of finished uploads, so every upload is checked there again (async mode; in sync mode the next chunk
of each upload asks first). When the primary takes a chunk back (sync), every replica's ``confirmed`` falls to the
chunk's start, also on the replicas that did take it.

One connection per replica for the shipments, one exchange at a time (the probe has its own): in sync mode concurrent
uploads take turns on it (a limit, not a rule: a pool of connections would lift it).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import logging
import math
import threading
import time

import iokit

from ..http.client import Endpoint, HttpClientError, HttpConnection
from ..http.errors import HttpError
from . import protocol
from .protocol import TUS_VERSION, tus_error, upload_path
from .store import Upload, UploadStore

log = logging.getLogger("iokit.tus.replication")

UPLOAD_ID_HEADER = "Iokit-Upload-Id"
REWIND_HEADER = "Iokit-Rewind"
DEFAULT_REPLICA_TIMEOUT = 5.0
DEFAULT_MAX_BACKLOG_BYTES = 64 * 1024 * 1024
STOP_DRAIN_SECONDS = 5.0              # async mode: how long a clean stop waits for the replicas to take the backlog
SHIPMENT_BYTES = 4 * 1024 * 1024     # one replication PATCH carries at most this much (a catch-up is several)
READ_PIECE_BYTES = SHIPMENT_BYTES    # a shipment is read in one piece: one open and one read, sent as it is
RETRY_PAUSES = (0.05, 0.2, 0.5, 1.0)  # async sender: pauses after successive failures (the last one repeats)
PROBE_INTERVAL = 1.0                  # how often an idle link asks the replica whether it restarted (GET /stats)


class ReplicationMode(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"


class ReplicaFailed(Exception):
    """A replica did not take what it was sent (down, slow, or an unexpected answer)."""


def _unavailable(detail: str, retry_after: float) -> HttpError:
    return tus_error(503, "replica_unavailable", detail, headers=(("Retry-After", str(max(1, math.ceil(retry_after)))),))


@dataclasses.dataclass
class _Pending:
    """An entry of an async backlog: bring ``upload`` on the replica up to ``end`` (or delete it there)."""

    upload: Upload
    end: int
    byte_count: int
    enqueued_at: float
    delete: bool = False


class ReplicaLink:
    """One replica, as the primary sees it: the connection, what it trusts the replica holds, and (async) the backlog."""

    def __init__(self, url: str, store: UploadStore, timeout: float):
        self.url = url
        self.store = store
        self.timeout = timeout
        self.connection = HttpConnection(Endpoint.from_url(url), timeout)
        # The restart probe has a connection of its own: a probe that hangs (a replica that is stopping accepts into
        # its backlog and never answers) must never hold up a chunk's shipment behind ``exchange_lock``.
        self.probe_connection = HttpConnection(Endpoint.from_url(url), min(timeout, PROBE_INTERVAL))
        self.confirmed: dict[str, int] = {}  # per upload: below this, whatever the replica holds is the primary's
        self.in_step: set[str] = set()       # uploads whose replica offset *is* ``confirmed`` (else: HEAD it first)
        self.unverified: set[str] = set()    # uploads whose ``confirmed`` the replica has not backed: the lag counts
        #                                      them whole until it answers a HEAD (at start; after it restarted)
        self.exchange_lock = iokit.Lock()
        self.backlog: collections.deque[_Pending] = collections.deque()
        self.backlog_bytes = 0
        self.backlog_lock = threading.Lock()  # the blocking backend's tasks are threads
        self.work_arrived = iokit.Event()
        self.room_made = iokit.Event()
        self.shipped_bytes = 0
        self.failures = 0
        self.last_error: str | None = None
        self.up = False
        self.replica_epoch: str | None = None  # the replica store's run, from its GET /stats: a new one is a restart

    # -- bringing one upload up to date ------------------------------------------------------------------------------

    async def bring_up_to(self, upload: Upload, end: int, fresh: "_Fresh | None" = None) -> None:
        """Make the replica hold ``upload``'s bytes ``[0, end)``, as the primary has them. Raises ``ReplicaFailed``.

        ``fresh`` holds the chunk being committed (sync mode): its bytes, not accepted yet, are sent from memory; the
        bytes before it come from the store."""
        async with self.exchange_lock:
            for attempt in (1, 2):  # a keep-alive connection the replica closed (a restart) fails once: try anew
                try:
                    await self._ship(upload, end, fresh)
                    self.up, self.last_error = True, None
                    return
                except (HttpClientError, ReplicaFailed, OSError) as error:
                    self.in_step.discard(upload.id)
                    self.failures += 1
                    self.up, self.last_error = False, str(error)
                    if attempt == 2:
                        raise ReplicaFailed(str(error)) from error
                except BaseException:
                    self.in_step.discard(upload.id)  # cancelled half-way: what the replica has is unknown
                    raise

    async def _ship(self, upload: Upload, end: int, fresh: "_Fresh | None" = None) -> None:
        offset = self.confirmed.get(upload.id, 0)
        rewind = False
        if upload.id not in self.in_step:
            replica_offset, created_now = await self._find_or_create(upload)
            if created_now:  # what it holds now (nothing, or a final's joined parts) came from us this instant
                offset = replica_offset
            offset = min(replica_offset, offset, end)
            rewind = replica_offset > offset  # it holds bytes we cannot vouch for: cut them off first
            self.confirmed[upload.id] = offset
            self.in_step.add(upload.id)
            self.unverified.discard(upload.id)
        while offset < end or rewind:
            size = min(SHIPMENT_BYTES, end - offset)
            headers = [("Tus-Resumable", TUS_VERSION), ("Content-Type", protocol.PATCH_CONTENT_TYPE),
                       ("Upload-Offset", str(offset))]
            if rewind:
                headers.append((REWIND_HEADER, "1"))
            response = await self.connection.request("PATCH", upload_path(upload.id), headers,
                                                     self._pieces(upload, offset, size, fresh),
                                                     content_length=size)
            if response.status != 204:
                raise ReplicaFailed(f"PATCH at {offset}: {response.status} {response.body[:200]!r}")
            offset += size
            self.confirmed[upload.id] = offset
            self.shipped_bytes += size
            rewind = False

    async def _pieces(self, upload: Upload, offset: int, size: int, fresh: "_Fresh | None"):
        end = offset + size
        from_store_end = end if fresh is None else max(offset, min(fresh.start, end))
        done = offset
        while done < from_store_end:
            piece = min(READ_PIECE_BYTES, from_store_end - done)
            for part in await self.store.read_accepted(upload, done, piece):
                yield part  # async durability's buffered pieces as received: sent by reference, no copy
            done += piece
        if from_store_end < end:
            for part in fresh.between(from_store_end, end):
                yield part

    async def _find_or_create(self, upload: Upload) -> tuple[int, bool]:
        """Return the replica's offset of ``upload`` and whether it was created there just now (it did not know it)."""
        response = await self.connection.request("HEAD", upload_path(upload.id), [("Tus-Resumable", TUS_VERSION)])
        if response.status == 200:
            return int(response.headers.get("upload-offset", "0")), False
        if response.status != 404:
            raise ReplicaFailed(f"HEAD: {response.status}")
        headers = [("Tus-Resumable", TUS_VERSION), (UPLOAD_ID_HEADER, upload.id)]
        if upload.metadata:
            headers.append(("Upload-Metadata", protocol.encode_metadata(upload.metadata)))
        if upload.concat is not None and upload.concat.kind == "final":
            response = await self._join_there(upload, headers)
            if response is not None:
                return int(response.headers.get("upload-offset", "0")), True
            # Its parts are gone here (deleted or expired once joined) and not whole there: the final's own bytes go,
            # as a plain upload of its id (the replica's copy lacks the final's Upload-Concat, not a byte).
            headers.append(("Upload-Length", str(upload.length)))
        else:
            headers.append(("Upload-Length", str(upload.length)))
            if upload.concat is not None:
                headers.append(("Upload-Concat", upload.concat.header_value()))
        response = await self.connection.request("POST", protocol.COLLECTION_PATH, headers)
        if response.status != 201:
            raise ReplicaFailed(f"creating {upload.id}: {response.status} {response.body[:200]!r}")
        return int(response.headers.get("upload-offset", "0")), True

    async def _join_there(self, upload: Upload, headers: list[tuple[str, str]]):
        """Create the final ``upload`` on the replica as it was made here, by joining its parts there (each made whole
        there first). Return the 201, or ``None`` if the replica cannot join them: a part deleted or expired here
        before the replica had it whole (the final acknowledged it all the same, so its bytes must still go)."""
        for part_id in upload.concat.part_ids:
            try:
                part = await self.store.lookup(part_id)
            except HttpError:  # gone here since the final was made: the replica may hold it whole all the same
                continue
            await self._ship(part, part.length)
        response = await self.connection.request(
            "POST", protocol.COLLECTION_PATH, [*headers, ("Upload-Concat", upload.concat.header_value())])
        if response.status == 201:
            return response
        if response.status in (400, 404, 410):  # a part it lacks, or holds only in part
            return None
        raise ReplicaFailed(f"joining {upload.id}: {response.status} {response.body[:200]!r}")

    def took_back(self, upload_id: str, offset: int) -> None:
        """The primary cut ``upload_id`` back to ``offset`` (a chunk another replica did not confirm): whatever this
        replica holds past it is not ours any more."""
        if upload_id in self.confirmed:
            self.confirmed[upload_id] = min(self.confirmed[upload_id], offset)
        self.in_step.discard(upload_id)

    async def replica_restarted(self) -> bool:
        """Ask the replica for its epoch; return ``True`` if it differs from the one seen before (it restarted, and
        may have lost what its own durability did not keep). A replica that does not answer is not a restart."""
        try:
            response = await self.probe_connection.request("GET", "/stats")
            epoch = json.loads(response.body)["epoch"] if response.status == 200 else None
        except (HttpClientError, ValueError, KeyError, TypeError):
            return False  # down or stopping: the shipments say so; a restart is seen once it answers
        restarted = self.replica_epoch is not None and epoch != self.replica_epoch
        self.replica_epoch = epoch
        if restarted:
            log.warning(f"{self.url} restarted; checking every upload there")
            self.in_step.clear()
            self.unverified.update(self.confirmed)  # it may have lost what its own durability had not kept
        return restarted

    async def delete(self, upload_id: str) -> None:
        """Terminate the upload on the replica too (one it never had is fine). Raises ``ReplicaFailed``."""
        async with self.exchange_lock:
            self.confirmed.pop(upload_id, None)
            self.in_step.discard(upload_id)
            self.unverified.discard(upload_id)
            try:
                response = await self.connection.request("DELETE", upload_path(upload_id),
                                                         [("Tus-Resumable", TUS_VERSION)])
            except HttpClientError as error:
                self.up, self.last_error = False, str(error)
                raise ReplicaFailed(f"{self.url}: {error}") from error
            if response.status not in (204, 404, 410):
                raise ReplicaFailed(f"{self.url}: DELETE {response.status}")

    # -- async mode: the backlog and its sender ----------------------------------------------------------------------

    def enqueue(self, upload: Upload, end: int, byte_count: int, delete: bool = False) -> None:
        with self.backlog_lock:
            self.backlog.append(_Pending(upload, end, byte_count, time.time(), delete))
            self.backlog_bytes += byte_count
        self.work_arrived.set()

    def lag(self) -> tuple[int, float]:
        """Return (bytes accepted by the primary and not confirmed by this replica, seconds the oldest unshipped
        chunk waits). The bytes count from ``confirmed``, not from the backlog's entries, and from 0 while it is
        ``unverified``: after a restart of either side the replica may be further behind than the chunks queued since,
        and the lag must not hide it (it is an upper bound of what losing the primary now would lose)."""
        with self.backlog_lock:
            oldest = self.backlog[0].enqueued_at if self.backlog else None
            wanted: dict[str, int] = {}
            for entry in self.backlog:
                if not entry.delete:
                    wanted[entry.upload.id] = max(wanted.get(entry.upload.id, 0), entry.end)
        behind = sum(max(0, end - (0 if upload_id in self.unverified else self.confirmed.get(upload_id, 0)))
                     for upload_id, end in wanted.items())
        return behind, 0.0 if oldest is None else max(0.0, time.time() - oldest)

    async def run_sender(self) -> None:
        """Ship the backlog in order, until cancelled; after a failure, pause and try the same entry again."""
        failures = 0
        while True:
            with self.backlog_lock:
                head = self.backlog[0] if self.backlog else None
                if head is None:
                    arrived = self.work_arrived = iokit.Event()
                else:  # every entry of the same upload at the head of the queue: one shipment
                    batch = [head] if head.delete else list(_leading_run(self.backlog, head.upload))
            if head is None:
                with iokit.move_on_after(PROBE_INTERVAL):
                    await arrived.wait()
                if not arrived.is_set() and await self.replica_restarted():
                    for upload in self.store.uploads():  # finished ones too: it may have lost their tails
                        self.enqueue(upload, upload.offset, 0)
                continue
            try:
                if head.delete:
                    await self.delete(head.upload.id)
                elif not head.upload.removed:
                    await self.bring_up_to(head.upload, max(entry.end for entry in batch))
            except ReplicaFailed as error:
                if failures == 0:
                    log.warning(f"{self.url} is behind ({self.backlog_bytes} bytes), retrying: {error}")
                await iokit.sleep(RETRY_PAUSES[min(failures, len(RETRY_PAUSES) - 1)])
                failures += 1
                continue
            except HttpError:  # the upload was removed here (deleted, expired) while it was shipped: nothing to ship
                pass
            failures = 0
            with self.backlog_lock:
                for _ in batch:
                    entry = self.backlog.popleft()
                    self.backlog_bytes -= entry.byte_count
                room_made, self.room_made = self.room_made, iokit.Event()
            room_made.set()

    async def aclose(self) -> None:
        await self.connection.aclose()
        await self.probe_connection.aclose()


async def _watch_for_restarts(link: ReplicaLink) -> None:
    """Sync mode: notice a replica's restart, so that the next chunk of each upload first asks where it stands."""
    while True:
        await iokit.sleep(PROBE_INTERVAL)
        await link.replica_restarted()


@dataclasses.dataclass
class _Fresh:
    """The bytes ``[start, ...)`` of a chunk still being committed, as the pieces received (sync mode)."""

    start: int
    pieces: list[bytes]

    def between(self, low: int, high: int):
        """Yield the bytes ``[low, high)`` (within the chunk): whole pieces as they are, views of the cut ones."""
        position = self.start
        for piece in self.pieces:
            piece_end = position + len(piece)
            if piece_end > low and position < high:
                if low <= position and piece_end <= high:
                    yield piece
                else:
                    yield memoryview(piece)[max(low, position) - position:min(high, piece_end) - position]
            position = piece_end
            if position >= high:
                return


def _leading_run(backlog, upload: Upload):
    for entry in backlog:
        if entry.upload is not upload or entry.delete:
            return
        yield entry


class Replication:
    """The replicas of one upload store, in one mode; the tus handlers call it, the lifespan runs it."""

    def __init__(self, store: UploadStore, urls: list[str], mode: ReplicationMode,
                 timeout: float = DEFAULT_REPLICA_TIMEOUT, max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES):
        self.store = store
        self.mode = mode
        self.timeout = timeout
        self.max_backlog_bytes = max_backlog_bytes
        self.links = [ReplicaLink(url, store, timeout) for url in urls]

    @property
    def confirms_before_accepting(self) -> bool:
        """Sync mode: no byte of a chunk may count in the upload's offset before the replicas confirmed it."""
        return self.mode is ReplicationMode.SYNC

    async def _on_every_replica(self, work, what: str) -> None:
        """Run ``work(link)`` for every replica at once, within the timeout; raise 503 if any fails."""
        failures: list[str] = []

        async def one(link: ReplicaLink) -> None:
            try:
                with iokit.fail_after(self.timeout):
                    await work(link)
            except (ReplicaFailed, TimeoutError, HttpError) as error:  # HttpError: a final's part is gone here
                failures.append(f"{link.url}: {error or 'timed out'}")
                link.up, link.last_error = False, str(error) or "timed out"

        async with iokit.TaskGroup() as tasks:
            for link in self.links:
                tasks.spawn(one, link, name="replicate")
        if failures:
            log.warning(f"{what}: {'; '.join(failures)}")
            raise _unavailable(f"a replica did not confirm {what}: {'; '.join(failures)}", self.timeout)

    async def created(self, upload: Upload) -> None:
        """A new upload: sync, on every replica before the 201 (else 503, and the caller removes it); async, queued."""
        if self.mode is ReplicationMode.SYNC:
            await self._on_every_replica(lambda link: link.bring_up_to(upload, upload.offset),
                                         f"the creation of {upload.id}")
        else:
            for link in self.links:
                link.enqueue(upload, upload.offset, 0)

    async def replicate(self, upload: Upload, start: int, end: int, pieces: list[bytes] | None) -> None:
        """A chunk is kept (``store.Replicator``): sync, on every replica or 503 (``pieces``: the chunk, sent while
        the store commits it); async, queued."""
        if self.mode is ReplicationMode.SYNC:
            fresh = None if pieces is None else _Fresh(start, pieces)
            try:
                await self._on_every_replica(lambda link: link.bring_up_to(upload, end, fresh),
                                             f"bytes {start}..{end} of {upload.id}")
            except HttpError:  # the store takes the chunk back: so must every replica that did take it
                self.took_back(upload, start)
                raise
        else:
            for link in self.links:
                link.enqueue(upload, end, end - start)

    def took_back(self, upload: Upload, start: int) -> None:
        """The store cut ``upload`` back to ``start``: on every replica, what lies past it is not ours any more."""
        for link in self.links:
            link.took_back(upload.id, start)

    async def deleted(self, upload: Upload) -> None:
        if self.mode is ReplicationMode.SYNC:
            await self._on_every_replica(lambda link: link.delete(upload.id), f"the deletion of {upload.id}")
        else:
            for link in self.links:
                link.enqueue(upload, 0, 0, delete=True)

    async def wait_for_room(self) -> None:
        """Async mode: wait while a replica's backlog is over its bound (backpressure); 503 after the timeout."""
        if self.mode is not ReplicationMode.ASYNC:
            return
        deadline = iokit.current_time() + self.timeout
        for link in self.links:
            while link.backlog_bytes > self.max_backlog_bytes:
                room_made = link.room_made
                if link.backlog_bytes <= self.max_backlog_bytes:
                    break
                with iokit.move_on_after(max(0.0, deadline - iokit.current_time())):
                    await room_made.wait()
                if iokit.current_time() >= deadline and link.backlog_bytes > self.max_backlog_bytes:
                    raise _unavailable(f"replica {link.url} is {link.backlog_bytes} bytes behind; slow down",
                                       self.timeout)

    async def drain(self, seconds: float) -> None:
        """Async mode, at a clean stop: wait (at most ``seconds``) until every replica has the whole backlog."""
        with iokit.move_on_after(seconds):
            for link in self.links:
                while link.backlog:
                    room_made = link.room_made
                    if not link.backlog:
                        break
                    await room_made.wait()

    async def run(self) -> None:
        """Run until cancelled: async mode's senders (after queueing every upload the store holds, so a restarted
        primary ships what it had not shipped)."""
        for upload in self.store.uploads():  # what we hold now was ours all along: a replica's copy of it is too
            for link in self.links:
                if upload.id not in link.confirmed:
                    link.confirmed[upload.id] = upload.offset
                    link.unverified.add(upload.id)  # but whether the replica has it, only the replica can say
        if self.mode is not ReplicationMode.ASYNC:
            async with iokit.TaskGroup() as tasks:
                for link in self.links:
                    tasks.spawn(_watch_for_restarts, link, name="replica-probe")
        for upload in self.store.uploads():
            for link in self.links:
                link.enqueue(upload, upload.offset, 0)
        async with iokit.TaskGroup() as tasks:
            for link in self.links:
                tasks.spawn(link.run_sender, name="replication-sender")

    async def aclose(self) -> None:
        for link in self.links:
            await link.aclose()

    def statistics(self) -> dict:
        """What ``GET /stats`` shows: the mode, and per replica its lag and counters."""
        replicas = []
        for link in self.links:
            lag_bytes, lag_seconds = link.lag()
            replicas.append({"url": link.url, "up": link.up, "lag_bytes": lag_bytes,
                             "lag_seconds": round(lag_seconds, 3), "shipped_bytes": link.shipped_bytes,
                             "failures": link.failures, "last_error": link.last_error})
        return {"mode": self.mode.value, "replicas": replicas}
