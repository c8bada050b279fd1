"""Push with Server-Sent Events: the ring, queues, policies and wire format alone (sans-IO), then the push server as a
real process on every backend, driven by curl -N, httpx-sse (an SSE client library nobody here wrote), h11 over raw
sockets (for the readers that misbehave on purpose: a small receive buffer, not reading) and its own client.

The module's main server pings every 0.3 s. The slow-consumer policies, the limits and the stop get servers of their
own. Every load is bounded: at most 600 events of 1 KiB per test, and a few connections.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import h11
import httpx
import pytest
from httpx_sse import connect_sse

from example_servers import EXAMPLES, ROOT, ServerProcess, backend_name, run_example_client, wait_until  # noqa: F401
from iokit.http import HttpError
from iokit.patterns.limits import PushLimits
from iokit.patterns.sse import (PING, Broker, EventRing, EventStreamParser, InvalidMessage, SlowPolicy, Subscriber,
                                TooManySubscribers, check_topic, format_event, format_retry, parse_last_event_id,
                                parse_message)

SERVER = EXAMPLES / "push_server.py"
CLIENT = EXAMPLES / "push_client.py"
LIMITS = PushLimits()
PAD = "x" * 1000  # makes an event about 1 KiB on the wire


# -- the wire format, sans-IO ------------------------------------------------------------------------------------------

def test_wire_format():
    assert format_event('{"a":1}', event_id=7) == b'id: 7\ndata: {"a":1}\n\n'
    assert format_event('{"dropped":3}', event="gap") == b'event: gap\ndata: {"dropped":3}\n\n'
    assert format_retry(2000) == b"retry: 2000\n\n" and PING == b": ping\n\n"
    with pytest.raises(ValueError):
        format_event("two\nlines")
    assert parse_message(b'{ "text": "line\\nbreak" }') == '{"text":"line\\nbreak"}'  # one line on the wire
    with pytest.raises(InvalidMessage):
        parse_message(b"not json")
    assert [parse_last_event_id(v, "e1") for v in (None, "", " e1-12 ", "abc", "-3", "e1--3", "e1-")] == [
        None, None, 12, -1, -1, -1, -1]
    # A bare number, or another life's id, is not one of this life's: only a reset can answer it.
    assert [parse_last_event_id(v, "e1") for v in ("12", "e0-12", "e1-12-3")] == [-1, -1, -1]
    assert check_topic("a.b_c-9", LIMITS) == "a.b_c-9"
    for topic in ("", "a/b", "a b", "x" * 65, "é"):
        with pytest.raises(InvalidMessage):
            check_topic(topic, LIMITS)


def test_parser_follows_the_whatwg_rules():
    parser = EventStreamParser()
    stream = (b"retry: 2000\n\n: ping\n\nid: 1\ndata: a\ndata: b\n\nevent: gap\r\ndata: {}\r\n\r\n"
              b"id: 2\rdata:no-space\r\rdata: after\n\n")
    events = []
    for index in range(len(stream)):  # one byte at a time: every split point, CR-LF pairs included
        events += parser.feed(stream[index:index + 1])
    assert [(e.event, e.data, e.id) for e in events] == [
        ("message", "a\nb", "1"), ("gap", "{}", "1"), ("message", "no-space", "2"), ("message", "after", "2")]
    assert parser.retry == 2000 and parser.comments == 1


# -- ring, queues and policies, sans-IO --------------------------------------------------------------------------------

def test_ring_replays_a_topic_or_says_it_cannot():
    ring = EventRing(4)
    assert ring.since(0, "t") == [] and ring.since(1, "t") is None  # nothing yet; an id never given
    for n in range(1, 7):
        ring.append("t" if n % 2 else "u", str(n))
    assert ring.oldest_seq == 3 and ring.latest_seq == 6
    assert [e.seq for e in ring.since(2, "t")] == [3, 5] and [e.seq for e in ring.since(4, "u")] == [6]
    assert ring.since(6, "t") == []
    assert ring.since(1, "t") is None and ring.since(7, "t") is None and ring.since(-1, "t") is None


def make_subscriber(policy: SlowPolicy, **limits) -> tuple[Subscriber, list[str]]:
    wakes = []
    return Subscriber("t", PushLimits(**limits), policy, lambda: wakes.append("wake")), wakes


def test_policy_disconnect_ends_the_stream_on_overflow():
    subscriber, wakes = make_subscriber(SlowPolicy.DISCONNECT, subscriber_queue_events=3)
    ring = EventRing(10)
    assert all(subscriber.offer(ring.append("t", str(n))) for n in range(3))
    assert not subscriber.offer(ring.append("t", "3"))
    assert subscriber.closed == "overflow" and subscriber.take() == b"" and len(wakes) == 4


def test_policy_drop_keeps_the_newest_and_reports_the_gap():
    subscriber, _ = make_subscriber(SlowPolicy.DROP, subscriber_queue_events=3)
    ring = EventRing(10, epoch="e")
    for n in range(5):
        subscriber.offer(ring.append("t", str(n)))
    assert subscriber.take() == (b'event: gap\ndata: {"dropped":2}\n\n'
                                 b"id: e-3\ndata: 2\n\nid: e-4\ndata: 3\n\nid: e-5\ndata: 4\n\n")
    assert subscriber.take() == b"" and subscriber.queued_events == 0


def test_the_queue_is_bounded_in_bytes_too():
    subscriber, _ = make_subscriber(SlowPolicy.DROP, subscriber_queue_bytes=3000)
    ring = EventRing(10)
    for _ in range(5):
        subscriber.offer(ring.append("t", json.dumps(PAD)))
    assert subscriber.queued_events == 2 and subscriber.dropped == 3


def test_subscribing_is_atomic_with_the_replay_and_bounded():
    broker = Broker(PushLimits(max_subscribers=2), SlowPolicy.DISCONNECT, epoch="e7")
    broker.publish("t", "1")
    broker.publish("u", "2")
    subscriber, start = broker.subscribe("t", 0, lambda: None)
    assert start == b"retry: 2000\n\nid: e7-1\ndata: 1\n\n"
    event, delivered = broker.publish("t", "3")
    assert delivered == 1 and subscriber.take() == event.frame  # in the queue, not missed, not twice
    _, start = broker.subscribe("t", 99, lambda: None)
    assert b"event: reset" in start and b"id: e7-3\n" in start  # the reset moves the client to now
    with pytest.raises(TooManySubscribers):
        broker.subscribe("t", None, lambda: None)
    broker.unsubscribe(subscriber)
    broker.unsubscribe(subscriber)
    assert broker.subscribers == 1 and broker.subscribers_of("t") == 1


# -- the server: helpers -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(backend_name):
    with ServerProcess(SERVER, backend_name, "--ping-interval", "0.3") as process:
        yield process


def seq_of(event_id: str) -> int:
    """The sequence number in an event id ``<epoch>-<seq>``."""
    epoch, _, seq = event_id.rpartition("-")
    assert epoch, f"an id without an epoch: {event_id!r}"
    return int(seq)


def wire_id(server, seq: int) -> str:
    """The id a client holds for ``seq``, in this life of ``server``."""
    return f"{stats(server)['epoch']}-{seq}"


def publish(server, topic: str, messages: list) -> list[int]:
    """POST each message on one keep-alive connection; return the events' sequence numbers."""
    connection = http.client.HTTPConnection(*server.address, timeout=10)
    ids = []
    try:
        for message in messages:
            connection.request("POST", f"/topics/{topic}/messages", body=json.dumps(message))
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == 202, answer
            assert seq_of(answer["id"]) == answer["seq"]
            ids.append(answer["seq"])
    finally:
        connection.close()
    return ids


def stats(server) -> dict:
    connection = http.client.HTTPConnection(*server.address, timeout=10)
    try:
        connection.request("GET", "/stats")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


class RawSubscriber:
    """An event stream read through h11 over a plain socket, so a test controls the reading (and the receive buffer)."""

    def __init__(self, server, topic: str, *, last_event_id: int | str | None = None,
                 receive_buffer: int | None = None):
        self.socket = socket.socket()
        if receive_buffer is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connect: the window
        self.socket.settimeout(10)
        self.socket.connect(server.address)
        self.http = h11.Connection(h11.CLIENT)
        if isinstance(last_event_id, int):
            last_event_id = wire_id(server, last_event_id)
        headers = [("Host", "t")] + ([("Last-Event-ID", last_event_id)] if last_event_id is not None else [])
        self.socket.sendall(self.http.send(h11.Request(method="GET", target=f"/events?topic={topic}",
                                                       headers=headers)) + self.http.send(h11.EndOfMessage()))
        self.parser = EventStreamParser()
        self.response: h11.Response | None = None
        self.events = []
        self.ended = False  # the response ended (its last chunk), or the connection closed

    def read_until(self, predicate, timeout: float = 10.0) -> bool:
        """Read and parse until ``predicate(self)`` holds (return True), the stream ends, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not predicate(self) and not self.ended and time.monotonic() < deadline:
            self.socket.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.socket.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                data = b""
            self.http.receive_data(data)
            while (event := self.http.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Response):
                    self.response = event
                elif isinstance(event, h11.Data):
                    self.events += self.parser.feed(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    self.ended = True
                    break
        return predicate(self)

    def subscribed(self) -> bool:
        """Read until the stream has started (its ``retry`` line comes once the server has subscribed it)."""
        return self.read_until(lambda s: s.parser.retry is not None)

    def message_ids(self) -> list[int]:
        return [seq_of(event.id) for event in self.events if event.event == "message"]

    def header(self, name: bytes) -> bytes | None:
        return dict(self.response.headers).get(name) if self.response else None

    def close(self) -> None:
        self.socket.close()


class HttpxSubscriber(threading.Thread):
    """httpx-sse reading a stream in a thread, as fast as events come, until it has ``count`` messages."""

    def __init__(self, server, topic: str, count: int, last_event_id: str | None = None):
        super().__init__(daemon=True)
        self.url = f"{server.url}/events?topic={topic}"
        self.count = count
        self.headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.retry: int | None = None
        self.messages = []           # (id, data) of message events with data
        self.others = []             # gap / reset events
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=20) as client, \
                    connect_sse(client, "GET", self.url, headers=self.headers) as source:
                assert source.response.headers["content-type"] == "text/event-stream"
                for event in source.iter_sse():
                    if event.retry is not None:
                        self.retry = event.retry
                        self.started.set()
                    if not event.data:
                        continue  # the retry block, and httpx-sse's empty events after a ping comment
                    if event.event == "message":
                        self.messages.append((seq_of(event.id), json.loads(event.data)))
                    else:
                        self.others.append((event.event, json.loads(event.data)))
                    if len(self.messages) >= self.count:
                        return
        except BaseException as error:  # noqa: BLE001 - reported by finish()
            self.error = error
        finally:
            self.started.set()

    def finish(self, timeout: float = 20.0) -> list[tuple[int, dict]]:
        self.join(timeout)
        assert not self.is_alive(), f"httpx-sse got {len(self.messages)} of {self.count} messages in {timeout} s"
        assert self.error is None, self.error
        return self.messages


def start_httpx(server, topic: str, count: int, last_event_id: str | None = None) -> HttpxSubscriber:
    subscriber = HttpxSubscriber(server, topic, count, last_event_id)
    subscriber.start()
    assert subscriber.started.wait(10) and subscriber.error is None, subscriber.error
    return subscriber


# -- outside clients: curl and httpx-sse -------------------------------------------------------------------------------

def test_curl_receives_the_stream_in_order(server):
    curl = subprocess.Popen(["curl", "-sS", "-N", "-i", "--max-time", "20", f"{server.url}/events?topic=curl"],
                            stdout=subprocess.PIPE)
    try:
        first_line = b""
        while b"retry: 2000" not in first_line:  # headers, then the retry line: subscribed
            first_line += curl.stdout.readline()
        ids = publish(server, "curl", [{"n": n} for n in range(10)])
        publish(server, "other", [{"not": "for curl"}])
        lines = []
        while len([line for line in lines if line.startswith(b"data:")]) < 10:
            lines.append(curl.stdout.readline().rstrip(b"\n"))
    finally:
        curl.terminate()
        curl.wait()
    head = first_line.decode().lower()
    assert "200 ok" in head and "content-type: text/event-stream" in head and "cache-control: no-store" in head
    assert [line for line in lines if line.startswith(b"id:")] == [f"id: {wire_id(server, i)}".encode() for i in ids]
    assert [json.loads(line[6:]) for line in lines if line.startswith(b"data:")] == [{"n": n} for n in range(10)]


def test_curl_sees_pings_on_a_quiet_stream(server):
    done = subprocess.run(["curl", "-sS", "-N", "--max-time", "1", f"{server.url}/events?topic=quiet"],
                          capture_output=True, timeout=30)
    assert done.stdout.startswith(b"retry: 2000\n\n") and done.stdout.count(PING) >= 2


def test_httpx_sse_receives_published_events_in_order(server):
    subscriber = start_httpx(server, "library", 50)
    assert subscriber.retry == 2000
    ids = publish(server, "library", [{"n": n, "pad": PAD[:n]} for n in range(50)])
    assert subscriber.finish() == [(i, {"n": n, "pad": PAD[:n]}) for n, i in enumerate(ids)]


def test_reconnecting_with_last_event_id_loses_nothing(server):
    first = start_httpx(server, "resume", 5)
    ids = publish(server, "resume", [{"n": n} for n in range(5)])
    assert [i for i, _ in first.finish()] == ids
    missed = publish(server, "resume", [{"n": n} for n in range(5, 12)])  # while nobody listens
    publish(server, "elsewhere", [{"n": -1}])
    second = start_httpx(server, "resume", 10, last_event_id=wire_id(server, ids[-1]))
    live = publish(server, "resume", [{"n": n} for n in range(12, 15)])
    assert second.finish() == [(i, {"n": n}) for n, i in zip(range(5, 15), missed + live)]


def test_the_example_client_subscribes_and_publishes(server):
    base = stats(server)["subscribers"]
    command = ["--host", server.address[0], "--port", str(server.port), "subscribe", "--topic", "own", "--count", "3",
               "--timeout", "20"]
    subscriber = subprocess.Popen([sys.executable, str(CLIENT), *command], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert wait_until(lambda: stats(server)["subscribers"] == base + 1, 10)
        output = run_example_client(CLIENT, server, "publish", "--topic", "own", '{"a": 1}', "[2]", '"three"')
        assert [json.loads(line)["topic"] for line in output.splitlines()] == ["own"] * 3
        lines = subscriber.communicate(timeout=20)[0].splitlines()
    finally:
        subscriber.kill()
    assert [json.loads(line)["data"] for line in lines[:3]] == ['{"a":1}', "[2]", '"three"']
    assert lines[3].startswith("messages=3 gaps=0 resets=0 reconnects=0")


# -- errors ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, path, status, error", [
    ([], "/events", 400, "invalid_topic"),
    ([], "/events?topic=a/b", 400, "invalid_topic"),
    (["--data", "not json"], "/topics/t/messages", 400, "invalid_message"),
    (["--data", json.dumps(PAD * 5)], "/topics/t/messages", 413, HttpError(413).error),
    (["--data", "{}"], "/topics/a%20b/messages", 400, "invalid_message"),
    ([], "/nothing", 404, HttpError(404).error),
    (["-X", "DELETE"], "/events?topic=t", 405, HttpError(405).error),
], ids=["no-topic", "bad-topic", "not-json", "over-4KiB", "bad-topic-post", "unknown", "delete"])
def test_errors_are_json(server, options, path, status, error):
    done = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *options,
                           server.url + path], capture_output=True, timeout=30)
    body, _, code = done.stdout.rpartition(b"\n")
    assert int(code) == status and json.loads(body)["error"] == error


def test_head_of_a_stream(server):
    done = subprocess.run(["curl", "-sS", "-I", "--max-time", "10", f"{server.url}/events?topic=t"],
                          capture_output=True, text=True, timeout=30)
    assert done.stdout.startswith("HTTP/1.1 200") and "Content-Type: text/event-stream" in done.stdout


# -- slow consumers ----------------------------------------------------------------------------------------------------

BURST = 600  # events of ~1 KiB: more than the slow reader's kernel buffers (64 KiB SO_SNDBUF) and queue (256) hold


@pytest.fixture(scope="module")
def disconnect_server(backend_name):
    with ServerProcess(SERVER, backend_name, "--slow", "disconnect") as process:
        yield process


@pytest.fixture(scope="module")
def drop_server(backend_name):
    with ServerProcess(SERVER, backend_name, "--slow", "drop") as process:
        yield process


def burst_past_a_slow_reader(server, topic: str) -> tuple[list[int], RawSubscriber]:
    """Publish ``BURST`` events of ~1 KiB on ``topic`` while a fast subscriber (httpx-sse) reads and a slow one (a 4 KiB
    receive buffer) has stopped reading; check that the fast one got everything, in order. Return the ids and the slow
    subscriber, still unread."""
    fast = start_httpx(server, topic, BURST)
    slow = RawSubscriber(server, topic, receive_buffer=4096)
    assert slow.subscribed()  # then it stops reading
    ids = publish(server, topic, [{"n": n, "pad": PAD} for n in range(BURST)])
    assert [i for i, _ in fast.finish()] == ids
    return ids, slow


def test_slow_reader_with_policy_disconnect_resumes_and_loses_nothing(disconnect_server):
    server = disconnect_server
    ids, slow = burst_past_a_slow_reader(server, "burst")
    slow.read_until(lambda s: False, timeout=10)  # reading again: what was sent, then the end of the stream
    assert slow.ended and 0 < len(slow.message_ids()) < BURST
    assert slow.message_ids() == ids[:len(slow.message_ids())]
    slow.close()
    again = RawSubscriber(server, "burst", last_event_id=slow.message_ids()[-1])  # as an EventSource reconnects
    assert again.read_until(lambda s: len(s.message_ids()) == BURST - len(slow.message_ids()))
    assert slow.message_ids() + again.message_ids() == ids
    again.close()
    assert wait_until(lambda: stats(server)["subscribers"] == 0, 5)


def test_slow_reader_with_policy_drop_gets_a_gap_and_the_newest(drop_server):
    server = drop_server
    ids, slow = burst_past_a_slow_reader(server, "burst")
    assert slow.read_until(lambda s: ids[-1] in s.message_ids())
    received = slow.message_ids()
    gaps = [json.loads(event.data)["dropped"] for event in slow.events if event.event == "gap"]
    assert gaps and sum(gaps) == len(set(ids) - set(received)) and received == sorted(received)
    assert not slow.ended
    slow.close()
    assert wait_until(lambda: stats(server)["subscribers"] == 0, 5)


# -- limits ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def limits_server(backend_name):
    with ServerProcess(SERVER, backend_name, "--max-subscribers", "2", "--ring-events", "8",
                       "--send-timeout", "1") as process:
        yield process


def test_a_stalled_reader_is_disconnected_after_the_send_timeout(limits_server):
    server = limits_server
    _, stalled = burst_past_a_slow_reader(server, "stall")
    assert wait_until(lambda: stats(server)["subscribers"] == 0, 5)  # the stalled one too, after 1 s without progress
    stalled.close()


def test_over_the_subscriber_limit_gets_retry_5000_and_the_end(limits_server):
    server = limits_server
    streams = [RawSubscriber(server, "full") for _ in range(2)]
    try:
        assert all(stream.subscribed() for stream in streams)
        turned_away = RawSubscriber(server, "full")
        assert turned_away.read_until(lambda s: False, timeout=5) is False and turned_away.ended
        assert turned_away.parser.retry == 5000 and turned_away.header(b"connection") == b"close"
        assert turned_away.response.status_code == 200 and turned_away.events == []
        turned_away.close()
    finally:
        for stream in streams:
            stream.close()
    assert wait_until(lambda: stats(server)["subscribers"] == 0, 5)


def test_a_last_event_id_older_than_the_ring_gets_reset(limits_server):
    server = limits_server
    ids = publish(server, "ring", [{"n": n} for n in range(20)])  # the ring keeps 8
    for last_event_id in (ids[0], ids[-1] + 1000, str(ids[-3])):  # too old; never given; a bare number
        stream = RawSubscriber(server, "ring", last_event_id=last_event_id)
        assert stream.read_until(lambda s: s.events)
        reset = stream.events[0]
        assert reset.event == "reset" and reset.id == wire_id(server, ids[-1])
        assert json.loads(reset.data)["latest"] == ids[-1]
        stream.close()
    stream = RawSubscriber(server, "ring", last_event_id=ids[-3])  # still in the ring: replayed
    assert stream.read_until(lambda s: len(s.message_ids()) == 2) and stream.message_ids() == ids[-2:]
    stream.close()


# -- stopping ----------------------------------------------------------------------------------------------------------

def test_sigterm_ends_open_streams_and_exits_0_promptly(backend_name):
    with ServerProcess(SERVER, backend_name) as process:
        streams = [subprocess.Popen(["curl", "-sS", "-N", "--max-time", "30", f"{process.url}/events?topic=stop"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(5)]
        raw = RawSubscriber(process, "stop")
        assert raw.subscribed() and wait_until(lambda: stats(process)["subscribers"] == 6, 10)
        started = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        assert raw.read_until(lambda s: False, timeout=5) is False and raw.ended  # the stream's last chunk
        raw.close()
        for curl in streams:
            out, err = curl.communicate(timeout=10)
            assert curl.returncode == 0 and out.startswith(b"retry: 2000"), err  # a clean end, not a reset
        assert process.process.wait(10) == 0 and time.monotonic() - started < 2


def test_an_id_from_before_a_restart_gets_reset_never_a_silent_skip(backend_name):
    # A client holds ids 1..3; the server restarts and publishes 8 events before the client reconnects with its last
    # id. With bare numbers it got 4..8 of the new life as if nothing had happened (and never 1..3 of it).
    with ServerProcess(SERVER, backend_name) as first:
        holder = RawSubscriber(first, "life")
        assert holder.subscribed()
        publish(first, "life", [{"life": 1, "n": n} for n in range(3)])
        assert holder.read_until(lambda s: len(s.message_ids()) == 3)
        held_id = holder.parser.last_event_id
        holder.close()
        first_epoch = stats(first)["epoch"]
    with ServerProcess(SERVER, backend_name) as second:
        assert stats(second)["epoch"] != first_epoch
        publish(second, "life", [{"life": 2, "n": n} for n in range(8)])
        again = RawSubscriber(second, "life", last_event_id=held_id)
        assert again.read_until(lambda s: s.events)
        assert again.events[0].event == "reset" and again.message_ids() == []
        assert again.events[0].id == wire_id(second, 8)  # moved to now: a reconnect from there loses nothing new
        again.close()
        after_reset = RawSubscriber(second, "life", last_event_id=again.events[0].id)
        publish(second, "life", [{"life": 2, "n": 8}])
        assert after_reset.read_until(lambda s: s.message_ids() == [9])
        after_reset.close()
