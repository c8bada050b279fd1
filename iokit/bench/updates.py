"""Telling N waiting clients about updates: short polling vs long polling vs push, swept over the number of clients.

One row = one pattern (``mode``), one client count, one backend. The same schedule for the three: ``rate`` updates per
second, all clients together, for ``updates_seconds`` (the *window*); update k belongs to client k mod N. The rate is
the same for every client count and well below one per client per poll interval (8/s: one update every 4 s for each
of 32 clients, every 125 s for each of 1,000), so the sweep shows what each pattern pays to keep N clients *waiting*
for rare news: how its requests/s, bytes/s and server CPU grow with N while the updates do not.

* ``push`` (``examples/push_server.py``): client i holds a Server-Sent Events stream on topic ``c<i>``; an uncounted
  producer posts each update to its topic at its time, carrying that time; latency = arrival - that time.
* ``long`` and ``short`` (``examples/jobs_server.py``): an uncounted producer creates, before the window, one job per
  update whose duration makes it end at the update's time (the server's own timer), and one *idle* job that outlives
  the window. Client i watches its jobs in order, then the idle job (a client always watches something):
  * ``long``: one held long poll at a time (``?wait=30&version=V``, answered when the job changes); the first is sent
    before the window, and a client sends its next poll once an update arrives: one request per update. The window is
    shorter than the 30 s wait, so no held poll runs out in it (with a window longer than 30 s, add N/30 requests/s).
  * ``short``: a conditional poll (``If-None-Match`` with the version it has: ``304``, no body, until the job changes),
    then a sleep of the answer's ``Retry-After`` (1 s), the clients' first polls spread evenly over the first second;
    the best a short-polling client can do.
  Latency = when the client sees the job ended - the job's end time (measured from just before its POST: a few tens of
  microseconds early).

What a row reports, over the window (from its start until it has ended and every update has been delivered): updates
delivered per second (ops/s), the update-to-client latency (p50/p99), the server's CPU (``cpu_s``; ``cpu_us_per_op``
is server CPU per delivered update), and in ``extra`` the watching clients' requests/s and bytes/s (requests and
responses, counted at their sockets), per update too, what the server held (``/stats`` in the middle of the window:
held long polls, or subscribers), the setup's own requests (subscriptions, first long polls) and the clients' CPU
(the harness process). The producer's traffic is not counted: it is the same for the three patterns.

The clients are asyncio tasks in the harness process, on the load core, talking to 127.0.0.1 only. Every loop is
bounded in count (connections, polls per update, lines per event) and the whole row in time (``row_timeout``).
``blocking`` and ``threads`` serve each connection with a thread (a pool worker), each with its own eventfd: two
descriptors per client, so they run the client counts that fit the descriptor limit, and the others are skipped
with that reason (10,000 clients need 20,000+ descriptors; RLIMIT_NOFILE is 20,000 here).

Every row is measured twice: in memory (one process), then with ``--store redis`` and ``--workers 2``
(``redis_store.py``: each backend's servers on a Redis of their own, pinned to the measured core). Then a long poll
is woken through Redis's pub/sub, a short poll is one Redis round trip, and an event goes through a Redis stream to
each worker's reader; the held requests and subscribers are those of both workers, and ``redis_cpu_s`` is Redis's CPU
over the window, beside the server's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import resource
import time
from typing import Callable

from . import redis_store
from .context import BenchRun
from .processes import Server, Usage, reset_peak_rss
from .redis_store import RedisStores, WorkerStats, workers_of
from .results import Result, RunSample, percentile, summarize
from .servers import HOST, example_server_specs, sweep

WORKLOAD = "updates"
JOBS_EXAMPLE, PUSH_EXAMPLE = "jobs_server.py", "push_server.py"
MODES = ("short", "long", "push")
TERMINAL = ("succeeded", "failed", "canceled")
POLL_INTERVAL_S = 1.0        # the jobs server's Retry-After: the short-poll interval
LONG_WAIT_S = 30             # what a long poll asks to be held for
CONNECT_BATCH = 500          # connections opened at once (below the listen backlog of 1024)
SPARE_CONNECTIONS = 256      # the servers' room beyond the clients (the producer, /stats, stragglers)
THREAD_BACKENDS = ("blocking", "threads")   # a thread (or pool worker) and its eventfd per connection
DESCRIPTORS_PER_CLIENT = 2
MAX_LINES_PER_EVENT = 64     # SSE lines read for one event (ids, data, chunk framing, pings) before giving up
MAX_POLLS_PER_UPDATE = 8     # long polls for one job: created running, one change (ended); the rest is margin
SETTLE_TIMEOUT_S = 10.0      # for /stats to count every client held or subscribed
IDLE_JOB_EXTRA_S = 120       # the idle job ends this long after the window (never within it; at most 600 s)
# The jobs server's defaults cap running and queued jobs; the schedule creates every job up front.
JOBS_SERVER_OPTIONS = ["--max-running-jobs", "1000000", "--max-queued-jobs", "1000000"]


@dataclasses.dataclass
class Traffic:
    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_sent + self.bytes_received

    def __sub__(self, earlier: "Traffic") -> "Traffic":
        return Traffic(self.requests - earlier.requests, self.bytes_sent - earlier.bytes_sent,
                       self.bytes_received - earlier.bytes_received)


@dataclasses.dataclass
class Outcome:
    """What one row's clients saw: the latencies, and the window's length, traffic and server usage."""

    latencies: list[float]
    seconds: float                 # from the window's start until it ended and every update was delivered
    window: Traffic                # the watching clients' traffic in that time
    setup: Traffic                 # theirs before it (connecting, subscribing, the first long polls)
    usage: Usage | None            # the server's over the window, when a measure was given
    held: int | None               # /stats in the middle of the window: held long polls (jobs) or subscribers (push)
    client_cpu_s: float            # this process's CPU over the window (the clients' side)
    store_cpu_s: float | None = None   # Redis's over the window, for the --store redis rows


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 that counts what crosses it (Content-Length framing only)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, traffic: Traffic, host: str):
        self.reader, self.writer, self.traffic, self.host = reader, writer, traffic, host

    @classmethod
    async def open(cls, host: str, port: int, traffic: Traffic) -> "HttpConnection":
        if host != HOST:
            raise RuntimeError(f"the updates clients talk to {HOST} only, not {host}")
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer, traffic, f"{host}:{port}")

    async def send(self, method: str, target: str, body: bytes = b"", headers: str = "") -> None:
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.host}\r\n{headers}"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        data = head.encode() + b"\r\n" + body
        self.writer.write(data)
        self.traffic.requests += 1
        self.traffic.bytes_sent += len(data)
        await self.writer.drain()

    async def read_head(self) -> tuple[int, dict[str, str]]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        self.traffic.bytes_received += len(head)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    async def receive(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = await self.read_head()
        content = await self.reader.readexactly(int(headers.get("content-length", 0)))
        self.traffic.bytes_received += len(content)
        return status, headers, content

    async def request(self, method: str, target: str, body: bytes = b"",
                      headers: str = "") -> tuple[int, dict[str, str], bytes]:
        await self.send(method, target, body, headers)
        return await self.receive()

    async def next_line(self, prefix: bytes) -> bytes:
        """The next line of a Server-Sent Events stream that starts with ``prefix`` (the others are counted and
        skipped: ids, chunk framing, comments), within ``MAX_LINES_PER_EVENT`` lines."""
        for _ in range(MAX_LINES_PER_EVENT):
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("the event stream ended")
            self.traffic.bytes_received += len(line)
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"no {prefix!r} line within {MAX_LINES_PER_EVENT} lines of the event stream")

    async def next_event_data(self) -> dict:
        """The JSON ``data:`` of the next event of a Server-Sent Events stream."""
        return json.loads((await self.next_line(b"data:"))[5:])

    def close(self) -> None:
        self.writer.close()


def schedule(clients: int, rate: float, seconds: float, start: float) -> list[list[float]]:
    """Each client's update times (update k at start + k/rate belongs to client k mod clients)."""
    times: list[list[float]] = [[] for _ in range(clients)]
    for k in range(int(rate * seconds)):
        times[k % clients].append(start + k / rate)
    return times


def setup_allowance(clients: int, rate: float, seconds: float) -> float:
    """Seconds between the clients being connected and the window's start: jobs to create (2 ms each) and first long
    polls or subscriptions to be held (1 ms each, in batches)."""
    return 0.5 + rate * seconds * 0.002 + clients * 0.001


def row_timeout(clients: int, rate: float, seconds: float) -> float:
    """The longest a row may take, connecting included (every wait below is also bounded on its own)."""
    return 30 + clients * 0.004 + setup_allowance(clients, rate, seconds) + seconds


async def _open_all(count: int, open_one: Callable[[int], "asyncio.Future"]) -> list:
    """``open_one(i)`` for i in range(count), ``CONNECT_BATCH`` at a time, each batch within 10 s + 2 ms a client."""
    opened: list = []
    try:
        for first in range(0, count, CONNECT_BATCH):
            batch = range(first, min(count, first + CONNECT_BATCH))
            results = await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in batch), return_exceptions=True),
                                             10 + 0.002 * len(batch))
            opened.extend(r for r in results if isinstance(r, HttpConnection))
            failed = [r for r in results if not isinstance(r, HttpConnection)]
            if failed:
                raise RuntimeError(f"{len(failed)} of clients {first}..{batch[-1]} could not connect: {failed[0]!r}")
    except BaseException:
        for connection in opened:
            connection.close()
        raise
    return opened


async def _stats(connection: HttpConnection) -> dict:
    status, _, content = await asyncio.wait_for(connection.request("GET", "/stats"), 10)
    if status != 200:
        raise RuntimeError(f"GET /stats answered {status}")
    return json.loads(content)


class StatsReader:
    """The server's ``/stats`` counts, all its workers together: on the observer's connection with one worker; with
    several, each answering for itself, on new connections until every one has answered (``redis_store``)."""

    def __init__(self, observer: HttpConnection, host: str, port: int, workers: int):
        self.observer, self.host, self.port, self.workers = observer, host, port, workers

    async def count(self, field: str) -> int:
        if self.workers == 1:
            return (await _stats(self.observer)).get(field, 0)
        stats = WorkerStats(self.workers)
        for _ in range(redis_store.MAX_STATS_ASKS):
            connection = await HttpConnection.open(self.host, self.port, Traffic())   # not the watchers' cost
            try:
                if stats.add(await _stats(connection)):
                    return stats.total(field)
            finally:
                connection.close()
        raise RuntimeError(stats.missing())


async def _until_counted(stats: StatsReader, field: str, count: int) -> None:
    """Wait (bounded) until the server's ``/stats`` counts ``count`` in ``field``."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S + count * 0.001
    seen = 0
    while time.monotonic() < deadline:
        seen = await stats.count(field)
        if seen >= count:
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"the server counted {seen} of {count} {field} before the window")


class _Window:
    """The window's start and end, and what is measured across it."""

    def __init__(self, start: float, seconds: float, rate: float, traffic: Traffic,
                 measure: Callable[[], Usage] | None, stats: StatsReader, held_field: str,
                 store_cpu: Callable[[], float] | None = None):
        self.loop = asyncio.get_running_loop()
        self.start, self.end = start, start + seconds
        # /stats is read halfway between two updates near the middle, not as one is being delivered.
        self.sample_at = start + (int(rate * seconds / 2) + 0.5) / rate if rate * seconds >= 1 else start + seconds / 2
        self.traffic, self.measure, self.stats, self.held_field = traffic, measure, stats, held_field
        self.store_cpu = store_cpu
        self.held: int | None = None

    async def open(self) -> None:
        now = self.loop.time()
        if now > self.start - 0.02:
            raise RuntimeError(f"the setup overran the window's start by {now - self.start + 0.02:.2f} s")
        await asyncio.sleep(self.start - 0.02 - now)
        self.usage0 = self.measure() if self.measure else None
        self.store_cpu0 = self.store_cpu() if self.store_cpu else None
        self.traffic0 = dataclasses.replace(self.traffic)
        self.cpu0 = time.process_time()
        await asyncio.sleep(max(0.0, self.start - self.loop.time()))

    async def sample_held(self) -> None:
        await asyncio.sleep(max(0.0, self.sample_at - self.loop.time()))
        self.held = await self.stats.count(self.held_field)

    async def close(self, latencies: list[float], setup: Traffic) -> Outcome:
        await asyncio.sleep(max(0.0, self.end - self.loop.time()))
        seconds = self.loop.time() - self.start
        usage = self.measure() - self.usage0 if self.measure else None
        store_cpu_s = self.store_cpu() - self.store_cpu0 if self.store_cpu else None
        return Outcome(latencies, seconds, self.traffic - self.traffic0, setup, usage, self.held,
                       time.process_time() - self.cpu0, store_cpu_s)


async def _push(host: str, port: int, clients: int, rate: float, seconds: float, traffic: Traffic,
                measure: Callable[[], Usage] | None = None, workers: int = 1,
                store_cpu: Callable[[], float] | None = None) -> Outcome:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []

    async def subscribe(i: int) -> HttpConnection:
        connection = await HttpConnection.open(host, port, traffic)
        await connection.send("GET", f"/events?topic=c{i}")
        status, _ = await connection.read_head()
        if status != 200:
            raise RuntimeError(f"subscribe answered {status}")
        await connection.next_line(b"retry:")   # the stream's first line: sent once the subscriber is registered
        return connection

    observer = await HttpConnection.open(host, port, Traffic())    # /stats and the producer: not the watchers' cost
    producer = await HttpConnection.open(host, port, Traffic())
    subscribers = await _open_all(clients, subscribe)
    try:
        stats = StatsReader(observer, host, port, workers)
        await _until_counted(stats, "subscribers", clients)
        setup = dataclasses.replace(traffic)
        window = _Window(loop.time() + 0.3 + rate * seconds * 0.001, seconds, rate, traffic, measure, stats,
                         "subscribers", store_cpu)
        times = schedule(clients, rate, seconds, window.start)

        async def follow(connection: HttpConnection, count: int) -> None:
            for _ in range(count):
                data = await connection.next_event_data()
                latencies.append(loop.time() - data["t"])

        async def produce() -> None:
            for when, owner in sorted((t, i) for i, client_times in enumerate(times) for t in client_times):
                await asyncio.sleep(max(0.0, when - loop.time()))
                status, _, _ = await producer.request("POST", f"/topics/c{owner}/messages",
                                                      json.dumps({"t": when}).encode())
                if status != 202:
                    raise RuntimeError(f"publish answered {status}")

        await window.open()
        await asyncio.gather(produce(), window.sample_held(),
                             *(follow(c, len(t)) for c, t in zip(subscribers, times)))
        return await window.close(latencies, setup)
    finally:
        for connection in (*subscribers, observer, producer):
            connection.close()


async def _create_jobs(producer: HttpConnection, times: list[list[float]],
                       idle_until: float) -> tuple[list[list[tuple[str, int, float]]], tuple[str, int, float]]:
    """One job per update, ending at its time, and the idle job: (id, version, end time) each."""
    loop = asyncio.get_running_loop()

    async def create(when: float) -> tuple[str, int, float]:
        created = loop.time()
        body = json.dumps({"duration_ms": max(0, round((when - created) * 1000))}).encode()
        status, _, content = await producer.request("POST", "/jobs", body)
        if status != 202:
            raise RuntimeError(f"POST /jobs answered {status}: {content[:200]!r}")
        monitor = json.loads(content)
        return monitor["id"], monitor["version"], max(when, created)

    jobs = [[await create(when) for when in client_times] for client_times in times]
    return jobs, await create(idle_until)


async def _poll(host: str, port: int, clients: int, rate: float, seconds: float, traffic: Traffic,
                long_poll: bool, measure: Callable[[], Usage] | None = None, workers: int = 1,
                store_cpu: Callable[[], float] | None = None) -> Outcome:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []

    def target(job: tuple[str, int, float], version: int) -> str:
        return f"/jobs/{job[0]}?wait={LONG_WAIT_S}&version={version}" if long_poll else f"/jobs/{job[0]}"

    async def connect(_: int) -> HttpConnection:
        return await HttpConnection.open(host, port, traffic)

    observer = await HttpConnection.open(host, port, Traffic())    # /stats and the producer: not the watchers' cost
    connections = await _open_all(clients, connect)
    stats = StatsReader(observer, host, port, workers)
    try:
        window = _Window(loop.time() + setup_allowance(clients, rate, seconds), seconds, rate, traffic, measure,
                         stats, "held", store_cpu)
        times = schedule(clients, rate, seconds, window.start)
        jobs, idle = await _create_jobs(observer, times, window.end + IDLE_JOB_EXTRA_S)
        watched = [[*client_jobs, idle] for client_jobs in jobs]    # a client always watches something
        if long_poll:
            for first in range(0, clients, CONNECT_BATCH):
                await asyncio.gather(*(connections[i].send("GET", target(watched[i][0], watched[i][0][1]))
                                       for i in range(first, min(clients, first + CONNECT_BATCH))))
            await _until_counted(stats, "held", clients)
        setup = dataclasses.replace(traffic)

        async def follow_long(connection: HttpConnection, client_jobs: list[tuple[str, int, float]]) -> None:
            # The poll for client_jobs[0] was sent before the window; the idle job's (last) is sent, never read.
            for index, job in enumerate(client_jobs[:-1]):
                for _ in range(MAX_POLLS_PER_UPDATE):
                    status, _, content = await connection.receive()
                    if status != 200:
                        raise RuntimeError(f"long poll answered {status}: {content[:200]!r}")
                    monitor = json.loads(content)
                    if monitor["status"] in TERMINAL:
                        latencies.append(loop.time() - job[2])
                        break
                    await connection.send("GET", target(job, monitor["version"]))
                else:
                    raise RuntimeError(f"job {job[0]} did not end within {MAX_POLLS_PER_UPDATE} long polls")
                following = client_jobs[index + 1]
                await connection.send("GET", target(following, following[1]))

        async def follow_short(i: int, connection: HttpConnection, client_jobs: list[tuple[str, int, float]]) -> None:
            await asyncio.sleep(max(0.0, window.start + i * POLL_INTERVAL_S / clients - loop.time()))
            index, version = 0, client_jobs[0][1]
            polls = math.ceil((seconds + 2 * POLL_INTERVAL_S + 5) / POLL_INTERVAL_S) + len(client_jobs)
            for _ in range(polls):
                waiting_for_update = index < len(client_jobs) - 1
                if loop.time() >= window.end and not waiting_for_update:
                    return
                job = client_jobs[index]
                status, headers, content = await connection.request("GET", target(job, version),
                                                                    headers=f'If-None-Match: "{version}"\r\n')
                if status == 200:
                    monitor = json.loads(content)
                    if monitor["status"] in TERMINAL:
                        latencies.append(loop.time() - job[2])
                        index += 1
                        version = client_jobs[index][1]
                    else:
                        version = monitor["version"]
                elif status != 304:
                    raise RuntimeError(f"short poll answered {status}: {content[:200]!r}")
                await asyncio.sleep(float(headers.get("retry-after", POLL_INTERVAL_S)))
            raise RuntimeError(f"a short-polling client did not see its updates within {polls} polls")

        await window.open()
        if long_poll:
            followers = (follow_long(c, j) for c, j in zip(connections, watched))
        else:
            followers = (follow_short(i, c, j) for i, (c, j) in enumerate(zip(connections, watched)))
        await asyncio.gather(window.sample_held(), *followers)
        return await window.close(latencies, setup)
    finally:
        for connection in (*connections, observer):
            connection.close()


def descriptor_limit() -> int:
    """The descriptors a server may open (the hard RLIMIT_NOFILE: the servers raise their soft limit to it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if hard == resource.RLIM_INFINITY else hard


def too_many_clients(backend: str, clients: int) -> str | None:
    """Why ``backend`` cannot serve ``clients`` waiting clients here, or None if it can."""
    if backend not in THREAD_BACKENDS:
        return None
    needed, limit = DESCRIPTORS_PER_CLIENT * clients + SPARE_CONNECTIONS, descriptor_limit()
    if needed <= limit:
        return None
    return (f"{clients} clients need {needed} descriptors on {backend} (a thread per connection, each with its own "
            f"eventfd: {DESCRIPTORS_PER_CLIENT} per client), over RLIMIT_NOFILE {limit}; the loop backends run this "
            f"row")


def configurations(run: BenchRun, clients: int, modes: tuple[str, ...]) -> list[dict]:
    if not run.wants_workload(WORKLOAD):
        return []
    return [{"mode": mode, "clients": clients, "rate": run.settings.update_rate} for mode in modes]


def _server_options(clients: int, example: str) -> list[str]:
    room = ["--max-connections", str(clients + SPARE_CONNECTIONS), "--idle-timeout", "120"]
    if example == JOBS_EXAMPLE:
        return [*JOBS_SERVER_OPTIONS, *room, "--max-held-requests", str(clients + 16)]
    return [*room, "--max-subscribers", str(clients + 16)]


def _fits(specs: list, clients: int) -> list:
    return [spec for spec in specs if too_many_clients(spec.name, clients) is None]


def _specs(run: BenchRun, clients: int, example: str) -> list:
    return _fits(example_server_specs(run, example, *_server_options(clients, example)), clients)


def planned(run: BenchRun) -> int:
    rows = sum(len(configurations(run, clients, ("short", "long"))) * len(_specs(run, clients, JOBS_EXAMPLE))
               + len(configurations(run, clients, ("push",))) * len(_specs(run, clients, PUSH_EXAMPLE))
               for clients in run.settings.update_clients)
    return rows + redis_store.planned(rows)


def summarize_outcome(backend: str, params: dict, outcome: Outcome, seconds: float) -> Result:
    latencies_us = sorted(max(0.0, value) * 1e6 for value in outcome.latencies)
    delivered = len(outcome.latencies)
    sample = RunSample(delivered, outcome.seconds, percentile(latencies_us, 50), percentile(latencies_us, 99),
                       outcome.usage)
    per_update = max(delivered, 1)
    window = outcome.window
    cpu_s = outcome.usage.cpu_s if outcome.usage else None
    client_interval = params["clients"] / params["rate"] if params["rate"] else None
    notes = []
    if client_interval is not None and client_interval <= POLL_INTERVAL_S:
        notes.append(f"each client gets an update every {client_interval:g} s: not rarer than the "
                     f"{POLL_INTERVAL_S:g} s poll interval")
    extra = {
        "requests_per_s": round(window.requests / outcome.seconds, 1),
        "bytes_per_s": round(window.bytes / outcome.seconds),
        "requests_per_event": round(window.requests / per_update, 2),
        "bytes_per_event": round(window.bytes / per_update),
        "server_cpu_us_per_update": None if cpu_s is None or not delivered else round(cpu_s * 1e6 / delivered),
        "server_cpu_share": None if cpu_s is None else round(cpu_s / outcome.seconds, 3),
        "held": outcome.held, "updates": delivered, "expected_updates": int(params["rate"] * seconds),
        "requests": window.requests, "bytes": window.bytes, "window_seconds": round(outcome.seconds, 3),
        "setup_requests": outcome.setup.requests, "setup_bytes": outcome.setup.bytes,
        "client_cpu_share": round(outcome.client_cpu_s / outcome.seconds, 3),
        "seconds_between_updates_per_client": client_interval, "poll_interval_s": POLL_INTERVAL_S,
        "seconds": seconds,
    }
    if outcome.store_cpu_s is not None:
        extra["redis_cpu_s"] = round(outcome.store_cpu_s, 3)
        extra["redis_cpu_us_per_update"] = round(outcome.store_cpu_s * 1e6 / delivered) if delivered else None
        notes.append("CPU: the server's processes (both workers and their parent); Redis's in redis_cpu_s")
    if delivered < extra["expected_updates"]:
        notes.append(f"error: {extra['expected_updates'] - delivered} updates not delivered")
    return summarize(WORKLOAD, backend, params, [sample], notes=notes, extra=extra)


def scenario(mode: str, host: str, port: int, clients: int, rate: float, seconds: float, traffic: Traffic,
             measure: Callable[[], Usage] | None = None, workers: int = 1,
             store_cpu: Callable[[], float] | None = None):
    if mode == "push":
        return _push(host, port, clients, rate, seconds, traffic, measure, workers, store_cpu)
    return _poll(host, port, clients, rate, seconds, traffic, mode == "long", measure, workers, store_cpu)


def run(run: BenchRun) -> None:
    seconds = run.settings.updates_seconds

    stores: RedisStores | None = None

    def measure(server: Server, params: dict):
        clients, rate = params["clients"], params["rate"]
        store_cpu = functools.partial(stores.cpu_s, server.name) if workers_of(params) > 1 else None
        coroutine = scenario(params["mode"], server.host, server.port, clients, rate, seconds, Traffic(),
                             server.measure, workers_of(params), store_cpu)
        reset_peak_rss(server.pid)   # the row's own peak (its setup and window), not the server's since it started
        try:
            outcome = asyncio.run(asyncio.wait_for(coroutine, row_timeout(clients, rate, seconds)))
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from None
        return summarize_outcome(server.name, params, outcome, seconds)

    for clients in run.settings.update_clients:
        for backend in run.backends:
            reason = too_many_clients(backend, clients)
            if reason:
                for params in configurations(run, clients, MODES):
                    run.skip(WORKLOAD, backend, reason, params)
        sweep(run, WORKLOAD, _specs(run, clients, JOBS_EXAMPLE), configurations(run, clients, ("short", "long")),
              measure)
        sweep(run, WORKLOAD, _specs(run, clients, PUSH_EXAMPLE), configurations(run, clients, ("push",)), measure)
    # The same rows with --store redis and 2 workers, after all the in-memory ones.
    redis_rows = [(clients, example, redis_store.configurations(configurations(run, clients, modes)))
                  for clients in run.settings.update_clients
                  for example, modes in ((JOBS_EXAMPLE, ("short", "long")), (PUSH_EXAMPLE, ("push",)))]
    if redis_store.skip_all(run, WORKLOAD, [params for _, _, rows in redis_rows for params in rows]):
        return
    for clients, example, rows in redis_rows:
        for backend in run.backends:
            reason = too_many_clients(backend, clients)   # kept for 2 workers: the kernel does not split them evenly
            for params in rows if reason else ():
                run.skip(WORKLOAD, backend, reason, params)
        with RedisStores(run, example, *_server_options(clients, example)) as stores:
            sweep(run, WORKLOAD, _fits(stores.specs, clients), rows, measure)
