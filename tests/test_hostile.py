"""Hostile clients from outside (issue 17): each kind of bug the battery found, tried again at every place it could occur,
against the example servers as real processes on every backend (127.0.0.1 only, every load bounded).

1. Numbers from clients: one reader (``iokit.http.client_input``), ASCII digits only and a length bound, 400 otherwise.
2. JSON bodies: a nesting bound, 400.
3. A held request (long poll, event stream) notices its client leaving after the client sent more than it buffers.
4. What a client can make the upload server keep: unfinished uploads and the lengths they promise.
5. A burst's threads and fds go back (the ``threads`` pool shrinks).
Also: a client that never reads is dropped after one send timeout on every backend (HTTP and binproto), a request line
without a version is 400 at once, a chunk-size line has a bound.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import threading
import time
import urllib.parse

import pytest

from example_servers import EXAMPLES, ServerProcess, backend_name, wait_until  # noqa: F401
from iokit.http.client_input import InvalidJson, read_decimal, read_integer, read_json
from iokit.http.limits import MAX_JSON_DEPTH
from iokit.serve import raise_open_file_limit

SUPERSCRIPT_TWO = "\u00b2"    # str.isdigit() says yes, int() says no
ARABIC_INDIC_THREE = "\u0663"  # str.isdigit() says yes, int() reads 3
HOSTILE_NUMBERS = [SUPERSCRIPT_TWO, ARABIC_INDIC_THREE, "9" * 5000, "+1", " 1", "1_0", "0x10", "-1"]
DEEP_JSON = b"[" * 2000 + b"]" * 2000  # 4,000 bytes: under the 4 KiB body cap of both routes


# -- raw HTTP, so that nothing between the test and the server tidies up what it sends --------------------------------

def exchange(address, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, list[str]], bytes]:
    """Send ``data`` on a new connection, read until the server closes; return the first response's status, headers
    (lower-case names, every value) and body."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return parse_response(received)


def parse_response(received: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if "content-length" in headers:
        body = body[:int(headers["content-length"][0])]
    return int(lines[0].split()[1]), headers, body


def request(address, method: str, target: str, headers: list[tuple[str, str]] = (), body: bytes = b"",
            timeout: float = 10.0) -> tuple[int, dict[str, list[str]], bytes]:
    head = [f"{method} {target} HTTP/1.1", "Host: test", "Connection: close", *(f"{n}: {v}" for n, v in headers)]
    if body or method in ("POST", "PATCH"):
        head.append(f"Content-Length: {len(body)}")
    text = "\r\n".join(head) + "\r\n\r\n"
    try:
        wire = text.encode("latin-1")  # a byte per character, as a server decodes it: "\xb2" arrives as one byte
    except UnicodeEncodeError:
        wire = text.encode("utf-8")
    return exchange(address, wire + body, timeout)


def quoted(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def json_of(response) -> dict:
    return json.loads(response[2])


# -- the servers, one of each per backend -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def http_server(backend_name):
    with ServerProcess(EXAMPLES / "http_server.py", backend_name, "--send-timeout", "2",
                       "--linger-timeout", "0.5") as server:
        yield server


@pytest.fixture(scope="module")
def jobs_server(backend_name):
    with ServerProcess(EXAMPLES / "jobs_server.py", backend_name) as server:
        yield server


@pytest.fixture(scope="module")
def push_server(backend_name):
    with ServerProcess(EXAMPLES / "push_server.py", backend_name) as server:
        yield server


@pytest.fixture(scope="module")
def upload_server(backend_name, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"uploads-{backend_name}")
    with ServerProcess(EXAMPLES / "upload_server.py", backend_name, "--dir", str(directory)) as server:
        yield server


@pytest.fixture(scope="module")
def capped_upload_server(backend_name, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"capped-uploads-{backend_name}")
    with ServerProcess(EXAMPLES / "upload_server.py", backend_name, "--dir", str(directory), "--max-live-uploads", "3",
                       "--max-promised-bytes", "1000") as server:
        yield server


def new_job(server, duration_ms: int = 60_000) -> dict:
    response = request(server.address, "POST", "/jobs", [("Content-Type", "application/json")],
                       json.dumps({"duration_ms": duration_ms}).encode())
    assert response[0] == 202, response
    return json_of(response)


# -- 1. numbers ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", HOSTILE_NUMBERS + ["", "1" * 20])
def test_the_one_reader_refuses_every_number_that_is_not_plain_ascii_digits(text):
    assert read_integer(text) is None
    assert read_decimal(text) is None


def test_the_one_reader_reads_plain_numbers_and_decimals_only():
    assert read_integer("0") == 0 and read_integer("9" * 19) == int("9" * 19)
    assert read_decimal("2") == 2.0 and read_decimal("0.25") == 0.25
    for text in ("nan", "inf", "1e3", "1.", ".5", "1.2.3", f"1.{ARABIC_INDIC_THREE}"):
        assert read_decimal(text) is None, text


@pytest.mark.parametrize("text", HOSTILE_NUMBERS)
def test_delay_takes_only_ascii_digits(http_server, text):
    status, _, body = request(http_server.address, "GET", f"/delay?ms={quoted(text)}")
    assert status == 400, body


@pytest.mark.parametrize("parameter", ["version", "wait"])
@pytest.mark.parametrize("text", HOSTILE_NUMBERS + ["nan", "1e1"])
def test_a_long_poll_takes_only_ascii_numbers(jobs_server, parameter, text):
    job = new_job(jobs_server)
    status, _, body = request(jobs_server.address, "GET", f"/jobs/{job['id']}?{parameter}={quoted(text)}")
    assert (status, json.loads(body)["error"]) == (400, "invalid_request"), body


@pytest.mark.parametrize("field", ["Upload-Offset", "Upload-Length"])
def test_two_upload_numbers_are_a_400_not_the_first_one_wins(upload_server, field):
    headers = [("Tus-Resumable", "1.0.0"), ("Upload-Length", "10")]
    if field == "Upload-Length":
        status, _, body = request(upload_server.address, "POST", "/files", [*headers, ("Upload-Length", "20")])
        assert status == 400, body
        return
    status, response_headers, _ = request(upload_server.address, "POST", "/files", headers)
    assert status == 201
    location = response_headers["location"][0]
    try:
        patch_headers = [("Tus-Resumable", "1.0.0"), ("Content-Type", "application/offset+octet-stream"),
                         ("Upload-Offset", "0"), ("Upload-Offset", "5")]
        status, _, body = request(upload_server.address, "PATCH", location, patch_headers, b"hello")
        assert status == 400, body
    finally:
        request(upload_server.address, "DELETE", location, [("Tus-Resumable", "1.0.0")])


@pytest.mark.parametrize("text", [ARABIC_INDIC_THREE, SUPERSCRIPT_TWO, "9" * 5000])
def test_an_upload_length_takes_only_ascii_digits(upload_server, text):
    status, _, _ = request(upload_server.address, "POST", "/files",
                           [("Tus-Resumable", "1.0.0"), ("Upload-Length", text)])
    assert status == 400


# -- 2. JSON nesting ----------------------------------------------------------------------------------------------------

def test_the_one_json_reader_bounds_depth_and_numbers():
    assert read_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    assert read_json(b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == {"a": "[" * 44}  # brackets in a string
    for body in (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), DEEP_JSON, b"[NaN]", b"Infinity",
                 b"1" * 5000, b'{"a": [}', "[\u0663]".encode()):
        with pytest.raises(InvalidJson):
            read_json(body)


def test_a_deep_job_request_is_a_400(jobs_server):
    status, _, body = request(jobs_server.address, "POST", "/jobs", [("Content-Type", "application/json")], DEEP_JSON)
    assert (status, json.loads(body)["error"]) == (400, "invalid_request"), body


def test_a_deep_message_is_a_400(push_server):
    status, _, body = request(push_server.address, "POST", "/topics/t/messages",
                              [("Content-Type", "application/json")], DEEP_JSON)
    assert (status, json.loads(body)["error"]) == (400, "invalid_message"), body


# -- 3. a held request sees its client leave, whatever the client sent -------------------------------------------------

def hold_then_flood_and_leave(address, target: str) -> None:
    """Open a held request, send 100 KB more (past the 64 KiB a held request buffers), then close our side. The
    request must still be held when we leave: a reset here means the server answered it first."""
    sock = socket.create_connection(address, timeout=10)
    try:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        time.sleep(0.3)  # held by now
        sock.sendall(b"x" * 100_000)
        time.sleep(0.3)
        sock.shutdown(socket.SHUT_WR)
    finally:
        sock.close()


def stats(server) -> dict:
    return json_of(request(server.address, "GET", "/stats"))


def test_a_long_poll_whose_client_sent_100_kb_and_left_is_let_go(jobs_server):
    job = new_job(jobs_server)
    assert wait_until(lambda: stats(jobs_server)["held"] == 0, 10)
    hold_then_flood_and_leave(jobs_server.address, f"/jobs/{job['id']}?wait=60&version={job['version']}")
    # before the fix: held until the wait ends (60 s)
    assert wait_until(lambda: stats(jobs_server)["held"] == 0, 5), stats(jobs_server)


def test_an_event_stream_whose_client_sent_100_kb_and_left_is_let_go(push_server):
    assert wait_until(lambda: stats(push_server)["subscribers"] == 0, 10)
    hold_then_flood_and_leave(push_server.address, "/events?topic=flood")
    # before the fix: subscribed until the next ping (15 s)
    assert wait_until(lambda: stats(push_server)["subscribers"] == 0, 5), stats(push_server)


# -- 4. what a client can make the upload server keep ------------------------------------------------------------------

def create(server, length: int):
    return request(server.address, "POST", "/files", [("Tus-Resumable", "1.0.0"), ("Upload-Length", str(length))])


def test_unfinished_uploads_and_their_promised_bytes_are_capped(capped_upload_server):
    upload_server = capped_upload_server
    tus = [("Tus-Resumable", "1.0.0")]
    created = []
    try:
        for _ in range(2):
            status, headers, _ = create(upload_server, 100)
            assert status == 201
            created.append(headers["location"][0])
        status, _, body = create(upload_server, 900)  # 100 + 100 + 900 > 1000 promised
        assert (status, json.loads(body)["error"]) == (413, "too_many_bytes_promised"), body
        status, headers, _ = create(upload_server, 800)
        assert status == 201
        created.append(headers["location"][0])
        status, headers, body = create(upload_server, 1)  # a fourth unfinished upload
        assert (status, json.loads(body)["error"]) == (503, "too_many_uploads"), body
        assert int(headers["retry-after"][0]) > 0 and headers["tus-resumable"] == ["1.0.0"]
        # A finished upload is no longer a promise: its place is free again.
        status, _, _ = request(upload_server.address, "PATCH", created[0],
                               [*tus, ("Content-Type", "application/offset+octet-stream"), ("Upload-Offset", "0")],
                               b"u" * 100)
        assert status == 204
        status, headers, _ = create(upload_server, 100)
        assert status == 201
        created.append(headers["location"][0])
    finally:
        for location in created:
            request(upload_server.address, "DELETE", location, tus)


# -- 5. a burst's threads and fds go back -------------------------------------------------------------------------------

def server_threads_and_fds(server) -> tuple[int, int]:
    pid = server.process.pid
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def test_threads_and_fds_return_to_their_baseline_after_a_burst(http_server):
    raise_open_file_limit(4096)
    request(http_server.address, "GET", "/")
    baseline = server_threads_and_fds(http_server)
    connections = [socket.create_connection(http_server.address, timeout=10) for _ in range(300)]
    try:
        for sock in connections:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        for sock in connections:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        during = server_threads_and_fds(http_server)
    finally:
        for sock in connections:
            sock.close()
    assert during[1] >= baseline[1] + 290  # the burst was real: 300 connections open at once
    # before the fix: on threads, ~300 worker threads and their eventfds stayed for good
    assert wait_until(lambda: server_threads_and_fds(http_server) <= baseline, 15), \
        (baseline, during, server_threads_and_fds(http_server))


# -- also found ---------------------------------------------------------------------------------------------------------

def test_a_request_line_without_a_version_is_a_400_at_once(http_server):
    started = time.monotonic()
    status, _, body = exchange(http_server.address, b"GET /\r\n")
    assert status == 400 and time.monotonic() - started < 2, body  # before the fix: 408 after the 10 s head timeout


@pytest.mark.parametrize("first", [
    b"GET / HTTP/1.1\r\nHost: test\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\nhi",
    b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
], ids=["no-body", "content-length", "chunked"])
def test_a_request_line_without_a_version_pipelined_after_a_request_is_a_400_at_once(http_server, first):
    # in one send, so that the second request line starts inside the read that ends the first request
    started = time.monotonic()
    received = b""
    with socket.create_connection(http_server.address, timeout=5) as sock:
        sock.sendall(first + b"GET /\r\n")
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass  # the server is still waiting: the assertion below says what came
    elapsed = time.monotonic() - started
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]  # the bodies are tiny
    # before the fix: only the 200, then the 408 (or nothing) after the 10 s head timeout
    assert statuses == [200, 400] and elapsed < 2, (elapsed, received)


def test_a_chunk_extension_has_a_bound(http_server):
    head = b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    # 20 KB: past twice the 4 KiB bound, and within one read, so that the server's early answer is not lost to a reset
    status, _, body = exchange(http_server.address, head + b"5;" + b"e" * 20_000 + b"\r\nhello\r\n0\r\n\r\n")
    assert status == 400, body
    status, _, body = exchange(http_server.address, head + b"5;name=value\r\nhello\r\n0\r\n\r\n")
    assert (status, body) == (200, b"hello")


def seconds_until_dropped(address, payload: bytes, limit: float = 30.0) -> float:
    """Send ``payload`` over and over without reading a byte; return the seconds from the moment our sends first
    stopped making progress (the server's writes stalled, so it stopped reading) to the moment the server hangs up
    (once it gives up it drains what we send for its linger time, so our sends move again before the end)."""
    sock = socket.create_connection(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    try:
        started = last_progress = time.monotonic()
        first_stall = None
        while time.monotonic() - started < limit:
            _, writable, _ = select.select([], [sock], [], 0.05)
            now = time.monotonic()
            if first_stall is None and now - last_progress > 0.3:
                first_stall = last_progress
            hung_up = bool(poller.poll(0))
            if writable and not hung_up:
                try:
                    sock.send(payload)
                    last_progress = now
                except OSError:
                    hung_up = True
            if hung_up:
                assert first_stall is not None, "the server hung up before its writes stalled"
                return now - first_stall
        raise AssertionError(f"still connected after {limit} s")
    finally:
        sock.close()


def test_a_client_that_never_reads_is_dropped_after_one_send_timeout(http_server):
    body = b"x" * (1 << 20)
    echo = b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    elapsed = seconds_until_dropped(http_server.address, echo)
    # --send-timeout 2, --linger-timeout 0.5; before the fix blocking and threads took two timeouts (4 s and more)
    assert 1.0 < elapsed < 3.3, elapsed


@pytest.fixture(scope="module")
def binproto_server(backend_name):
    with ServerProcess(EXAMPLES / "binproto_server.py", backend_name, "--send-timeout", "2") as server:
        yield server


def test_a_binproto_client_that_never_reads_is_dropped_after_one_send_timeout(binproto_server):
    from binproto import Frame, Op, encode_frame
    echo = encode_frame(Frame(Op.ECHO, 1, b"x" * ((1 << 20) - 64)))
    elapsed = seconds_until_dropped(binproto_server.address, echo)
    assert 1.0 < elapsed < 3.3, elapsed


def iokit_thread_count() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith("iokit-") and thread.is_alive())


def test_idle_workers_leave_and_no_op_is_lost_to_a_worker_leaving():
    """The pool itself, in this process: 30 ops waiting at once make 30 workers, which leave after the idle timeout
    with their eventfds; then ops submitted right as workers time out all complete (none is queued for a worker
    that is on its way out)."""
    from _helpers import collect

    import iokit
    threads_before, fds_before = iokit_thread_count(), len(os.listdir("/proc/self/fd"))
    backend = iokit.open_backend("threads", worker_idle_timeout=0.05)
    pairs = [socket.socketpair() for _ in range(30)]
    try:
        for a, b in pairs:
            a.setblocking(False)
        ops = [iokit.ops.poll(a.fileno(), select.POLLIN) for a, _ in pairs]
        backend.submit_many(ops)
        assert wait_until(lambda: backend.statistics().extra["workers"] == 30, 5)
        for _, b in pairs:
            b.send(b"x")
        collect(backend, ops)
        assert wait_until(lambda: backend.statistics().extra["workers"] == 0, 5), backend.statistics()
        assert wait_until(lambda: iokit_thread_count() == threads_before, 5)
        for round_number in range(60):
            time.sleep(0.04 + 0.0005 * (round_number % 40))  # around the idle timeout, so workers leave meanwhile
            ready = [iokit.ops.poll(a.fileno(), select.POLLIN) for a, _ in pairs[:3]]
            backend.submit_many(ready)
            collect(backend, ready, timeout=2)
    finally:
        backend.close()
        for a, b in pairs:
            a.close()
            b.close()
    assert wait_until(lambda: iokit_thread_count() == threads_before, 5)
    assert wait_until(lambda: len(os.listdir("/proc/self/fd")) == fds_before, 5)
