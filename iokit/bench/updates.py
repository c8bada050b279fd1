"""Telling N waiting clients about updates produced at a fixed rate: short polling vs long polling vs push.

The same schedule for the three: RATE events per second for SECONDS, event k belonging to client k mod N.

* ``push`` (``examples/push_server.py``): client i holds a Server-Sent Events stream on topic ``c<i>``; a producer posts
  each event to its topic at its time, carrying that time; latency = arrival - that time.
* ``long`` and ``short`` (``examples/jobs_server.py``): the producer creates, before the run, one job per event whose
  duration makes it end at the event's time (the server's own timer); client i follows its jobs in order, by long polls
  (``?wait=30&version=V``, answered when the job changes) or by short polls every ``Retry-After`` (1 s); latency =
  when the client sees the job ended - the job's end time (measured from just before its POST: a few tens of
  microseconds early).

Reported per configuration: events delivered per second (ops/s), the event-to-client latency (p50/p99), and in the
table requests and bytes on the wire per event, counted at the watching clients' sockets (requests and responses).
The producer's traffic (its POSTs, the same for the three patterns) is not counted: with it, push showed 1.5
requests per update, of which only the subscription was the pattern's. Short polling pays in requests and in latency (half the poll interval on average), long polling in held
requests, push in held streams. One timed run per configuration (polling needs whole seconds): ``updates_seconds``.
The clients are asyncio tasks in the harness process, on the load core.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from .context import BenchRun
from .processes import Server
from .results import RunSample, percentile, summarize
from .servers import example_server_specs, sweep

WORKLOAD = "updates"
JOBS_EXAMPLE, PUSH_EXAMPLE = "jobs_server.py", "push_server.py"
TERMINAL = ("succeeded", "failed", "canceled")
SETUP_S = 0.3            # head start between creating the schedule and its first event (plus 1 ms per event)
# The jobs server's defaults cap running and queued jobs; the schedule creates every job up front.
JOBS_SERVER_OPTIONS = ["--max-running-jobs", "1000000", "--max-queued-jobs", "1000000"]


@dataclasses.dataclass
class Traffic:
    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that counts what crosses it (Content-Length framing only)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, traffic: Traffic, host: str):
        self.reader, self.writer, self.traffic, self.host = reader, writer, traffic, host

    @classmethod
    async def open(cls, host: str, port: int, traffic: Traffic) -> "HttpConnection":
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer, traffic, f"{host}:{port}")

    async def send(self, method: str, target: str, body: bytes = b"") -> None:
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.host}\r\n"
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

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        await self.send(method, target, body)
        status, headers = await self.read_head()
        content = await self.reader.readexactly(int(headers.get("content-length", 0)))
        self.traffic.bytes_received += len(content)
        return status, headers, content

    async def next_event_data(self) -> dict:
        """The JSON ``data:`` of the next event of a Server-Sent Events stream (comments and retry lines skipped)."""
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("the event stream ended")
            self.traffic.bytes_received += len(line)
            if line.startswith(b"data:"):
                return json.loads(line[5:])

    def close(self) -> None:
        self.writer.close()


def setup_seconds(rate: float, seconds: float) -> float:
    return SETUP_S + rate * seconds / 1000


def schedule(clients: int, rate: float, seconds: float, start: float) -> list[list[float]]:
    """Each client's event times (event k at start + k/rate belongs to client k mod clients)."""
    times: list[list[float]] = [[] for _ in range(clients)]
    for k in range(int(rate * seconds)):
        times[k % clients].append(start + k / rate)
    return times


async def _push(host: str, port: int, clients: int, rate: float, seconds: float, traffic: Traffic) -> list[float]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    subscribers = []
    for i in range(clients):
        connection = await HttpConnection.open(host, port, traffic)
        await connection.send("GET", f"/events?topic=c{i}")
        status, _ = await connection.read_head()
        if status != 200:
            raise RuntimeError(f"subscribe answered {status}")
        subscribers.append(connection)
    times = schedule(clients, rate, seconds, loop.time() + setup_seconds(rate, seconds))

    async def follow(connection: HttpConnection, count: int) -> None:
        for _ in range(count):
            data = await connection.next_event_data()
            latencies.append(loop.time() - data["t"])

    async def produce() -> None:
        producer = await HttpConnection.open(host, port, Traffic())  # not the watchers' cost: not counted
        for when, owner in sorted((t, i) for i, client_times in enumerate(times) for t in client_times):
            await asyncio.sleep(max(0.0, when - loop.time()))
            status, _, _ = await producer.request("POST", f"/topics/c{owner}/messages", json.dumps({"t": when}).encode())
            if status != 202:
                raise RuntimeError(f"publish answered {status}")
        producer.close()

    await asyncio.gather(produce(), *(follow(c, len(t)) for c, t in zip(subscribers, times)))
    for connection in subscribers:
        connection.close()
    return latencies


async def _poll(host: str, port: int, clients: int, rate: float, seconds: float, traffic: Traffic,
                long_poll: bool) -> list[float]:
    loop = asyncio.get_running_loop()
    times = schedule(clients, rate, seconds, loop.time() + setup_seconds(rate, seconds))
    producer = await HttpConnection.open(host, port, Traffic())  # not the watchers' cost: not counted
    jobs: list[list[tuple[str, int, float]]] = [[] for _ in range(clients)]   # (id, version, end time) per client
    for i, client_times in enumerate(times):
        for when in client_times:
            created = loop.time()
            body = json.dumps({"duration_ms": max(0, round((when - created) * 1000))}).encode()
            status, _, content = await producer.request("POST", "/jobs", body)
            if status != 202:
                raise RuntimeError(f"POST /jobs answered {status}: {content[:200]!r}")
            monitor = json.loads(content)
            jobs[i].append((monitor["id"], monitor["version"], max(when, created)))
    producer.close()
    latencies: list[float] = []

    async def follow(client_jobs: list[tuple[str, int, float]]) -> None:
        connection = await HttpConnection.open(host, port, traffic)
        for job_id, version, ends in client_jobs:
            while True:
                target = f"/jobs/{job_id}?wait=30&version={version}" if long_poll else f"/jobs/{job_id}"
                status, headers, content = await connection.request("GET", target)
                monitor = json.loads(content)
                if monitor["status"] in TERMINAL:
                    latencies.append(loop.time() - ends)
                    break
                version = monitor["version"]
                if not long_poll:
                    await asyncio.sleep(float(headers.get("retry-after", 1)))
        connection.close()

    await asyncio.gather(*(follow(client_jobs) for client_jobs in jobs))
    return latencies


def configurations(run: BenchRun, modes: tuple[str, ...]) -> list[dict]:
    if not run.wants_workload(WORKLOAD):
        return []
    settings = run.settings
    return [{"mode": mode, "clients": settings.update_clients, "rate": settings.update_rate} for mode in modes]


def planned(run: BenchRun) -> int:
    return (len(configurations(run, ("short", "long"))) * len(example_server_specs(run, JOBS_EXAMPLE))
            + len(configurations(run, ("push",))) * len(example_server_specs(run, PUSH_EXAMPLE)))


def run(run: BenchRun) -> None:
    seconds = run.settings.updates_seconds

    def measure(server: Server, params: dict):
        traffic = Traffic()
        clients, rate = params["clients"], params["rate"]
        if params["mode"] == "push":
            scenario = _push(server.host, server.port, clients, rate, seconds, traffic)
        else:
            scenario = _poll(server.host, server.port, clients, rate, seconds, traffic, params["mode"] == "long")
        before = server.measure()
        started = time.monotonic()
        latencies = asyncio.run(asyncio.wait_for(scenario, seconds + setup_seconds(rate, seconds) + 15))
        elapsed = time.monotonic() - started - setup_seconds(rate, seconds)
        latencies_us = sorted(max(0.0, value) * 1e6 for value in latencies)
        sample = RunSample(len(latencies), elapsed, percentile(latencies_us, 50), percentile(latencies_us, 99),
                           server.measure() - before)
        events = max(len(latencies), 1)
        return summarize(WORKLOAD, server.name, params, [sample], extra={
            "requests_per_event": round(traffic.requests / events, 2),
            "bytes_per_event": round((traffic.bytes_sent + traffic.bytes_received) / events),
            "requests": traffic.requests, "events": len(latencies), "seconds": seconds})

    jobs_specs = [dataclasses.replace(spec, argv=[*spec.argv, *JOBS_SERVER_OPTIONS]) if spec.argv else spec
                  for spec in example_server_specs(run, JOBS_EXAMPLE)]
    sweep(run, WORKLOAD, jobs_specs, configurations(run, ("short", "long")), measure)
    sweep(run, WORKLOAD, example_server_specs(run, PUSH_EXAMPLE), configurations(run, ("push",)), measure)
