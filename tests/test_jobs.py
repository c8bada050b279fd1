"""Short and long polling: the job table and waiter registry alone (sans-IO, a hand-driven clock), then the jobs server
as a real process on every backend, driven by curl, raw sockets and its own client.

One server per backend serves most tests (retention shortened to 1 s); the limits (a queue of 2, 3 held requests) and
the stop get servers of their own. Every load is bounded: at most 1,000 connections, each test within seconds.
"""

from __future__ import annotations

import json
import selectors
import signal
import socket
import subprocess
import time

import pytest

from example_servers import EXAMPLES, ServerProcess, backend_name, run_example_client, wait_until  # noqa: F401
from iokit.http import HttpError
from iokit.patterns.jobs import (IdempotencyConflict, InvalidJobRequest, JobFinished, JobGone, JobNotFound,
                                 JobRequest, JobStatus, JobTable, QueueFull, TooManyWaiters, WaiterRegistry,
                                 parse_job_request, parse_long_poll)
from iokit.patterns.limits import JobLimits
from iokit.serve import raise_open_file_limit

SERVER = EXAMPLES / "jobs_server.py"
CLIENT = EXAMPLES / "jobs_client.py"
LIMITS = JobLimits()


# -- the table, sans-IO ------------------------------------------------------------------------------------------------

def table_with(**limits) -> tuple[JobTable, list[tuple[str, str, int]]]:
    changes = []
    ids = (f"job{n}" for n in range(1000))
    table = JobTable(JobLimits(**limits), on_change=lambda job: changes.append((job.id, job.status.value, job.version)),
                     new_id=lambda: next(ids))
    return table, changes


def test_a_job_goes_queued_running_succeeded_and_each_change_is_a_version():
    table, changes = table_with(max_running_jobs=1)
    first, _ = table.submit(JobRequest(1000), now=0.0)
    second, _ = table.submit(JobRequest(500), now=0.0)
    assert (first.status, second.status) == (JobStatus.RUNNING, JobStatus.QUEUED)
    assert table.next_deadline() == 1.0
    table.advance(1.2)  # the runner is late: the second job still started when the first ended
    assert first.monitor() == {"id": "job0", "status": "succeeded", "result": {"duration_ms": 1000}, "error": None,
                               "version": 3}
    assert second.status is JobStatus.RUNNING and second.ends_at == 1.5
    table.advance(1.5)
    assert changes == [("job0", "running", 2), ("job0", "succeeded", 3), ("job1", "running", 2),
                       ("job1", "succeeded", 3)]


def test_a_job_asked_to_fail_fails_with_an_error():
    table, _ = table_with()
    job, _ = table.submit(JobRequest(10, fail=True), now=0.0)
    table.advance(0.01)
    assert job.status is JobStatus.FAILED and job.error and job.result is None


def test_cancel_a_queued_or_running_job_and_not_a_finished_one():
    table, _ = table_with(max_running_jobs=1)
    running, _ = table.submit(JobRequest(1000), now=0.0)
    queued, _ = table.submit(JobRequest(1000), now=0.0)
    assert table.cancel(queued.id, now=0.1).status is JobStatus.CANCELED
    assert table.cancel(running.id, now=0.2).status is JobStatus.CANCELED
    assert table.cancel(running.id, now=0.3).version == 3  # canceling again changes nothing
    done, _ = table.submit(JobRequest(0), now=0.4)
    table.advance(0.4)
    with pytest.raises(JobFinished):
        table.cancel(done.id, now=0.5)
    assert (table.running, table.queued) == (0, 0)


def test_queue_full_says_when_to_retry():
    table, _ = table_with(max_running_jobs=1, max_queued_jobs=2)
    for _ in range(3):
        table.submit(JobRequest(5000), now=0.0)
    with pytest.raises(QueueFull) as refused:
        table.submit(JobRequest(1), now=1.5)
    assert refused.value.retry_after == 4


def test_retention_then_gone_then_forgotten():
    table, _ = table_with(retention_seconds=10, max_gone_ids=1)
    first, _ = table.submit(JobRequest(0), now=0.0)
    second, _ = table.submit(JobRequest(0), now=1.0)
    assert table.get(first.id, now=9.9).status is JobStatus.SUCCEEDED
    with pytest.raises(JobGone):
        table.get(first.id, now=10.0)
    with pytest.raises(JobGone):
        table.get(second.id, now=11.0)
    with pytest.raises(JobNotFound):  # only one gone id is remembered
        table.get(first.id, now=11.0)
    with pytest.raises(JobNotFound):
        table.get("never", now=0.0)


def test_retained_jobs_are_bounded_in_number():
    table, _ = table_with(max_retained_jobs=2)
    jobs = [table.submit(JobRequest(0), now=0.0)[0] for _ in range(3)]
    table.advance(0.0)
    assert len(table) == 2
    with pytest.raises(JobGone):
        table.get(jobs[0].id, now=0.0)


def test_idempotency_key_gives_the_same_job_or_a_conflict():
    table, _ = table_with(retention_seconds=5)
    job, created = table.submit(JobRequest(100), now=0.0, idempotency_key="k")
    again, created_again = table.submit(JobRequest(100), now=0.05, idempotency_key="k")
    assert (created, created_again, again is job) == (True, False, True)
    with pytest.raises(IdempotencyConflict):
        table.submit(JobRequest(100, fail=True), now=0.06, idempotency_key="k")
    new, created = table.submit(JobRequest(100), now=6.0, idempotency_key="k")  # the key went with its job
    assert created and new.id != job.id


@pytest.mark.parametrize("body", [b"", b"nope", b"[]", b'{"duration_ms": -1}', b'{"duration_ms": 600001}',
                                  b'{"duration_ms": 1.5}', b'{"duration_ms": true}', b'{"duration_ms": 1, "fail": 1}',
                                  b'{"duration_ms": 1, "priority": 9}', b"\xff"])
def test_bad_job_requests_are_refused(body):
    with pytest.raises(InvalidJobRequest):
        parse_job_request(body, LIMITS)


def test_long_poll_parameters():
    assert parse_long_poll({}, LIMITS, jitter=0.5) is None
    assert parse_long_poll({"version": "3"}, LIMITS, jitter=0.0).wait_seconds == 30
    poll = parse_long_poll({"wait": "60", "version": "2"}, LIMITS, jitter=1.0)
    assert poll.version == 2 and poll.wait_seconds == pytest.approx(63)
    for query in ({"wait": "61"}, {"wait": "-1"}, {"wait": "nan"}, {"wait": "abc"}, {"wait": ""},
                  {"wait": "5", "version": "x"}):
        with pytest.raises(InvalidJobRequest):
            parse_long_poll(query, LIMITS, jitter=0.0)


def test_register_before_check_never_misses_a_change():
    # The handler's order: register the wake-up, then read the version. A change between the two both wakes the
    # waiter and shows in the read, so the waiter either answers at once or is woken: it never sleeps past it.
    registry = WaiterRegistry(max_waiters=10)
    woken = []
    table = JobTable(JobLimits(), on_change=lambda job: [waiter.wake() for waiter in registry.notify(job.id)])
    job, _ = table.submit(JobRequest(1000), now=0.0)
    seen_version = job.version
    registry.register(job.id, lambda: woken.append("woken"))
    table.advance(1.0)  # the change lands between registering and checking
    assert table.get(job.id, now=1.0).version != seen_version and woken == ["woken"]
    assert registry.held == 0


def test_waiter_registry_limit_notify_and_unregister():
    registry = WaiterRegistry(max_waiters=2)
    calls = []
    first = registry.register("a", lambda: calls.append("first"))
    second = registry.register("a", lambda: calls.append("second"))
    with pytest.raises(TooManyWaiters):
        registry.register("b", lambda: None)
    registry.unregister(first)
    registry.unregister(first)
    assert registry.held == 1
    assert registry.notify("a", "the news") == [second] and registry.held == 0 and calls == []  # the caller wakes
    assert (second.woken, second.news, second.registered, first.woken) == (True, "the news", False, False)
    assert registry.notify("a") == []


# -- the server: helpers -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(backend_name):
    with ServerProcess(SERVER, backend_name, "--retention-seconds", "1") as process:
        yield process


def curl(server, path: str, *options: str) -> tuple[int, dict[str, str], dict]:
    """Run curl; return status, headers (lower-case names) and the JSON body."""
    done = subprocess.run(["curl", "-sS", "-i", "--max-time", "20", *options, server.url + path], capture_output=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, json.loads(body)


def post_job(server, duration_ms: int, fail: bool = False, *options: str) -> tuple[int, dict[str, str], dict]:
    return curl(server, "/jobs", "-X", "POST", "-H", "Content-Type: application/json",
                "--data", json.dumps({"duration_ms": duration_ms, "fail": fail}), *options)


def stats(server) -> dict:
    return curl(server, "/stats")[2]


def hold_raw(server, path: str) -> socket.socket:
    """Open a connection and send a GET for ``path`` (a long poll), without reading the answer."""
    connection = socket.create_connection(server.address, timeout=10)
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return connection


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
        chunk = connection.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, json.loads(body)


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


# -- short polling -----------------------------------------------------------------------------------------------------

def test_post_then_short_poll_until_it_succeeds(server):
    status, headers, monitor = post_job(server, 300)
    assert status == 202 and headers["location"] == f"/jobs/{monitor['id']}" and headers["retry-after"] == "1"
    assert headers["etag"] == f'"{monitor["version"]}"' and headers["cache-control"] == "no-store"
    assert set(monitor) == {"id", "status", "result", "error", "version"} and monitor["status"] == "running"
    status, headers, polled = curl(server, headers["location"])
    assert status == 200 and polled["status"] == "running" and headers["retry-after"] == "1"
    time.sleep(0.4)
    status, headers, polled = curl(server, f"/jobs/{monitor['id']}")
    assert polled["status"] == "succeeded" and polled["result"] == {"duration_ms": 300} and "retry-after" not in headers
    assert headers["etag"] == '"3"'


def test_a_failing_job_ends_failed(server):
    _, headers, _ = post_job(server, 0, True)
    time.sleep(0.1)
    assert curl(server, headers["location"])[2]["status"] == "failed"


def test_cancel(server):
    _, headers, monitor = post_job(server, 60_000)
    status, _, canceled = curl(server, headers["location"] + "/cancel", "-X", "POST")
    assert status == 202 and canceled["status"] == "canceled" and canceled["version"] == monitor["version"] + 1
    assert curl(server, headers["location"] + "/cancel", "-X", "POST")[0] == 202
    _, headers, _ = post_job(server, 0)
    time.sleep(0.1)
    status, _, error = curl(server, headers["location"] + "/cancel", "-X", "POST")
    assert (status, error["error"]) == (409, "job_finished")


def test_idempotency_key(server):
    key = f"key-{time.monotonic_ns()}"
    first = post_job(server, 5000, False, "-H", f"Idempotency-Key: {key}")
    again = post_job(server, 5000, False, "-H", f"Idempotency-Key: {key}")
    assert first[0] == again[0] == 202 and first[2]["id"] == again[2]["id"]
    assert again[1]["idempotent-replayed"] == "true" and again[1]["location"] == first[1]["location"]
    status, _, error = post_job(server, 4000, False, "-H", f"Idempotency-Key: {key}")
    assert (status, error["error"]) == (409, "idempotency_conflict")
    curl(server, first[1]["location"] + "/cancel", "-X", "POST")


def test_retention_then_410(server):
    _, headers, _ = post_job(server, 0)
    time.sleep(1.3)
    status, _, error = curl(server, headers["location"])
    assert (status, error["error"]) == (410, "gone") and error["detail"]


@pytest.mark.parametrize("path, options, status, error", [
    ("/jobs", ["--data", "nope"], 400, "invalid_request"),
    ("/jobs", ["--data", '{"duration_ms": 600001}'], 400, "invalid_request"),
    ("/jobs", ["--data", '{"duration_ms": 5, "fail": "yes"}'], 400, "invalid_request"),
    ("/jobs", ["--data", "x" * 5000], 413, HttpError(413).error),
    ("/jobs", ["-H", "Idempotency-Key: " + "k" * 256, "--data", '{"duration_ms": 5}'], 400, "invalid_request"),
    ("/jobs/0123456789abcdef0123456789abcdef", [], 404, "not_found"),
    ("/jobs/nope?wait=5", [], 404, "not_found"),
    ("/jobs/nope/cancel", ["-X", "POST"], 404, "not_found"),
    ("/jobs", ["-X", "DELETE"], 405, HttpError(405).error),
], ids=["bad-json", "too-long", "fail-not-bool", "body-over-4KiB", "key-too-long", "unknown", "unknown-long-poll",
        "cancel-unknown", "delete"])
def test_errors_are_json(server, path, options, status, error):
    answer = curl(server, path, *options)
    assert (answer[0], answer[2]["error"]) == (status, error) and answer[2]["detail"]


def test_if_none_match_with_the_current_etag_is_304_without_a_body(server):
    _, headers, monitor = post_job(server, 60_000)
    location, current = headers["location"], headers["etag"]
    for tag in (current, f"W/{current}", f'"0", {current}', "*"):
        done = subprocess.run(["curl", "-sS", "-i", "--max-time", "10", "-H", f"If-None-Match: {tag}",
                               server.url + location], capture_output=True, timeout=30)
        head, _, body = done.stdout.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
        assert lines[0].startswith("HTTP/1.1 304"), (tag, lines[0])
        assert body == b"" and "content-length" not in fields and "transfer-encoding" not in fields
        assert fields["etag"] == current and fields["cache-control"] == "no-store" and fields["retry-after"] == "1"
    # An older tag gets the monitor, as does a poll without one; a long poll always answers 200.
    assert curl(server, location, "-H", 'If-None-Match: "1"')[0] == 200
    assert curl(server, f"{location}?wait=0", "-H", f"If-None-Match: {current}")[0] == 200
    curl(server, f"{location}/cancel", "-X", "POST")
    status, headers, _ = curl(server, location, "-H", f"If-None-Match: {current}")  # it changed: the new monitor
    assert status == 200 and headers["etag"] != current


@pytest.mark.parametrize("query", ["wait=abc", "wait=61", "wait=-1", "wait=", "wait=5&version=x"])
def test_a_bad_wait_or_version_is_400(server, query):
    _, headers, _ = post_job(server, 0)
    status, _, error = curl(server, f"{headers['location']}?{query}")
    assert (status, error["error"]) == (400, "invalid_request")


# -- long polling ------------------------------------------------------------------------------------------------------

def test_a_long_poll_is_answered_when_the_job_changes(server):
    _, headers, monitor = post_job(server, 500)
    started = time.monotonic()
    status, headers, changed = curl(server, f"{headers['location']}?wait=10&version={monitor['version']}")
    elapsed = time.monotonic() - started
    assert status == 200 and changed["status"] == "succeeded" and 0.4 < elapsed < 1.5
    assert headers["etag"] == f'"{changed["version"]}"' and headers["cache-control"] == "no-store"


def test_a_long_poll_times_out_with_the_same_version(server):
    _, headers, monitor = post_job(server, 60_000)
    started = time.monotonic()
    status, answer_headers, same = curl(server, f"{headers['location']}?wait=0.5&version={monitor['version']}")
    elapsed = time.monotonic() - started
    assert status == 200 and same == monitor and answer_headers["etag"] == f'"{monitor["version"]}"'
    assert 0.5 <= elapsed < 0.5 * (1 + LIMITS.wait_jitter) + 0.5
    curl(server, headers["location"] + "/cancel", "-X", "POST")


def test_a_long_poll_on_another_version_or_an_ended_job_answers_at_once(server):
    _, headers, monitor = post_job(server, 60_000)
    started = time.monotonic()
    assert curl(server, f"{headers['location']}?wait=30&version=1")[2] == monitor  # the job is at version 2
    curl(server, headers["location"] + "/cancel", "-X", "POST")
    assert curl(server, f"{headers['location']}?wait=30&version=3")[2]["status"] == "canceled"
    assert time.monotonic() - started < 2


def test_a_change_right_after_the_request_is_never_missed(server):
    # Jobs of a few milliseconds end around the moment the long poll is registered and checked: whichever comes first,
    # the answer must come at once, never after the 20 s wait.
    for duration_ms in (0, 1, 2, 3, 5, 8) * 3:
        _, headers, monitor = post_job(server, duration_ms)
        started = time.monotonic()
        _, _, answer = curl(server, f"{headers['location']}?wait=20&version={monitor['version']}")
        assert answer["status"] == "succeeded" and time.monotonic() - started < 2


def test_a_client_that_disconnects_frees_its_waiter_at_once(server):
    _, headers, monitor = post_job(server, 60_000)
    base = stats(server)["held"]
    connections = [hold_raw(server, f"{headers['location']}?wait=50&version={monitor['version']}") for _ in range(5)]
    assert wait_until(lambda: stats(server)["held"] == base + 5, 5)
    for connection in connections[:3]:
        connection.close()
    assert wait_until(lambda: stats(server)["held"] == base + 2, 0.5), stats(server)
    curl(server, headers["location"] + "/cancel", "-X", "POST")
    for connection in connections[3:]:
        assert read_response(connection)[2]["status"] == "canceled"
        connection.close()
    assert wait_until(lambda: stats(server)["held"] == base, 2)


HELD = 1000


def test_1000_held_long_polls_are_released_together_while_others_are_served(server):
    raise_open_file_limit(4 * HELD)
    job_seconds = 6.0
    _, headers, monitor = post_job(server, int(job_seconds * 1000))
    job_ends = time.monotonic() + job_seconds
    path = f"{headers['location']}?wait=60&version={monitor['version']}"
    connections = []
    try:
        for _ in range(HELD):
            connections.append(hold_raw(server, path))
        assert wait_until(lambda: stats(server)["held"] >= HELD, job_ends - time.monotonic() - 1), \
            "the 1,000 long polls were not all held before the job ended"
        started = time.monotonic()
        status, _, other = post_job(server, 0)  # another client, while the server holds 1,000 requests
        assert curl(server, f"/jobs/{other['id']}")[0] == 200 and status == 202
        assert time.monotonic() - started < 1.0, f"two requests took {time.monotonic() - started:.2f} s"
        arrived = _read_all(connections, deadline=job_ends + 10)
        assert len(arrived) == HELD
        unexpected = [answer for answer, _ in arrived.values() if answer.get("status") != "succeeded"]
        assert not unexpected, f"{len(unexpected)} unexpected answers, such as {unexpected[:3]}"
        latest = max(when for _, when in arrived.values())
        assert latest - job_ends < 1.0, f"the last held request was answered {latest - job_ends:.2f} s after the end"
    finally:
        for connection in connections:
            connection.close()
    assert wait_until(lambda: stats(server)["held"] == 0, 5)


def _read_all(connections: list[socket.socket], deadline: float) -> dict[socket.socket, tuple[dict, float]]:
    """Read one JSON response from each connection; return {connection: (body, arrival time)}; a connection closed
    without a complete response has the body ``{"closed": <what arrived>}``."""
    received = {connection: b"" for connection in connections}
    done = {}
    with selectors.DefaultSelector() as selector:
        for connection in connections:
            connection.setblocking(False)
            selector.register(connection, selectors.EVENT_READ)
        while len(done) < len(connections) and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                data = key.fileobj.recv(65536)
                received[key.fileobj] += data
                if not data or received[key.fileobj].endswith(b"}\n"):
                    selector.unregister(key.fileobj)
                    body = received[key.fileobj].partition(b"\r\n\r\n")[2]
                    answer = json.loads(body) if data else {"closed": received[key.fileobj][:200]}
                    done[key.fileobj] = (answer, time.monotonic())
    return done


# -- limits, clients, stopping -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_server(backend_name):
    with ServerProcess(SERVER, backend_name, "--max-running-jobs", "1", "--max-queued-jobs", "2",
                       "--max-held-requests", "3") as process:
        yield process


def test_over_the_queue_limit_is_503_with_retry_after(small_server):
    created = [post_job(small_server, 30_000)[2]["id"] for _ in range(3)]  # one runs, two wait
    status, headers, error = post_job(small_server, 1)
    assert (status, error["error"]) == (503, "queue_full") and 1 <= int(headers["retry-after"]) <= 30
    for job_id in created:
        curl(small_server, f"/jobs/{job_id}/cancel", "-X", "POST")
    assert post_job(small_server, 1)[0] == 202


def test_over_the_held_limit_is_503(small_server):
    _, headers, monitor = post_job(small_server, 30_000)
    path = f"{headers['location']}?wait=30&version={monitor['version']}"
    connections = [hold_raw(small_server, path) for _ in range(3)]
    try:
        assert wait_until(lambda: stats(small_server)["held"] == 3, 5)
        status, answer_headers, error = curl(small_server, path)
        assert (status, error["error"]) == (503, "too_many_waiters") and answer_headers["retry-after"] == "1"
        assert curl(small_server, headers["location"])[0] == 200  # a short poll is still answered
    finally:
        curl(small_server, headers["location"] + "/cancel", "-X", "POST")
        for connection in connections:
            connection.close()


@pytest.mark.parametrize("mode", ["short", "long"])
def test_the_example_client_follows_a_job(server, mode):
    output = run_example_client(CLIENT, server, "--duration-ms", "1200", "--mode", mode).splitlines()
    assert [json.loads(line)["status"] for line in output[:-1]] == ["running", "succeeded"]
    summary = output[-1]
    assert summary.startswith("status=succeeded") and f"mode={mode}" in summary
    polls = int(summary.split("polls=")[1].split()[0])
    assert polls == 1 if mode == "long" else polls >= 2  # a long poll costs one request per change


def test_the_example_client_cancels(server):
    output = run_example_client(CLIENT, server, "--duration-ms", "60000", "--cancel-after", "0.3").splitlines()
    assert output[-1].startswith("status=canceled")


def test_sigterm_answers_held_requests_and_exits_0_promptly(backend_name):
    with ServerProcess(SERVER, backend_name) as process:
        _, headers, monitor = post_job(process, 60_000)
        held = [hold_raw(process, f"{headers['location']}?wait=60&version={monitor['version']}") for _ in range(20)]
        assert wait_until(lambda: stats(process)["held"] == 20, 5)
        started = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        for connection in held:
            status, answer_headers, answer = read_response(connection)
            assert status == 200 and answer == monitor and answer_headers["connection"] == "close"
            connection.close()
        assert process.process.wait(10) == 0 and time.monotonic() - started < 2
