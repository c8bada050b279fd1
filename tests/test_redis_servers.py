"""The push server with ``--store redis``: several workers and two servers on one real Redis, on every backend.

Two servers on different ports stand in for two machines: one runs ``--workers 2`` (so its connections spread over two
processes), the other one process. What is checked: an event published through either reaches a subscriber of the
other; a client moved between the servers many times mid-stream, while events are published through both, receives
every event exactly once and in order (the stream id is the event id, and any server resumes from it); an id no
server gave is answered with ``event: reset`` whose id resumes; the servers stop cleanly (exit 0).
"""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest

from example_servers import EXAMPLES, ServerProcess, backend_name  # noqa: F401
from iokit.patterns.sse import EventStreamParser
from iokit.redis import RedisServerProcess

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (make test installs it)")

PUSH = EXAMPLES / "push_server.py"


@pytest.fixture(scope="module")
def redis_server():
    with RedisServerProcess() as server:
        yield server


@pytest.fixture(scope="module")
def push_servers(backend_name, redis_server):
    store = ("--store", redis_server.url)
    with ServerProcess(PUSH, backend_name, *store, "--workers", "2") as first, \
            ServerProcess(PUSH, backend_name, *store) as second:
        yield first, second


def publish(server: ServerProcess, topic: str, message) -> str:
    answer = httpx.post(f"{server.url}/topics/{topic}/messages", json=message, timeout=10.0)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def read_events(server: ServerProcess, topic: str, count: int, last_event_id: str | None = None,
                timeout: float = 10.0) -> list:
    """Open an event stream (resuming after ``last_event_id``), return its first ``count`` events, then leave."""
    parser = EventStreamParser()
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    events = []
    with httpx.stream("GET", f"{server.url}/events", params={"topic": topic}, headers=headers,
                      timeout=timeout) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            events += parser.feed(chunk)
            if len(events) >= count:
                break
    return events[:count]


def test_an_event_published_on_one_server_reaches_the_other(push_servers, backend_name):
    first, second = push_servers
    topic = f"across-{backend_name}"
    anchor = publish(first, topic, {"n": 0})
    ids = [publish(first, topic, {"n": 1}), publish(second, topic, {"n": 2})]
    for server in (first, second):
        events = read_events(server, topic, 2, last_event_id=anchor)
        assert [(event.id, event.data) for event in events] == list(zip(ids, ['{"n":1}', '{"n":2}']))


def test_a_client_moved_between_servers_gets_each_event_once(push_servers, backend_name):
    """A publisher posts 300 events, alternating between the servers; the client reads a few events at a time and
    reconnects to the other server with its Last-Event-ID, 60 times or more."""
    first, second = push_servers
    topic = f"moving-{backend_name}"
    total = 300
    anchor = publish(first, topic, {"n": -1})  # where the client starts: after this event
    published: list[str] = []

    def publisher():
        with httpx.Client(timeout=10.0) as client:
            for n in range(total):
                server = (first, second)[n % 2]
                answer = client.post(f"{server.url}/topics/{topic}/messages", json={"n": n})
                published.append(answer.json()["id"])

    thread = threading.Thread(target=publisher)
    thread.start()
    received: list = []
    last_id = anchor
    moves = 0
    try:
        while len(received) < total:
            server = (first, second)[moves % 2]
            events = read_events(server, topic, min(5, total - len(received)), last_event_id=last_id)
            received += [event for event in events if event.event == "message"]
            assert all(event.event == "message" for event in events), [e.event for e in events]
            last_id = received[-1].id
            moves += 1
    finally:
        thread.join()
    assert [event.data for event in received] == [f'{{"n":{n}}}' for n in range(total)]
    assert [event.id for event in received] == published
    assert moves >= 60


def test_an_id_no_server_gave_is_reset(push_servers, backend_name):
    first, second = push_servers
    topic = f"reset-{backend_name}"
    publish(first, topic, {"n": 0})
    reset, = read_events(second, topic, 1, last_event_id="99999999999999-0")
    assert reset.event == "reset"
    after = publish(first, topic, {"n": 1})
    resumed, = read_events(first, topic, 1, last_event_id=reset.id)
    assert (resumed.id, resumed.data) == (after, '{"n":1}')

