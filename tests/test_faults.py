"""The conformance checks again, under injected faults, on every backend: what a quiet loopback never shows.

Each test wraps a fresh backend of each kind in ``FaultyBackend`` (``iokit/backends/faults.py``), which makes EAGAIN,
EINTR, one-byte transfers and cancel-versus-completion races frequent (invisible to a correct caller), and resets and
ENOSPC where a test expects failures. The checks: every byte arrives exactly once and in order, errors surface as the
``OSError`` the kernel would give with the partial progress attached, no op completes twice, and at teardown nothing is
left in flight (in the wrapper or the backend it wraps) and no fd, thread or ResourceWarning leaked (``leak_check`` of
conftest.py). The rates are seeded, so a failure replays with the same seed.
"""

from __future__ import annotations

import errno
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading

import h11
import pytest

import iokit
from conftest import LEAK_CHECKED_MODULES, BACKEND_NAMES, require_backend
from example_servers import EXAMPLES, ServerProcess
from _helpers import collect, idle_socketpair
from test_conformance import echo_through_a_connection, receive_exactly, receive_until_eof, tcp_pair
from iokit import TaskGroup, move_on_after, ops, perform, serve, sleep
from iokit.backends.epoll import EpollBackend
from iokit.backends.faults import FaultRates, FaultyBackend, wrap_from_environment

import http_server  # examples/http_server.py (example_servers puts examples/ on the path)

# conftest.py's automatic leak check (fds, iokit threads, ResourceWarning) covers this module too.
LEAK_CHECKED_MODULES.add(__name__.rpartition(".")[2])

# Faults a correct program never notices: the data must come through intact.
INVISIBLE = dict(eagain=0.2, eintr=0.1, short=0.3, cancel_race=0.2)
SEEDS = (1, 2)


@pytest.fixture(params=BACKEND_NAMES)
def inner_name(request) -> str:
    require_backend(request.param)
    return request.param


def check_nothing_in_flight(backend: FaultyBackend, when: str) -> None:
    outer = backend.statistics()
    assert outer.in_flight == 0, f"{outer.in_flight} op(s) in flight {when} in the wrapper: {outer}"
    assert outer.extra["inner"].in_flight == 0, f"attempts in flight {when} in {backend.inner.name}: {outer}"


def run_under_faults(inner_name: str, main, *args, seed: int = 1, **rates):
    """Run ``main(*args)`` on a runtime over ``FaultyBackend(inner_name, seed, **rates)``; return its result and the
    injected-fault counters. Asserts nothing is left in flight before and after ``close()``."""
    backend = FaultyBackend(iokit.open_backend(inner_name), seed=seed, **rates)
    try:
        result = iokit.run(main, *args, backend=backend)
        check_nothing_in_flight(backend, "after run()")
        injected = backend.statistics().extra["injected"]
    finally:
        backend.close()
    check_nothing_in_flight(backend, "after close()")
    return result, injected


# --- the wrapper itself -----------------------------------------------------------------------------------------------

def test_fault_spec_parses_and_refuses_nonsense():
    assert FaultRates.from_spec(" eagain=0.1, short=0.3,seed=7 ,") == FaultRates(seed=7, eagain=0.1, short=0.3)
    for bad in ("eagain", "bogus=0.1", "short=lots", "reset=1.5"):
        with pytest.raises(ValueError):
            FaultRates.from_spec(bad)


def test_wrap_from_environment_only_when_asked():
    plain = EpollBackend()  # not open_backend: with IOKIT_FAULTS set in the environment it would be wrapped already
    try:
        assert wrap_from_environment(plain, {}) is plain
        wrapped = wrap_from_environment(plain, {"IOKIT_FAULTS": "short=0.5,seed=3"})
        assert isinstance(wrapped, FaultyBackend) and wrapped.name == "faulty:epoll"
        assert wrapped.rates == FaultRates(seed=3, short=0.5)
        assert wrap_from_environment(wrapped, {"IOKIT_FAULTS": "eintr=1"}) is wrapped
    finally:
        plain.close()


# --- sockets ----------------------------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
@pytest.mark.parametrize("size", [1, 64 << 10, 1 << 20, 8 << 20], ids=["1B", "64KiB", "1MiB", "8MiB"])
def test_echo_loses_and_duplicates_nothing(inner_name, size):
    data = os.urandom(size)
    echoed, injected = run_under_faults(inner_name, echo_through_a_connection, data, **INVISIBLE)
    assert len(echoed) == size and echoed == data
    if size >= 64 << 10:
        assert injected["short"] and injected["eagain"], injected
    # On the native engine (epoll, uring) a 64 KiB echo is a handful of receives, so a few rolls for the race: from
    # 1 MiB on there are hundreds. The Op path splits every op into attempts and rolls for each.
    if size >= (1 << 20 if inner_name in ("epoll", "uring") else 64 << 10):
        assert injected["cancel_race"], injected


def test_sendall_and_exact_receives_keep_message_boundaries(inner_name):
    """Length-prefixed messages of random sizes: every receive loop must stop exactly at each boundary."""
    sizes = [1, 2, 3, 7, 100, 1500, 4096, 65537, 9, 0, 300_000] * 3
    messages = [os.urandom(size) for size in sizes]

    async def main():
        client, server = await tcp_pair()
        async with client, server:
            async def send():
                for message in messages:
                    await client.sendall(len(message).to_bytes(4, "big") + message)
                await client.shutdown_write()

            received = []
            async with TaskGroup() as group:
                group.spawn(send)
                while header := await receive_exactly(server, 4):
                    received.append(await receive_exactly(server, int.from_bytes(header, "big")))
            return received

    for seed in SEEDS:
        received, _ = run_under_faults(inner_name, main, seed=seed, **INVISIBLE)
        assert received == messages


@pytest.mark.timeout(60)
def test_real_signals_interrupting_every_wait_lose_nothing(inner_name):
    """Real EINTR: SIGUSR1 hits the main thread every millisecond during an echo, so epoll_wait, poll and
    io_uring_enter are interrupted for real, on top of the injected faults."""
    data = os.urandom(1 << 20)
    delivered = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: delivered.append(1))
    stop = threading.Event()
    main_thread = threading.main_thread().ident

    def interrupt():
        while not stop.wait(0.001):
            signal.pthread_kill(main_thread, signal.SIGUSR1)

    interrupter = threading.Thread(target=interrupt, name="signal-sender")
    interrupter.start()
    try:
        # Until the signals have really landed during echoes (a fast backend echoes 1 MiB within a millisecond or
        # two): at least 5, in at most 50 rounds.
        for _ in range(50):
            echoed, _ = run_under_faults(inner_name, echo_through_a_connection, data, **INVISIBLE)
            assert echoed == data
            if len(delivered) >= 5:
                break
    finally:
        stop.set()
        interrupter.join()
        signal.signal(signal.SIGUSR1, previous)
    assert len(delivered) >= 5


def test_resets_fail_their_connection_only(inner_name):
    """With resets injected into the recvs and sends of both ends, each connection either completes or fails with
    the errors a reset gives; what its client got back is always a prefix of what it sent; nothing leaks."""
    connections = 8
    payloads = [os.urandom(200_000) for _ in range(connections)]

    async def one_connection(payload: bytes, outcome: dict):
        client, server = await tcp_pair()
        async with client, server:
            async def echo():
                try:
                    while chunk := await server.receive_some():
                        await server.sendall(chunk)
                    await server.shutdown_write()
                except OSError as error:  # the wrapper shut the socket down both ways, as an RST does
                    outcome["server"] = error.errno

            async def send():
                try:
                    await client.sendall(payload)
                    await client.shutdown_write()
                except OSError as error:
                    outcome["client"] = error.errno

            async with TaskGroup() as group:
                group.spawn(echo)
                group.spawn(send)
                try:
                    outcome["echoed"] = await receive_until_eof(client)
                except OSError as error:
                    outcome["echoed"] = b""
                    outcome["client"] = error.errno

    async def main():
        outcomes = [{} for _ in payloads]
        async with TaskGroup() as group:
            for payload, outcome in zip(payloads, outcomes):
                group.spawn(one_connection, payload, outcome)
        return outcomes

    outcomes, injected = run_under_faults(inner_name, main, seed=5, reset=0.05, short=0.2, eagain=0.1)
    assert injected["reset"] > 0
    failed = 0
    for payload, outcome in zip(payloads, outcomes):
        assert payload.startswith(outcome["echoed"])
        errors = {outcome.get("server"), outcome.get("client")} - {None}
        # After a reset, a later send says EPIPE and a shutdown ENOTCONN, as after a real RST.
        assert errors <= {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN}, outcome
        if errors:
            failed += 1
        else:
            assert outcome["echoed"] == payload
    assert failed > 0


# --- cancel against completion ----------------------------------------------------------------------------------------

def race_cancels_against_arrivals(inner_name: str, seed: int, total: int = 500) -> tuple[bytes, bytes, int, dict]:
    """``total`` rounds of a recv cut short by a deadline of 0 to 1 ms while a sender trickles bytes in, with injected
    cancels racing the completions. Returns (bytes sent, bytes received, rounds, injected counters)."""
    data = bytes(index % 251 for index in range(total))

    async def main():
        client, server = await tcp_pair()
        async with client, server:
            async def trickle():
                for index in range(total):
                    await client.sendall(data[index:index + 1])
                    if index % 4 == 0:
                        await sleep(0.0003)
                await client.shutdown_write()

            received = bytearray()
            timeouts = (0, 0.0001, 0.0003, 0.001)
            rounds = 0
            async with TaskGroup() as group:
                group.spawn(trickle)
                while True:
                    rounds += 1
                    chunk = None
                    with move_on_after(timeouts[rounds % len(timeouts)]):
                        chunk = await server.receive_some(5)
                    if chunk is None:
                        continue
                    if not chunk:
                        break
                    received += chunk
            return bytes(received), rounds

    (received, rounds), injected = run_under_faults(inner_name, main, seed=seed, cancel_race=0.5, short=0.3,
                                                    eintr=0.1)
    return data, received, rounds, injected


@pytest.mark.timeout(60)
def test_cancelled_receives_racing_arrivals_lose_no_byte(inner_name):
    """Every byte arrives exactly once, in order, whichever of cancel and completion wins each of 500 rounds."""
    data, received, rounds, injected = race_cancels_against_arrivals(inner_name, seed=3)
    assert received == data
    assert rounds >= len(data) // 5
    if inner_name in ("epoll", "uring"):
        # Socket ops run on the native engine, whose cancel of a parked receive never reaches the kernel; it injects
        # its own form of the race (a completion met as if a cancel had won: its bytes must be served again).
        assert injected["cancel_race"], injected
    else:
        assert injected["cancel_race_won_by_cancel"] and injected["cancel_race_won_by_completion"], injected


@pytest.mark.parametrize("inner", ["threads", "epoll", "uring"])
def test_backend_api_cancel_races_complete_each_op_once(inner):
    """At the Backend API: 500 times, submit a recv, let a byte arrive, cancel at once (and the wrapper races its own
    cancels in). Each op comes back from wait() exactly once; the bytes the completed recvs report plus those left in
    the socket are exactly the bytes sent. (blocking performs an op inside submit(): there a cancel can only come
    from another thread, which the runtime-level race above covers.)"""
    require_backend(inner)
    reader, writer = idle_socketpair()
    backend = FaultyBackend(iokit.open_backend(inner), seed=11, cancel_race=0.5, short=0.5, eagain=0.3)
    try:
        got = bytearray()
        sent = 0
        for round_number in range(500):
            buffer = bytearray(4)
            op = ops.recv_into(reader.fileno(), buffer)
            backend.submit(op)
            if round_number % 2:
                writer.send(bytes([round_number % 256]))
                sent += 1
            backend.cancel(op)
            returned = collect(backend, [op])
            assert returned.count(op) == 1
            if op.result >= 0:
                got += buffer[:op.result]
            else:
                assert op.result == -errno.ECANCELED
        check_nothing_in_flight(backend, "after the rounds")
        try:
            got += reader.recv(1000)
        except BlockingIOError:
            pass
        assert bytes(got) == bytes(number % 256 for number in range(1, 500, 2)) and len(got) == sent
    finally:
        backend.close()
        reader.close()
        writer.close()
    check_nothing_in_flight(backend, "after close()")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", range(100, 120))
def test_many_seeds_echo_and_cancel_races(inner_name, seed):
    """The long variant: 20 more seeds of the 8 MiB echo and of the cancel race, with every invisible fault."""
    data = os.urandom(8 << 20)
    assert run_under_faults(inner_name, echo_through_a_connection, data, seed=seed, **INVISIBLE)[0] == data
    sent, received, _rounds, _injected = race_cancels_against_arrivals(inner_name, seed)
    assert received == sent


# --- files ------------------------------------------------------------------------------------------------------------

def test_file_round_trip_with_short_writes_and_reads(inner_name, tmp_path):
    data = os.urandom(1 << 20)
    path = tmp_path / "data"

    async def main():
        async with await iokit.open_file(path, os.O_RDWR | os.O_CREAT, 0o600) as file:
            await file.write_all_at(data, 512)
            await file.fdatasync()
            back = bytearray(len(data))
            view = memoryview(back)
            done = 0
            while done < len(data):
                count = await file.read_into_at(view[done:], 512 + done)
                assert count > 0
                done += count
            view.release()
            return bytes(back)

    back, injected = run_under_faults(inner_name, main, seed=4, short=0.5, eintr=0.2, cancel_race=0.3)
    assert back == data
    assert path.read_bytes() == bytes(512) + data
    assert injected["short"] > 0


def test_vectored_writes_stay_in_order_when_short(inner_name, tmp_path):
    pieces = [os.urandom(size) for size in (3, 1, 4096, 70_000, 5)]
    whole = b"".join(pieces)
    path = tmp_path / "vectored"

    async def main():
        async with await iokit.open_file(path, os.O_RDWR | os.O_CREAT, 0o600) as file:
            done = 0
            while done < len(whole):
                # What is left, as a vector: the rest of the piece a short write stopped in, then the later pieces.
                rest, skip = [], done
                for piece in pieces:
                    if skip >= len(piece):
                        skip -= len(piece)
                        continue
                    rest.append(memoryview(piece)[skip:])
                    skip = 0
                done += await perform(ops.writev_at(file.fileno(), rest, done))

    run_under_faults(inner_name, main, seed=6, short=0.6, cancel_race=0.3)
    assert path.read_bytes() == whole


def test_enospc_surfaces_with_bytes_written(inner_name, tmp_path):
    data = os.urandom(256 << 10)
    path = tmp_path / "full"

    async def main():
        async with await iokit.open_file(path, os.O_RDWR | os.O_CREAT, 0o600) as file:
            with pytest.raises(OSError) as failure:
                await file.write_all_at(data, 0)
            return failure.value.errno, failure.value.bytes_written

    code, written = run_under_faults(inner_name, main, seed=8, enospc=0.1, short=0.98)[0]
    assert code == errno.ENOSPC
    assert 0 < written < len(data)
    assert path.read_bytes() == data[:written]  # what it says it wrote, no more, no less


# --- the HTTP example server ------------------------------------------------------------------------------------------

class InProcessHttpServer:
    """``examples/http_server.py``'s app served by ``serve.serve_listener`` on a runtime over a FaultyBackend, in a
    thread of this process (so the test can check the backend's table and counters afterwards)."""

    def __init__(self, inner_name: str, **rates) -> None:
        self._inner_name = inner_name
        self._rates = rates
        self._ready = threading.Event()
        self._stop_reader, self._stop_writer = idle_socketpair()
        self.address: tuple[str, int] = ("", 0)
        self.backend: FaultyBackend | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="faulty-http-server")

    def __enter__(self) -> "InProcessHttpServer":
        self._thread.start()
        assert self._ready.wait(10), f"the server did not start: {self.error!r}"
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop_writer.send(b"x")
        self._thread.join(30)
        self._stop_reader.close()
        self._stop_writer.close()
        assert not self._thread.is_alive(), "the server did not stop"
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            # Created here: a uring ring belongs to the thread that made it (SINGLE_ISSUER).
            self.backend = FaultyBackend(iokit.open_backend(self._inner_name), **self._rates)
            try:
                iokit.run(self._serve, backend=self.backend)
                check_nothing_in_flight(self.backend, "after the server stopped")
            finally:
                self.backend.close()
        except BaseException as error:  # noqa: BLE001 - reported to the test thread
            self.error = error
            self._ready.set()

    async def _serve(self) -> None:
        listener = await iokit.open_tcp_listener("127.0.0.1", 0)
        stop = iokit.Event()

        async def wait_for_stop():
            await perform(ops.recv(self._stop_reader.fileno(), 1))
            stop.set()

        self.address = listener.address
        self._ready.set()
        async with TaskGroup() as group:
            group.spawn(wait_for_stop)
            await serve.serve_listener(listener, http_server.HttpServer(http_server.app), stop, 2.0)


def pipelined_exchange(address, requests: list[h11.Request], body: bytes) -> list[tuple[int, bytes]]:
    """Send ``requests`` back to back on one connection (a POST carries ``body``); return the (status, body) of each
    response, parsed by h11."""
    def message(request: h11.Request) -> list:
        return [request, *([h11.Data(data=body)] if request.method == b"POST" else []), h11.EndOfMessage()]

    wire = b""
    for request in requests:
        writer = h11.Connection(h11.CLIENT)  # h11 sends one request per cycle: one writer per request
        wire += b"".join(writer.send(event) for event in message(request))
    reader = h11.Connection(h11.CLIENT)
    responses = []
    with socket.create_connection(address, timeout=20) as sock:
        sock.sendall(wire)
        for request in requests:
            for event in message(request):
                reader.send(event)  # so that h11 expects this request's response
            status, parts = 0, []
            while not isinstance(event := reader.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    reader.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    parts.append(bytes(event.data))
            responses.append((status, b"".join(parts)))
            reader.start_next_cycle()
    return responses


@pytest.mark.timeout(90)
def test_http_server_answers_correctly_under_faults(inner_name):
    body = os.urandom(300_000)
    with InProcessHttpServer(inner_name, seed=9, **INVISIBLE) as server:
        host, port = server.address
        # Keep-alive, several requests per connection (http.client).
        connection = http.client.HTTPConnection(host, port, timeout=20)
        try:
            for _ in range(5):
                connection.request("GET", "/")
                response = connection.getresponse()
                assert (response.status, response.read()) == (200, http_server.GREETING)
                connection.request("POST", "/echo", body=body, headers={"Content-Type": "application/x-test"})
                response = connection.getresponse()
                assert response.status == 200 and response.getheader("Content-Type") == "application/x-test"
                assert response.read() == body
                connection.request("GET", "/delay?ms=bad")
                response = connection.getresponse()
                assert response.status == 400 and b"error" in response.read()
        finally:
            connection.close()
        # Chunked upload, then pipelining, parsed by h11.
        connection = http.client.HTTPConnection(host, port, timeout=20)
        try:
            connection.request("POST", "/echo", body=iter([body[:1000], body[1000:5000], b"", body[5000:]]),
                               encode_chunked=True)
            response = connection.getresponse()
            assert response.status == 200 and response.read() == body
        finally:
            connection.close()
        requests = [h11.Request(method="GET", target="/", headers=[("Host", "x")]),
                    h11.Request(method="POST", target="/echo", headers=[("Host", "x"), ("Content-Length", "7000")]),
                    h11.Request(method="GET", target="/delay?ms=1", headers=[("Host", "x")])]
        statuses = pipelined_exchange(server.address, requests, body[:7000])
        assert statuses == [(200, http_server.GREETING), (200, body[:7000]), (200, b'{"delayed_ms":1}\n')]
        # curl, an outside client.
        done = subprocess.run(["curl", "-sS", "--max-time", "20", "--data-binary", "@-", "-H",
                               "Content-Type: application/octet-stream", f"http://{host}:{port}/echo"],
                              input=body[:100_000], capture_output=True, timeout=30)
        assert done.returncode == 0 and done.stdout == body[:100_000], done.stderr
    injected = server.backend.statistics().extra["injected"]
    assert injected["short"] and injected["eagain"], injected


SIGTERM_WITH_AN_ACCEPT_IN_FLIGHT = """
import os, signal, threading, iokit

async def main():
    stop = iokit.signal_event(signal.SIGTERM)
    async with await iokit.open_tcp_listener("127.0.0.1", 0) as listener:
        async with iokit.TaskGroup() as group:
            group.spawn(listener.accept)
            await stop.wait()
            group.cancel_scope.cancel()

threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
iokit.run(main, backend="uring")
"""


def test_sigterm_reaches_a_uring_runtime_waiting_on_a_fresh_accept():
    """Found while putting the example servers under faults: an idle uring example server often ignores SIGTERM."""
    require_backend("uring")
    child = subprocess.Popen([sys.executable, "-c", SIGTERM_WITH_AN_ACCEPT_IN_FLIGHT], stderr=subprocess.PIPE)
    try:
        assert child.wait(5) == 0
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise AssertionError("SIGTERM did not stop the runtime within 5 s") from None
    finally:
        child.stderr.close()


def _open_backend_reads_the_fault_variable() -> bool:
    previous = os.environ.get("IOKIT_FAULTS")
    os.environ["IOKIT_FAULTS"] = "seed=1"
    try:
        backend = iokit.open_backend("blocking")
        backend.close()
        return isinstance(backend, FaultyBackend)
    finally:
        if previous is None:
            del os.environ["IOKIT_FAULTS"]
        else:
            os.environ["IOKIT_FAULTS"] = previous


@pytest.mark.skipif(not _open_backend_reads_the_fault_variable(),
                    reason="open_backend does not read IOKIT_FAULTS yet (iokit/backends/__init__.py needs the "
                           "wrap_from_environment hook), so a server process cannot be put under faults")
def test_http_server_process_under_faults(inner_name):
    body = os.urandom(200_000)
    with ServerProcess(EXAMPLES / "http_server.py", "auto",
                       env={"IOKIT_BACKEND": inner_name, "IOKIT_FAULTS": "seed=2,eagain=0.2,eintr=0.1,short=0.3,"
                                                                          "cancel_race=0.2"}) as server:
        assert server.listening_line.endswith(f"backend=faulty:{inner_name}")
        for _ in range(3):
            done = subprocess.run(["curl", "-sS", "--max-time", "20", "--data-binary", "@-",
                                   f"{server.url}/echo"], input=body, capture_output=True, timeout=30)
            assert done.returncode == 0 and done.stdout == body, done.stderr
            done = subprocess.run(["curl", "-sS", "--max-time", "20", f"{server.url}/"], capture_output=True,
                                  timeout=30)
            assert done.stdout == http_server.GREETING
