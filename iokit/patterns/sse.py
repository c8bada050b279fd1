"""Push with Server-Sent Events: the event ring, per-subscriber queues, slow-consumer policies and the wire format, with
no I/O in them.

The wire format (WHATWG HTML, "Server-sent events"): a ``text/event-stream`` body of UTF-8 lines, events separated by a
blank line; ``field: value`` lines, of which we send ``id``, ``event``, ``data`` and ``retry``; a line that starts with
``:`` is a comment (our heartbeat). A client dispatches an event only at its blank line and only if it had a ``data``
line, and remembers the last ``id`` it saw; when the connection drops it reconnects after the ``retry`` delay and sends
that id as ``Last-Event-ID``. So every event we send carries one line of compact JSON (``json.dumps`` escapes line
breaks), and every event that needs the client's attention (``gap``, ``reset``) has a ``data`` line too.

What this module decides:

* **One ring of the last ``ring_events`` events**, across topics, numbered by one sequence. A reconnecting client gets
  the events of its topic after its ``Last-Event-ID``; if events it may have missed have left the ring (or the id is not
  one this server gave), it gets ``event: reset`` instead, whose ``id`` moves it to now. One ring bounds memory by count
  and message size, however many topics clients invent.
* **Ids carry the server's epoch**: ``<epoch>-<seq>``, the epoch drawn at random when the server starts. The sequence
  starts again at 1 in every life of the server, so a bare number from before a restart would name another event of
  the new life, and the client would get the events after it as if nothing had happened (silently skipping what the
  new life published before it). With the epoch, an id from an earlier life is not one of ours: ``event: reset``.
* **Subscribe atomically**: the replay is taken and the subscriber registered in one step (the caller holds its lock
  across ``Broker.subscribe``), so an event is either in the replay or in the queue, never in neither or both.
* **A bounded queue per subscriber** (``subscriber_queue_events`` or ``subscriber_queue_bytes``). When a publish finds
  it full, the policy decides: ``disconnect`` ends that stream (the client reconnects and resumes from the ring, losing
  nothing while the ring still holds what it missed); ``drop`` drops the oldest queued events and the stream says so
  with ``event: gap`` and the count before the events that follow.

``EventStreamParser`` is the client side of the format (our client and the tests use it).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import re
import secrets
from typing import Callable, Iterator

from ..http.client_input import InvalidJson, read_integer, read_json
from .limits import PushLimits

PING = b": ping\n\n"
_TOPIC = re.compile(r"[A-Za-z0-9._-]+")


class SlowPolicy(str, enum.Enum):
    """What happens to a subscriber whose queue is full when an event arrives."""

    DISCONNECT = "disconnect"
    DROP = "drop"


class PushError(Exception):
    """Base of the broker's refusals; ``str()`` is a sentence for the client."""


class InvalidMessage(PushError):
    """A topic name or a message body the API does not take (400)."""


class TooManySubscribers(PushError):
    """The server has ``max_subscribers`` streams open."""


# -- the wire format ---------------------------------------------------------------------------------------------------

def format_event(data: str, *, event_id: str | int | None = None, event: str | None = None) -> bytes:
    """Return one event: optional ``id`` (``str``: ``<epoch>-<seq>``, or a bare number) and ``event`` lines, one
    ``data`` line, the blank line. ``data`` must be a single line (compact JSON is); raises ``ValueError`` otherwise."""
    if "\n" in data or "\r" in data:
        raise ValueError("event data must be one line")
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}\n")
    if event is not None:
        lines.append(f"event: {event}\n")
    lines.append(f"data: {data}\n\n")
    return "".join(lines).encode()


def format_retry(milliseconds: int) -> bytes:
    """Return a ``retry`` field (the client's reconnection delay) alone, as its own block."""
    return f"retry: {milliseconds}\n\n".encode()


def compact_json(value) -> str:
    """Return ``value`` as JSON on one line, without spaces."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def check_topic(topic: str, limits: PushLimits) -> str:
    """Return ``topic`` if it is 1 to ``max_topic_chars`` of ``A-Z a-z 0-9 . _ -``; raise ``InvalidMessage``
    otherwise."""
    if not topic or len(topic) > limits.max_topic_chars or not _TOPIC.fullmatch(topic):
        raise InvalidMessage(f"a topic is 1 to {limits.max_topic_chars} characters of A-Z a-z 0-9 . _ -, "
                             f"not {topic[:80]!r}")
    return topic


def parse_message(body: bytes) -> str:
    """Return the JSON body of a published message, re-encoded on one line. Raises ``InvalidMessage`` if not JSON, or
    if it holds a lone surrogate escape (JSON allows ``"\\ud800"``; it has no UTF-8 form to send)."""
    try:
        message = compact_json(read_json(body))
        message.encode("utf-8")
    except (InvalidJson, UnicodeError) as error:
        raise InvalidMessage(f"the message must be JSON text with a UTF-8 form: {error}") from None
    return message


def parse_last_event_id(value: str | None, epoch: str) -> int | None:
    """Return the sequence number in a ``Last-Event-ID`` header ``<epoch>-<seq>`` of this ``epoch``; ``None`` without
    one; ``-1`` for a value that is not one of this life's ids (an earlier life's, a bare number, garbage: it can only
    be answered with a reset)."""
    if value is None or value.strip() == "":
        return None
    given_epoch, separator, seq = value.strip().rpartition("-")
    number = read_integer(seq) if separator and given_epoch == epoch else None
    return -1 if number is None else number


# -- the ring ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Event:
    """A published event: its sequence number, its topic, and its bytes on the wire."""

    seq: int
    topic: str
    frame: bytes


def new_epoch() -> str:
    """Return a name for this life of the server: 48 random bits in hex (two lives share one once in 2**24 pairs)."""
    return secrets.token_hex(6)


class EventRing:
    """The last ``capacity`` events, oldest first, numbered without gaps; ``epoch`` (default: a new one) names this
    life of the server in every event id."""

    def __init__(self, capacity: int, epoch: str | None = None):
        self._events: collections.deque[Event] = collections.deque(maxlen=capacity)
        self.latest_seq = 0
        self.epoch = new_epoch() if epoch is None else epoch

    def event_id(self, seq: int) -> str:
        """Return the id sent for sequence number ``seq``: ``<epoch>-<seq>``."""
        return f"{self.epoch}-{seq}"

    def append(self, topic: str, data: str) -> Event:
        """Number and keep a new event on ``topic``; return it. The number is taken only once the event is formatted,
        so an event that cannot be formatted leaves no gap in the ids."""
        event = Event(self.latest_seq + 1, topic, format_event(data, event_id=self.event_id(self.latest_seq + 1)))
        self.latest_seq = event.seq
        self._events.append(event)
        return event

    @property
    def oldest_seq(self) -> int:
        """The first sequence number still kept (``latest_seq + 1`` when the ring is empty)."""
        return self._events[0].seq if self._events else self.latest_seq + 1

    def since(self, last_seq: int, topic: str) -> list[Event] | None:
        """Return the events of ``topic`` after ``last_seq``, or ``None`` when the ring cannot say: some event after
        ``last_seq`` has left it, or ``last_seq`` was never given out."""
        if last_seq < self.oldest_seq - 1 or last_seq > self.latest_seq:
            return None
        skip = last_seq - (self.oldest_seq - 1)
        return [event for index, event in enumerate(self._events) if index >= skip and event.topic == topic]


# -- subscribers -------------------------------------------------------------------------------------------------------

class Subscriber:
    """One open stream on ``topic``: a bounded queue of events and what the policy did to it.

    ``wake()`` is called whenever there is something new to take (events, or the end). ``closed`` is ``None`` while
    the stream should go on, else why it must end.
    """

    def __init__(self, topic: str, limits: PushLimits, policy: SlowPolicy, wake: Callable[[], None]):
        self.topic = topic
        self.limits = limits
        self.policy = policy
        self.wake = wake
        self.closed: str | None = None
        self.dropped = 0          # events dropped since the last take (policy drop)
        # Events up to this sequence number reached the client already (a client resuming ahead of a shared log's
        # reader in this process: another server had sent it more); ``offer`` skips them.
        self.resume_after = 0
        self._queue: collections.deque[Event] = collections.deque()
        self._queued_bytes = 0

    def offer(self, event: Event) -> bool:
        """Queue ``event``, applying the slow-consumer policy if the queue is full. Return ``False`` if the stream was
        ended (policy ``disconnect``)."""
        if self.closed is not None:
            return False
        if event.seq <= self.resume_after:
            return True
        while self._queue and self._is_full_with(event):
            if self.policy is SlowPolicy.DISCONNECT:
                self.close("overflow")
                return False
            dropped = self._queue.popleft()
            self._queued_bytes -= len(dropped.frame)
            self.dropped += 1
        self._queue.append(event)
        self._queued_bytes += len(event.frame)
        self.wake()
        return True

    def take(self) -> bytes:
        """Return everything waiting, as bytes to send (a ``gap`` notice first if events were dropped), and empty the
        queue. ``b""`` when nothing waits."""
        pieces = []
        if self.dropped:
            pieces.append(format_event(compact_json({"dropped": self.dropped}), event="gap"))
            self.dropped = 0
        pieces.extend(event.frame for event in self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        return b"".join(pieces)

    def close(self, reason: str) -> None:
        """End the stream (its queue is dropped: the events are in the ring) and wake its writer."""
        if self.closed is None:
            self.closed = reason
            self._queue.clear()
            self._queued_bytes = 0
            self.wake()

    @property
    def queued_events(self) -> int:
        return len(self._queue)

    def _is_full_with(self, event: Event) -> bool:
        return (len(self._queue) >= self.limits.subscriber_queue_events
                or self._queued_bytes + len(event.frame) > self.limits.subscriber_queue_bytes)


class Broker:
    """Topics, their subscribers, and the ring (whose ``epoch`` is this life's; default: a new one). Not thread-safe:
    the server calls it under one lock."""

    def __init__(self, limits: PushLimits, policy: SlowPolicy, epoch: str | None = None):
        self.limits = limits
        self.policy = policy
        self.ring = EventRing(limits.ring_events, epoch)
        self.epoch = self.ring.epoch
        self._topics: dict[str, set[Subscriber]] = {}
        self._count = 0

    def subscribe(self, topic: str, last_event_id: int | None, wake: Callable[[], None]) -> tuple[Subscriber, bytes]:
        """Register a subscriber on ``topic``; return it and the bytes its stream starts with: the ``retry`` field,
        then the replay after ``last_event_id`` (or ``event: reset`` when the ring cannot replay it).
        Raises ``TooManySubscribers``."""
        if self._count >= self.limits.max_subscribers:
            raise TooManySubscribers(f"{self._count} streams are open, the server's limit")
        subscriber = Subscriber(topic, self.limits, self.policy, wake)
        self._topics.setdefault(topic, set()).add(subscriber)
        self._count += 1
        start = [format_retry(self.limits.retry_ms)]
        if last_event_id is not None:
            replay = self.ring.since(last_event_id, topic)
            if replay is None:
                start.append(self._reset_notice(last_event_id))
            else:
                start.extend(event.frame for event in replay)
        return subscriber, b"".join(start)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Forget ``subscriber`` (nothing happens the second time)."""
        subscribers = self._topics.get(subscriber.topic)
        if subscribers is None or subscriber not in subscribers:
            return
        subscribers.discard(subscriber)
        self._count -= 1
        if not subscribers:
            del self._topics[subscriber.topic]

    def publish(self, topic: str, data: str) -> tuple[Event, int]:
        """Add an event with ``data`` (one line of JSON) on ``topic`` to the ring and to every subscriber's queue.
        Return the event and how many subscribers it was queued for (those the policy ended are not counted)."""
        event = self.ring.append(topic, data)
        return event, self.deliver(event)

    def deliver(self, event: Event) -> int:
        """Offer an event numbered elsewhere (a shared log: ``iokit.redis.events``) to the subscribers of its topic,
        without keeping it in the ring; return how many queued it."""
        return sum(subscriber.offer(event) for subscriber in self._topics.get(event.topic, ()))

    @property
    def subscribers(self) -> int:
        return self._count

    def subscribers_of(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def _reset_notice(self, last_event_id: int) -> bytes:
        # The id moves the client to now: if it reconnects, it resumes from here rather than being reset again.
        data = compact_json({"last_event_id": last_event_id if last_event_id >= 0 else None,
                             "oldest_available": self.ring.oldest_seq, "latest": self.ring.latest_seq})
        return format_event(data, event_id=self.ring.event_id(self.ring.latest_seq), event="reset")


# -- the client side ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReceivedEvent:
    """An event as a client dispatches it: type (``message`` by default), data, the last event id, and the retry
    delay if the stream set one in this block."""

    event: str
    data: str
    id: str
    retry: int | None = None


class EventStreamParser:
    """Turns the bytes of a ``text/event-stream`` body into ``ReceivedEvent``s, following the WHATWG parsing rules:
    lines end in CRLF, LF or CR; ``:`` starts a comment (counted in ``comments``); a blank line dispatches the block if
    it had data; the last event id persists across events; ``retry`` is kept when it is all digits."""

    def __init__(self, last_event_id: str = "") -> None:
        self.last_event_id = last_event_id
        self.retry: int | None = None
        self.comments = 0
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._retry_in_block: int | None = None

    def feed(self, data: bytes) -> Iterator[ReceivedEvent]:
        """Yield the events completed by ``data``."""
        self._buffer += data
        while True:
            line, separator, rest = self._split_line(self._buffer)
            if separator is None:
                return
            self._buffer = rest
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                yield event

    @staticmethod
    def _split_line(buffer: bytes) -> tuple[bytes, bytes | None, bytes]:
        """Return (line, its end, the rest), or (buffer, None, b"") while no whole line is buffered."""
        line_feed, carriage_return = buffer.find(b"\n"), buffer.find(b"\r")
        if carriage_return == -1 or 0 <= line_feed < carriage_return:
            if line_feed == -1:
                return buffer, None, b""
            return buffer[:line_feed], b"\n", buffer[line_feed + 1:]
        if carriage_return + 1 == len(buffer):
            return buffer, None, b""  # a CR at the end: wait to see whether an LF follows
        end = carriage_return + (2 if buffer[carriage_return + 1] == 0x0A else 1)
        return buffer[:carriage_return], b"\r", buffer[end:]

    def _line(self, line: str) -> ReceivedEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and read_integer(value) is not None:
            self.retry = self._retry_in_block = read_integer(value)
        return None

    def _dispatch(self) -> ReceivedEvent | None:
        event, data, retry = self._event or "message", self._data, self._retry_in_block
        self._event, self._data, self._retry_in_block = "", [], None
        if not data:
            return None
        return ReceivedEvent(event, "\n".join(data), self.last_event_id, retry)
