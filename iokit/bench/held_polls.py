"""Held long polls: N clients each holding a long poll on ``examples/jobs_server.py`` (a job that will not change for
minutes), and meanwhile one more client short-polling that job.

The row reports the server's resident memory per held request, and the short-poll client's latency next to the same
probe with nobody held: what a long-polling server pays to keep N clients waiting, and whether the others still get
answered quickly. It is the held-request version of ``waiting-clients`` (there, a client waits on a bare echo
connection; here, inside an HTTP request with its parser, routing, cancel scopes and the waiter registry).

A third row has 16 clients short-polling at once and nobody held: the requests/s the server can give short polls
(each a keep-alive connection sending its next poll as soon as the answer comes).

The held clients are plain non-blocking sockets of this process: each connects, sends one request
(``GET /jobs/ID?wait=60&version=V``) and reads nothing. The row waits until the server's ``/stats`` counts all of them
held, so the memory is measured with every request registered. A server that cannot hold them (a thread each, and the
descriptor limit) fails the row with how many it held.

Each row is measured twice: with the in-memory store (one process), and with ``--store redis`` and ``--workers 2``
(``redis_store.py``: the held requests spread over two processes, each woken through Redis; the memory is then that
of both workers, their parent and Redis, and ``redis_cpu_s`` is Redis's share of the short polls). The ``held 0``
rows of the two give the cost of a short poll through Redis (one round trip per poll) against memory, in latency (one
client) and in requests/s (16): the Redis row's ``x_memory`` is its ops/s over the memory row's on the same
backend, and ``x_memory_cpu`` the same ratio from their CPU per op (Redis's included), which load from elsewhere on
the machine does not flatter.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import time

import psutil

from . import redis_store
from .context import BenchRun
from .loadgen import loadgen_or_skip, run_load
from .processes import Server, current_rss_kib, process_tree
from .redis_store import RedisStores, WorkerStats, workers_of
from .results import summarize
from .servers import example_server_specs, sweep

WORKLOAD = "held-long-polls"
EXAMPLE = "jobs_server.py"
HOLD_SECONDS = 60          # the longest wait the server allows: the row ends well within it
SETTLE_S = 0.3
STALL_S = 10               # no more requests held for this long: the server will not hold more
OPEN_BATCH = 500           # held requests opened at once (below the listen backlog of 1024)
SHORT_POLLERS = 16         # the throughput row: this many clients short-polling at once, nobody held
JOB = json.dumps({"duration_ms": 600_000}).encode()   # the longest job: it does not change while a row is measured


def configurations(run: BenchRun) -> list[dict]:
    if not run.wants_workload(WORKLOAD):
        return []
    return [{"held": 0}, {"held": run.settings.idle_clients}, {"held": 0, "connections": SHORT_POLLERS}]


def _server_options(run: BenchRun) -> list[str]:
    count = run.settings.idle_clients
    # Room for every held request, plus the spare connections the server keeps for everyone else (in each worker:
    # the kernel's spreading of connections over them is not even).
    return ["--max-held-requests", str(count + 16), "--max-connections", str(count + 256 + 16)]


def _server_specs(run: BenchRun):
    return example_server_specs(run, EXAMPLE, *_server_options(run))


def planned(run: BenchRun) -> int:
    rows = len(configurations(run)) * len(_server_specs(run))
    return rows + redis_store.planned(rows)


def _rss_kib(server: Server) -> int:
    """The resident memory of the server's processes (with ``--workers``: the workers and their parent)."""
    total = 0
    for pid in process_tree(server.pid):
        try:
            total += current_rss_kib(pid)
        except psutil.NoSuchProcess:
            pass
    return total


def _request(server: Server, method: str, path: str, body: bytes | None = None) -> dict:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:200]!r}")
        return json.loads(payload)
    finally:
        connection.close()


def held_requests(server: Server, workers: int) -> int:
    """The long polls the server holds, all its workers together."""
    stats = WorkerStats(workers)
    for _ in range(redis_store.MAX_STATS_ASKS):
        if stats.add(_request(server, "GET", "/stats")):   # a new connection each: any worker may answer
            return stats.total("held")
    raise RuntimeError(stats.missing())


class HeldPolls:
    """``count`` long polls on ``job_id`` held open by this process until ``close()``."""

    def __init__(self, server: Server, job_id: str, version: int, count: int, workers: int = 1):
        request = (f"GET /jobs/{job_id}?wait={HOLD_SECONDS}&version={version} HTTP/1.1\r\n"
                   f"Host: {server.host}:{server.port}\r\n\r\n").encode()
        self.sockets: list[socket.socket] = []
        start = time.monotonic()
        try:
            # In batches, each held before the next is opened: a burst of 10,000 connects overflows the listen
            # backlog, and a connection whose handshake the kernel dropped may come back only after seconds of
            # retransmission backoff, which would read as a server that stopped holding.
            for first in range(0, count, OPEN_BATCH):
                batch = min(OPEN_BATCH, count - first)
                self._open(server, request, batch)
                self._wait_until_held(server, first, first + batch, workers)
        except BaseException:
            self.close()
            raise
        self.seconds = time.monotonic() - start

    def _open(self, server: Server, request: bytes, count: int) -> None:
        poller = select.poll()
        unsent: dict[int, socket.socket] = {}
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sockets.append(sock)
            sock.setblocking(False)
            sock.connect_ex((server.host, server.port))
            unsent[sock.fileno()] = sock
            poller.register(sock, select.POLLOUT)
        deadline = time.monotonic() + 10 + count / 500
        while unsent:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.sockets) - len(unsent)} of the held requests could be sent")
            for fd, mask in poller.poll(100):
                sock = unsent.pop(fd)
                poller.unregister(fd)
                if mask & (select.POLLERR | select.POLLHUP):
                    raise RuntimeError(f"a held request's connection failed "
                                       f"({sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)})")
                sock.send(request)   # ~100 bytes into an empty send buffer: all of it goes

    @staticmethod
    def _wait_until_held(server: Server, held: int, count: int, workers: int) -> None:
        """Wait until the server holds ``count`` long polls (``held`` of them already were)."""
        progress_at = time.monotonic()
        while True:
            try:
                now_held = held_requests(server, workers)
            except TimeoutError:
                raise RuntimeError(f"the server did not answer GET /stats within 10 s while holding {held} of "
                                   f"{count} long polls") from None
            if now_held >= count:
                return
            if now_held > held:
                held, progress_at = now_held, time.monotonic()
            elif time.monotonic() - progress_at > STALL_S:
                raise RuntimeError(f"the server held only {held} of {count} long polls (no progress for {STALL_S} s)")
            time.sleep(0.02)

    def answers(self, timeout: float) -> list[tuple[int, float]]:
        """Wait, at most ``timeout`` seconds, for the answers to the held requests (for a job that ends); return the
        status and arrival time (``time.time()``) of each answer that came, closing its connection. One epoll
        watches them all and each is timed as it turns readable, so that timing 10,000 answers costs this process
        little and the figure is the server's (an asyncio task each, reading its answer, was found to add most of a
        second to the last one's time)."""
        arrived: list[tuple[int, float]] = []
        waiting = {sock.fileno(): sock for sock in self.sockets}
        with select.epoll(len(waiting) or 1) as poller:
            for fd in waiting:
                poller.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
            deadline = time.monotonic() + timeout
            while waiting and time.monotonic() < deadline:
                for fd, _ in poller.poll(min(0.5, max(0.0, deadline - time.monotonic())), 1024):
                    now = time.time()
                    sock = waiting.pop(fd)
                    poller.unregister(fd)
                    try:
                        head = sock.recv(4096)
                    except OSError:
                        head = b""
                    status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/1.1 ") else b"0"
                    arrived.append((int(status) if status.isdigit() else 0, now))
                    sock.close()
        self.sockets = list(waiting.values())
        return arrived

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


def run(run: BenchRun) -> None:
    if not configurations(run):
        return
    specs = _server_specs(run)
    loadgen = loadgen_or_skip(run, WORKLOAD, specs)
    if loadgen is None:
        return
    stores: RedisStores | None = None

    def measure(server: Server, params: dict):
        count, workers = params["held"], workers_of(params)
        job = _request(server, "POST", "/jobs", JOB)
        rss_before = _rss_kib(server) + _redis_rss_kib(server.name)
        held = HeldPolls(server, job["id"], job["version"], count, workers) if count else None
        try:
            time.sleep(SETTLE_S if count else 0)
            rss_held = _rss_kib(server) + _redis_rss_kib(server.name)
            redis_cpu_before = _redis_cpu_s(server.name)
            samples, figures = run_load(run, loadgen, server, connections=params.get("connections", 1), depth=1,
                                        http_path=f"/jobs/{job['id']}")
            redis_cpu = _redis_cpu_s(server.name)
        finally:
            if held:
                held.close()
        extra = dict(figures, rss_kib=rss_held,
                     rss_per_held_request_kib=round((rss_held - rss_before) / count, 2) if count else None,
                     hold_seconds=round(held.seconds, 2) if held else None)
        pollers = params.get("connections", 1)
        notes = [f"ops, latency and CPU are those of {pollers} short-polling client{'s' if pollers > 1 else ''} beside "
                 f"the held requests"]
        if workers > 1:
            extra["redis_cpu_s"] = round(redis_cpu - redis_cpu_before, 3)
            notes.append("RSS: both workers, their parent and Redis; CPU: the server's processes (Redis's over the "
                         "load, its warm-up included, in redis_cpu_s)")
        if figures.get("errors"):
            notes.append(f"{figures['errors']} errors (connection or non-2xx)")
        result = summarize(WORKLOAD, server.name, params, samples, extra=extra, notes=notes)
        if workers > 1:
            # Redis's CPU is known over the whole load, warm-up included: per op, at the timed runs' rate.
            load_seconds = run.settings.warmup_s + run.settings.runs * run.settings.run_s
            ops = result.ops_per_s * load_seconds
            result.extra["redis_cpu_us_per_op"] = round(extra["redis_cpu_s"] * 1e6 / ops, 1) if ops else None
            result.extra.update(_ratios_to_memory(run, result))
        return result

    def _redis_rss_kib(backend: str) -> int:
        redis = stores.redis.get(backend) if stores else None
        return current_rss_kib(redis.process.pid) if redis is not None else 0

    def _redis_cpu_s(backend: str) -> float:
        return (stores.cpu_s(backend) or 0.0) if stores else 0.0

    sweep(run, WORKLOAD, specs, configurations(run), measure)
    redis_configurations = redis_store.configurations(configurations(run))
    if redis_store.skip_all(run, WORKLOAD, redis_configurations):
        return
    with RedisStores(run, EXAMPLE, *_server_options(run)) as stores:
        sweep(run, WORKLOAD, stores.specs, redis_configurations, measure)


def _ratios_to_memory(run: BenchRun, row) -> dict:
    """A Redis row against the in-memory row with the same params and backend (measured before it): ``x_memory``, its
    ops/s over theirs; ``x_memory_cpu``, their CPU per op over its own plus Redis's, the ops/s ratio a core given to
    each in full would show (on a shared machine a row of three processes, both workers and Redis, gets a larger
    share of a contended core than one of one process, which flatters ``x_memory``)."""
    memory_params = {key: value for key, value in row.params.items() if key not in redis_store.PARAMS}
    for memory in run.report.results:
        if memory.workload == WORKLOAD and memory.backend == row.backend and memory.params == memory_params:
            ratios = {"x_memory": round(row.ops_per_s / memory.ops_per_s, 2) if memory.ops_per_s else None}
            redis_cpu = row.extra.get("redis_cpu_us_per_op") or 0
            cost = None if row.cpu_us_per_op is None else row.cpu_us_per_op + redis_cpu
            ratios["x_memory_cpu"] = round(memory.cpu_us_per_op / cost, 2) if memory.cpu_us_per_op and cost else None
            return ratios
    return {"x_memory": None, "x_memory_cpu": None}
