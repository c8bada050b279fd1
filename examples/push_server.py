"""Push with Server-Sent Events, over HTTP/1.1 on iokit's shared core.

    GET  /events?topic=T           a text/event-stream: ``retry: 2000``, then the events after Last-Event-ID (or
                                   ``event: reset`` if they have left the ring, or the id is from an earlier life of
                                   the server), then live events (``id: EPOCH-N`` and one line of JSON ``data:``),
                                   with ``: ping`` after 15 s of silence
    POST /topics/T/messages        a JSON body (at most 4 KiB): 202 ``{"id", "seq", "topic", "delivered"}``, and the
                                   event goes to every subscriber of T
    GET  /stats                    subscribers, epoch, latest_id, oldest_id (sequence numbers of this epoch), pid
                                   (this process: with --workers, each worker counts its own subscribers)
    GET  /                         a page that shows a live EventSource (its last id, its reconnects)

``--slow disconnect`` (the default) ends the stream of a subscriber whose queue overflows: it reconnects with its
Last-Event-ID and gets what it missed from the ring. ``--slow drop`` drops its oldest queued events instead and tells it
with ``event: gap`` (``{"dropped": N}``). A write that makes no progress for 10 s (``--send-timeout``) ends the
connection either way. Past 1024 subscribers a new one gets ``retry: 5000`` and the end of its stream.

``--store redis://HOST:PORT/DB`` keeps the ring in a Redis stream instead (``iokit.redis.events``): event ids are
the stream's ids (``<ms>-<n>``), the same on every worker and every server on that Redis, so ``--workers N`` is
allowed and a client resumes on any of them; ``/stats`` then gives ``latest_id`` as a stream id, and a publish answers
``"seq": null, "delivered": null`` (the event is in the stream; each process delivers it to its own subscribers).

The rules (ring, queues, policies, wire format) are in ``iokit.patterns.sse``, the limits in ``iokit.patterns.limits``
(each a flag: ``--ping-interval``, ``--max-subscribers``...). Here is the part that runs: each stream is the response
body of its request, an async generator that waits for its subscriber's queue (or the ping time, the stop, or the
client's disconnect) and hands the server all that waits, in one write. The subscribers live in this process's memory
(the service is ``single_process``: ``--workers`` must be 1), and each connection's kernel send buffer is bounded
(``--send-buffer-bytes``), so that a slow reader fills its own bounded queue rather than megabytes of kernel memory.

Run: ``python examples/push_server.py --backend epoll --port 8080``, then
``curl -N 'http://127.0.0.1:8080/events?topic=t'``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import sys
import threading

import iokit
from iokit import serve
from iokit.http import App, HttpError, HttpLimits, HttpServer, Response, cors
from iokit.patterns.limits import PushLimits, check_connections, connections_for
from iokit.patterns.sse import (PING, Broker, InvalidMessage, SlowPolicy, Subscriber, TooManySubscribers,
                                check_topic, format_retry, parse_last_event_id, parse_message)
from iokit.redis import RedisAddress, RedisClient, RedisConnectionError, parse_redis_url
from iokit.redis.events import RedisEventLog, StreamReader, stream_id_number

REDIS_STREAM_KEY = "iokit:push:events"

STREAM_HEADERS = (("Content-Type", "text/event-stream"), ("Cache-Control", "no-store"))
PAGE = pathlib.Path(__file__).with_name("pages") / "push.html"


class PushServer:
    """The broker and the routes that use it."""

    def __init__(self, limits: PushLimits, policy: SlowPolicy, redis: RedisAddress | None = None):
        self.limits = limits
        self.redis = redis  # None: the ring in this process's memory
        self.log: RedisEventLog | None = None      # set by the lifespan, with --store redis
        self.reader: StreamReader | None = None
        # On ``blocking`` publishers and streams are threads; elsewhere this lock is never contended.
        self._lock = threading.Lock()
        self.broker = Broker(limits, policy)
        self.app = App()
        self.app.add_route("GET", "/events", self.events)
        self.app.add_route("POST", "/topics/{topic}/messages", self.publish, max_body_size=limits.max_message_bytes)
        self.app.add_route("GET", "/stats", self.stats)
        self.app.add_route("GET", "/", self.page)

    # -- routes ------------------------------------------------------------------------------------------------------

    async def events(self, request) -> Response:
        try:
            topic = check_topic(request.query.get("topic", ""), self.limits)
        except InvalidMessage as error:
            raise HttpError(400, str(error), error="invalid_topic") from None
        if request.method == "HEAD":
            return Response(200, _nothing(), headers=STREAM_HEADERS)
        with self._lock:
            full = self.broker.subscribers >= self.limits.max_subscribers
        if full:
            return self._turned_away()
        if self.log is not None:
            header = request.headers.get("last-event-id")
            return Response(200, self._stream(request, topic, None, header.strip() if header else None),
                            headers=STREAM_HEADERS)
        last_event_id = parse_last_event_id(request.headers.get("last-event-id"), self.broker.epoch)
        return Response(200, self._stream(request, topic, last_event_id), headers=STREAM_HEADERS)

    async def publish(self, request) -> Response:
        try:
            topic = check_topic(request.path_params["topic"], self.limits)
            data = parse_message(await request.read_body())
        except InvalidMessage as error:
            raise HttpError(400, str(error), error="invalid_message") from None
        if self.log is not None:
            try:
                stream_id = await self.log.append(topic, data)
            except RedisConnectionError as error:
                raise HttpError(503, f"the event store is unavailable: {error}", error="store_unavailable",
                                headers=[("Retry-After", "1")]) from None
            return Response.json({"id": stream_id, "seq": None, "topic": topic, "delivered": None}, 202)
        with self._lock:
            event, delivered = self.broker.publish(topic, data)
        return Response.json({"id": self.broker.ring.event_id(event.seq), "seq": event.seq, "topic": topic,
                              "delivered": delivered}, 202)

    async def stats(self, request) -> Response:
        if self.reader is not None:
            with self._lock:
                counts = {"subscribers": self.broker.subscribers, "store": self.redis.url(),
                          "latest_id": self.reader.last_id, "pid": os.getpid()}
            return Response.json(counts, headers=[("Cache-Control", "no-store")])
        with self._lock:
            ring = self.broker.ring
            counts = {"subscribers": self.broker.subscribers, "epoch": ring.epoch, "latest_id": ring.latest_seq,
                      "oldest_id": ring.oldest_seq, "pid": os.getpid()}
        return Response.json(counts, headers=[("Cache-Control", "no-store")])

    async def page(self, request) -> Response:
        return Response(200, _page_bytes(), content_type="text/html; charset=utf-8",
                        headers=[("Cache-Control", "no-cache")])

    # -- a stream ----------------------------------------------------------------------------------------------------

    def _turned_away(self) -> Response:
        # A 200 stream that only says "come back in 5 s" and ends: an EventSource reconnects after the retry delay,
        # whereas an error status would make it give up for good.
        return Response(200, format_retry(self.limits.full_retry_ms),
                        headers=[*STREAM_HEADERS, ("Connection", "close")])

    async def _stream(self, request, topic: str, last_event_id: int | None, last_stream_id: str | None = None):
        """The body of one event stream. It subscribes when the server starts sending it (not in the handler), so that
        a stream the server never sends is never registered, and unsubscribes however it ends. With the Redis store
        the client's place is ``last_stream_id`` (``iokit.redis.events`` says how it resumes exactly once)."""
        wake = iokit.Event()
        try:
            if self.log is not None:
                subscriber, start = await self._subscribe_to_log(topic, last_stream_id, wake)
            else:
                with self._lock:
                    subscriber, start = self.broker.subscribe(topic, last_event_id, wake.set)
        except (TooManySubscribers, RedisConnectionError):  # filled up since the handler looked; Redis unreachable
            yield format_retry(self.limits.full_retry_ms)
            return
        try:
            yield start
            async with request.watching_disconnect(lambda: self._end(subscriber, "disconnected")):
                while (chunk := await self._next_chunk(request, subscriber, wake)) is not None:
                    yield chunk
        finally:
            with self._lock:
                self.broker.unsubscribe(subscriber)

    async def _next_chunk(self, request, subscriber: Subscriber, wake: iokit.Event) -> bytes | None:
        """Return what to send next (queued events, a gap notice, or a ping after ``ping_interval`` of silence), or
        ``None`` when the stream must end (overflow with policy disconnect, the client left, the server stops)."""
        with request.interruptible():
            with iokit.move_on_after(self.limits.ping_interval):
                while True:
                    with self._lock:
                        if subscriber.closed is not None:
                            return None
                        chunk = subscriber.take()
                        if chunk:
                            return chunk
                        wake.clear()  # under the lock a publisher takes before it wakes us: no wake-up is lost
                    await wake.wait()
            return PING
        return None

    async def _subscribe_to_log(self, topic: str, last_stream_id: str | None, wake: iokit.Event):
        """Register a subscriber of the Redis stream; return it and its stream's start (retry, then the replay or a
        reset). Raises ``TooManySubscribers``, and ``RedisConnectionError`` when Redis cannot be read."""
        resumable, position = (True, None) if last_stream_id is None else \
            await self.log.can_resume_after(last_stream_id)
        with self._lock:
            subscriber, start = self.broker.subscribe(topic, None, wake.set)
            up_to = self.reader.last_id  # the reader queues what comes after this
            if last_stream_id is not None and resumable:
                subscriber.resume_after = stream_id_number(last_stream_id)
            elif last_stream_id is not None:
                subscriber.resume_after = stream_id_number(up_to)
        if last_stream_id is None:
            return subscriber, start
        try:
            if not resumable:
                return subscriber, start + self.log.reset_notice(last_stream_id, up_to, position)
            replay = await self.log.events_between(topic, last_stream_id, up_to)
        except BaseException:
            with self._lock:
                self.broker.unsubscribe(subscriber)
            raise
        return subscriber, start + b"".join(event.frame for event in replay)

    @contextlib.asynccontextmanager
    async def lifespan(self):
        """With the Redis store: the client, and the reader that follows the stream while the server runs."""
        if self.redis is None:
            yield
            return
        async with RedisClient(self.redis) as client:
            self.log = RedisEventLog(client, REDIS_STREAM_KEY, self.limits.ring_events)
            self.reader = StreamReader(self.log, self.broker.deliver, self._lock)
            await self.reader.start()
            async with iokit.TaskGroup() as tasks:
                tasks.spawn(self.reader.run, name="event-stream-reader")
                yield
                tasks.cancel_scope.cancel()

    def _end(self, subscriber: Subscriber, reason: str) -> None:
        with self._lock:
            subscriber.close(reason)


@functools.cache
def _page_bytes() -> bytes:
    return PAGE.read_bytes()  # once, at the first request for it: a few KiB


async def _nothing():
    return
    yield  # an empty async generator: HEAD gets a stream's head with no body


def make_service(arguments) -> HttpServer:
    limits = serve.limits_from_arguments(arguments, PushLimits)
    http_limits = serve.limits_from_arguments(arguments, HttpLimits)
    check_connections(http_limits.max_connections, limits.max_subscribers, "--max-subscribers")
    redis = None if arguments.store == "memory" else parse_redis_url(arguments.store)  # ValueError: a usage error
    push = PushServer(limits, SlowPolicy(arguments.slow), redis)
    return HttpServer(push.app, http_limits, lifespan=push.lifespan, single_process=redis is None,
                      send_buffer_bytes=limits.send_buffer_bytes, cors=cors.policy_from_arguments(arguments))


def main(argv: list[str] | None = None) -> int:
    parser = serve.argument_parser(__doc__.splitlines()[0], HttpLimits, PushLimits)
    parser.set_defaults(max_connections=connections_for(PushLimits.max_subscribers))
    parser.add_argument("--slow", choices=[policy.value for policy in SlowPolicy], default=SlowPolicy.DISCONNECT.value,
                        help="what to do with a subscriber whose queue is full: end its stream (it resumes from the "
                             "ring) or drop its oldest events and send 'event: gap' (default: disconnect)")
    parser.add_argument("--store", default="memory", metavar="memory|redis://HOST:PORT/DB",
                        help="where the event ring lives: this process's memory (default), or a Redis stream shared "
                             "by every worker and server on it (then --workers may be above 1)")
    cors.add_argument(parser)
    return serve.main(make_service, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
