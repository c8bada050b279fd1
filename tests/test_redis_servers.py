"""The push and jobs servers with ``--store redis``: several workers and two servers on one real Redis, on every
backend.

Two servers on different ports stand in for two machines: one runs ``--workers 2`` (so its connections spread over two
processes), the other one process. Push: an event published through either reaches a subscriber of the other; a
client moved between the servers many times mid-stream, while events are published through both, receives every event
exactly once and in order (the stream id is the event id, and any server resumes from it); an id no server gave is
answered with ``event: reset`` whose id resumes. Jobs: a job created through one server is polled through the other;
long polls held on both are released when the job ends (within a second) or is canceled through the other; an
idempotency key holds across servers; a finished job expires by Redis TTL (410). The servers stop cleanly (exit 0).
"""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from example_servers import EXAMPLES, ServerProcess, backend_name  # noqa: F401
from iokit.patterns.sse import EventStreamParser
from iokit.redis import RedisServerProcess

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (make test installs it)")

PUSH = EXAMPLES / "push_server.py"
JOBS = EXAMPLES / "jobs_server.py"
RETENTION_SECONDS = 2.0


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



# -- jobs ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jobs_servers(backend_name, redis_server):
    flags = ("--store", redis_server.url, "--retention-seconds", str(RETENTION_SECONDS))
    with ServerProcess(JOBS, backend_name, *flags, "--workers", "2") as first, \
            ServerProcess(JOBS, backend_name, *flags) as second:
        yield first, second


def create_job(server: ServerProcess, duration_ms: int, **headers) -> dict:
    answer = httpx.post(f"{server.url}/jobs", json={"duration_ms": duration_ms}, headers=headers, timeout=10.0)
    assert answer.status_code == 202, answer.text
    return answer.json()


def long_poll(server: ServerProcess, job: dict, results: list) -> None:
    started = time.monotonic()
    answer = httpx.get(f"{server.url}/jobs/{job['id']}", params={"wait": 20, "version": job["version"]}, timeout=30.0)
    results.append((answer.status_code, answer.json(), time.monotonic() - started))


def test_a_job_created_on_one_server_is_polled_on_the_other(jobs_servers):
    first, second = jobs_servers
    job = create_job(first, 600)
    assert job["status"] == "running"
    polled = httpx.get(f"{second.url}/jobs/{job['id']}", timeout=10.0)
    assert polled.status_code == 200 and polled.json() == job and polled.headers["etag"] == f'"{job["version"]}"'
    results: list = []
    # Held on both servers, several per server (the first one's are spread over its two workers).
    threads = [threading.Thread(target=long_poll, args=((first, second)[n % 2], job, results)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6
    for status, monitor, seconds in results:
        assert status == 200 and monitor["status"] == "succeeded" and monitor["version"] == job["version"] + 1
        assert seconds < 1.6  # the job ends 0.6 s after it was created: released within a second of its end
    assert httpx.get(f"{first.url}/jobs/{job['id']}", timeout=10.0).json()["status"] == "succeeded"


def test_a_cancel_on_one_server_wakes_long_polls_on_the_other(jobs_servers):
    first, second = jobs_servers
    job = create_job(second, 30_000)
    results: list = []
    thread = threading.Thread(target=long_poll, args=(first, job, results))
    thread.start()
    time.sleep(0.5)
    canceled = httpx.post(f"{second.url}/jobs/{job['id']}/cancel", timeout=10.0)
    assert canceled.status_code == 202
    thread.join()
    (status, monitor, seconds), = results
    assert monitor["status"] == "canceled" and seconds < 5.0


def test_an_idempotency_key_holds_across_servers(jobs_servers, backend_name):
    first, second = jobs_servers
    key = f"key-{backend_name}-{time.monotonic()}"
    job = create_job(first, 100, **{"Idempotency-Key": key})
    replayed = httpx.post(f"{second.url}/jobs", json={"duration_ms": 100}, headers={"Idempotency-Key": key},
                          timeout=10.0)
    assert replayed.status_code == 202 and replayed.json()["id"] == job["id"]
    assert replayed.headers["idempotent-replayed"] == "true"
    conflict = httpx.post(f"{second.url}/jobs", json={"duration_ms": 200}, headers={"Idempotency-Key": key},
                          timeout=10.0)
    assert conflict.status_code == 409


def test_a_finished_job_expires_by_ttl(jobs_servers):
    first, second = jobs_servers
    job = create_job(first, 0)
    assert httpx.get(f"{second.url}/jobs/{job['id']}", timeout=10.0).json()["status"] == "succeeded"
    time.sleep(RETENTION_SECONDS + 0.5)
    assert httpx.get(f"{second.url}/jobs/{job['id']}", timeout=10.0).status_code == 410
    assert httpx.get(f"{first.url}/jobs/{'0' * 32}", timeout=10.0).status_code == 404


# -- a Redis restart ----------------------------------------------------------------------------------------------------

def test_both_servers_ride_out_a_redis_restart(backend_name):
    """Redis is killed and started again on its port (durable: the stream and the jobs survive). While it is down a
    publish and a job creation get 503 with Retry-After; once it is back, an SSE stream opened before the kill gets the
    events published after the restart (the process's stream reader reconnected by itself), and a long poll is woken
    by a change again (the jobs server's subscription was opened anew)."""
    with RedisServerProcess(durable=True) as redis, \
            ServerProcess(PUSH, backend_name, "--store", redis.url) as push, \
            ServerProcess(JOBS, backend_name, "--store", redis.url) as jobs:
        topic = f"restart-{backend_name}"
        before = publish(push, topic, {"n": 0})
        received: list = []
        reader = threading.Thread(target=lambda: received.extend(
            read_events(push, topic, 2, last_event_id=before, timeout=30.0)))
        reader.start()
        time.sleep(0.3)
        redis.kill()
        down = httpx.post(f"{push.url}/topics/{topic}/messages", json={"n": 1}, timeout=10.0)
        assert down.status_code == 503 and down.headers["retry-after"] == "1"
        job_down = httpx.post(f"{jobs.url}/jobs", json={"duration_ms": 10}, timeout=10.0)
        assert job_down.status_code == 503 and job_down.json()["error"] == "store_unavailable"
        redis.start()
        after = [publish(push, topic, {"n": n}) for n in (1, 2)]
        reader.join(timeout=20.0)
        assert not reader.is_alive()
        assert [event.id for event in received] == after
        job = create_job(jobs, 30_000)
        results: list = []
        poll = threading.Thread(target=long_poll, args=(jobs, job, results))
        poll.start()
        time.sleep(0.5)
        assert httpx.post(f"{jobs.url}/jobs/{job['id']}/cancel", timeout=10.0).status_code == 202
        poll.join(timeout=20.0)
        (status, monitor, seconds), = results
        assert status == 200 and monitor["status"] == "canceled" and seconds < 5.0
