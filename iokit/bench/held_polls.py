"""Held long polls: N clients each holding a long poll on ``examples/jobs_server.py`` (a job that will not change for
minutes), and meanwhile one more client short-polling that job.

The row reports the server's resident memory per held request, and the short-poll client's latency next to the same
probe with nobody held: what a long-polling server pays to keep N clients waiting, and whether the others still get
answered quickly. It is the held-request version of ``waiting-clients`` (there, a client waits on a bare echo
connection; here, inside an HTTP request with its parser, routing, cancel scopes and the waiter registry).

The held clients are plain non-blocking sockets of this process: each connects, sends one request
(``GET /jobs/ID?wait=60&version=V``) and reads nothing. The row waits until the server's ``/stats`` counts all of them
held, so the memory is measured with every request registered. A server that cannot hold them (a thread each, and the
descriptor limit) fails the row with how many it held.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import time

from .context import BenchRun
from .loadgen import loadgen_or_skip, run_load
from .processes import Server, current_rss_kib
from .results import summarize
from .servers import example_server_specs, sweep

WORKLOAD = "held-long-polls"
EXAMPLE = "jobs_server.py"
HOLD_SECONDS = 60          # the longest wait the server allows: the row ends well within it
SETTLE_S = 0.3
STALL_S = 10               # no more requests held for this long: the server will not hold more
OPEN_BATCH = 500           # held requests opened at once (below the listen backlog of 1024)
JOB = json.dumps({"duration_ms": 600_000}).encode()   # the longest job: it does not change while a row is measured


def configurations(run: BenchRun) -> list[dict]:
    if not run.wants_workload(WORKLOAD):
        return []
    return [{"held": 0}, {"held": run.settings.idle_clients}]


def _server_specs(run: BenchRun):
    count = run.settings.idle_clients
    # Room for every held request, plus the spare connections the server keeps for everyone else.
    return example_server_specs(run, EXAMPLE, "--max-held-requests", str(count + 16),
                                "--max-connections", str(count + 256 + 16))


def planned(run: BenchRun) -> int:
    return len(configurations(run)) * len(_server_specs(run))


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


class HeldPolls:
    """``count`` long polls on ``job_id`` held open by this process until ``close()``."""

    def __init__(self, server: Server, job_id: str, version: int, count: int):
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
                self._wait_until_held(server, first, first + batch)
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
    def _wait_until_held(server: Server, held: int, count: int) -> None:
        """Wait until the server holds ``count`` long polls (``held`` of them already were)."""
        progress_at = time.monotonic()
        while True:
            try:
                now_held = _request(server, "GET", "/stats")["held"]
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

    def measure(server: Server, params: dict):
        count = params["held"]
        job = _request(server, "POST", "/jobs", JOB)
        rss_before = current_rss_kib(server.pid)
        held = HeldPolls(server, job["id"], job["version"], count) if count else None
        try:
            time.sleep(SETTLE_S if count else 0)
            rss_held = current_rss_kib(server.pid)
            samples, figures = run_load(run, loadgen, server, connections=1, depth=1, http_path=f"/jobs/{job['id']}")
        finally:
            if held:
                held.close()
        extra = dict(figures, rss_kib=rss_held,
                     rss_per_held_request_kib=round((rss_held - rss_before) / count, 2) if count else None,
                     hold_seconds=round(held.seconds, 2) if held else None)
        notes = ["ops, latency and CPU are those of one short-polling client beside the held requests"]
        if figures.get("errors"):
            notes.append(f"{figures['errors']} errors (connection or non-2xx)")
        return summarize(WORKLOAD, server.name, params, samples, extra=extra, notes=notes)

    sweep(run, WORKLOAD, specs, configurations(run), measure)
