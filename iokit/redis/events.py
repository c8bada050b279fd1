"""The push server's event ring as a Redis stream, shared by every worker and every server on the same Redis.

In one process the ring is a deque numbered by one sequence, and an event id is ``<epoch>-<seq>``. Past one process
the ring is a Redis stream (``XADD ... MAXLEN ~ N``) and the event id is the *stream id* (``<ms>-<n>``): the same
for every server, so a client that reconnects to another worker, another server, or a restarted one sends a
``Last-Event-ID`` that any of them can resume from.

* **Publishing** is one ``XADD``: the stream orders the events of every server.
* **Delivering**: each process runs one reader (``XREAD BLOCK``) that follows the stream from where it started and
  offers each event to the local subscribers of its topic (``Broker.deliver``). So a process holds one connection for
  all its streams, not one per client.
* **Resuming exactly once**: the client's ``Last-Event-ID`` (``L``) is checked first (``can_resume_after``); then a
  subscriber registers under the broker's lock, noting where the reader is (``R``): events after ``R`` reach its queue
  from the reader, and the replay is read with ``XRANGE (L R``, so no event is in neither or both. A client *ahead* of
  this reader (another server had sent it more: ``L > R``) has nothing replayed, and its queue skips events up to
  ``L`` (``Subscriber.resume_after``).
* **Reset**: an id this stream never gave (later than its last id, or not an id at all), or one after which the
  stream has trimmed events (Redis 7's ``max-deleted-entry-id``), cannot be resumed: ``event: reset``, as in memory,
  whose id is ``R``, where the live events start.

Sequence numbers (``Event.seq``) are the stream ids made into one sortable integer (``stream_id_number``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import iokit

from ..patterns.sse import Event, compact_json, format_event
from .client import RedisClient
from .errors import RedisConnectionError, RedisReplyError

READ_BLOCK_MS = 2000
READ_COUNT = 1000
RECONNECT_PAUSE = 0.5  # seconds between the reader's attempts while Redis is unreachable

logger = logging.getLogger("iokit.redis")


def stream_id_number(stream_id: str | bytes) -> int | None:
    """Return the stream id ``<ms>-<n>`` as one integer that sorts as the ids do, or ``None`` if it is not one."""
    if isinstance(stream_id, bytes):
        stream_id = stream_id.decode("ascii", "replace")
    milliseconds, separator, number = stream_id.strip().partition("-")
    if not (separator and milliseconds.isascii() and milliseconds.isdigit() and number.isascii() and number.isdigit()):
        return None
    return (int(milliseconds) << 64) | int(number)


def stream_id_text(number: int) -> str:
    """Return the stream id ``<ms>-<n>`` of a ``stream_id_number``."""
    return f"{number >> 64}-{number & ((1 << 64) - 1)}"


def event_from_entry(stream_id: bytes, fields: list[bytes]) -> Event:
    """Return the ``Event`` of a stream entry ``[b"topic", T, b"data", D]`` (its frame carries the stream id)."""
    values = dict(zip(fields[::2], fields[1::2]))
    topic = values[b"topic"].decode()
    text_id = stream_id.decode()
    return Event(stream_id_number(text_id), topic, format_event(values[b"data"].decode(), event_id=text_id))


@dataclasses.dataclass(frozen=True)
class StreamPosition:
    """Where the stream stands: its last id, the largest id it has trimmed, and its first id still kept."""

    last_id: str
    max_deleted_id: str
    first_id: str | None


class RedisEventLog:
    """The stream ``key`` on ``client``, kept to about ``max_events`` events."""

    def __init__(self, client: RedisClient, key: str, max_events: int) -> None:
        self.client = client
        self.key = key
        self.max_events = max_events

    async def append(self, topic: str, data: str) -> str:
        """Add an event; return its stream id."""
        reply = await self.client.execute("XADD", self.key, "MAXLEN", "~", self.max_events, "*", "topic", topic,
                                          "data", data)
        return reply.decode()

    async def position(self) -> StreamPosition:
        """Return where the stream stands (``0-0`` everywhere when it does not exist yet)."""
        try:
            info = await self.client.execute("XINFO", "STREAM", self.key)
        except RedisReplyError as error:
            if "no such key" in str(error):
                return StreamPosition("0-0", "0-0", None)
            raise
        fields: dict[bytes, Any] = dict(zip(info[::2], info[1::2]))
        first = fields.get(b"first-entry")
        return StreamPosition(fields[b"last-generated-id"].decode(), fields.get(b"max-deleted-entry-id", b"0-0").decode(),
                              first[0].decode() if first else None)

    async def read_after(self, last_id: str, block_ms: int = READ_BLOCK_MS) -> list[Event]:
        """Return the events after ``last_id``, waiting up to ``block_ms`` for one."""
        reply = await self.client.execute("XREAD", "COUNT", READ_COUNT, "BLOCK", block_ms, "STREAMS", self.key,
                                          last_id, timeout=block_ms / 1000 + self.client.command_timeout)
        if not reply:
            return []
        return [event_from_entry(stream_id, fields) for stream_id, fields in reply[0][1]]

    async def can_resume_after(self, after_id: str) -> tuple[bool, StreamPosition]:
        """Return whether the stream can say what came after ``after_id`` (it gave that id, and has trimmed nothing
        after it), and where the stream stands."""
        after = stream_id_number(after_id)
        position = await self.position()
        resumable = (after is not None and after <= stream_id_number(position.last_id)
                     and stream_id_number(position.max_deleted_id) <= after)
        return resumable, position

    async def events_between(self, topic: str, after_id: str, up_to_id: str) -> list[Event]:
        """Return the events of ``topic`` in ``(after_id, up_to_id]``, oldest first."""
        if stream_id_number(after_id) >= stream_id_number(up_to_id):
            return []
        entries = await self.client.execute("XRANGE", self.key, f"({after_id.strip()}", up_to_id)
        events = [event_from_entry(stream_id, fields) for stream_id, fields in entries]
        return [event for event in events if event.topic == topic]

    @staticmethod
    def reset_notice(after_id: str, resume_id: str, position: StreamPosition) -> bytes:
        """Return ``event: reset`` for a client at ``after_id``; its id moves the client to ``resume_id``."""
        data = compact_json({"last_event_id": after_id if stream_id_number(after_id) is not None else None,
                             "oldest_available": position.first_id, "latest": resume_id})
        return format_event(data, event_id=resume_id, event="reset")


class StreamReader:
    """A process's one follower of the stream: offers every new event to ``deliver`` (called under the caller's
    lock, through ``locked``). ``last_id`` is how far it has read; read it under the same lock."""

    def __init__(self, log: RedisEventLog, deliver, lock) -> None:
        self.log = log
        self.deliver = deliver
        self.lock = lock
        self.last_id = "0-0"

    async def start(self) -> None:
        """Start from the stream's end: events published before this process started are only replayed."""
        self.last_id = (await self.log.position()).last_id

    async def run(self) -> None:
        """Follow the stream until cancelled; while Redis is unreachable, say so once and keep trying."""
        complained = False
        while True:
            try:
                events = await self.log.read_after(self.last_id)
                complained = False
            except RedisConnectionError as error:
                if not complained:
                    logger.warning("push: reading the event stream failed, retrying: %s", error)
                    complained = True
                await iokit.sleep(RECONNECT_PAUSE)
                continue
            if events:
                with self.lock:
                    for event in events:
                        self.deliver(event)
                    self.last_id = stream_id_text(events[-1].seq)
