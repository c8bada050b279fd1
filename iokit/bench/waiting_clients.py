"""Waiting clients: N clients connected to the echo server and waiting (each has made one round trip, so the server
holds a pending receive for it), and meanwhile one more client doing ping-pong.

The row reports the server's resident memory per waiting client (one thread each on ``blocking``; a pending op each on
the others) and the latency of that other client, next to the same probe with no one waiting. Our echo server runs
here with a 4 KiB receive buffer per connection (``RECEIVE_BUFFER_BYTES``): a pending receive holds its buffer on every
backend, and the 64 KiB of the throughput rows would hide what the runtime and the backend themselves cost. A backend
whose workers are each held by a waiting client (a bounded pool) stops answering new ones: the row then fails with
how many were answered.
"""

from __future__ import annotations

import json
import subprocess
import time

import psutil

from .context import BenchRun
from .loadgen import LoadFailed, loadgen_or_skip, run_load
from .processes import Server, current_rss_kib, pinned_to
from .results import summarize
from .servers import echo_server_specs, sweep

WORKLOAD = "waiting-clients"
SETTLE_S = 0.3
STALL_S = 10   # a server that answers no new client for this long is not going to (a pool or the fd limit is full)
RECEIVE_BUFFER_BYTES = 4096


def configurations(run: BenchRun) -> list[dict]:
    if not run.wants_workload(WORKLOAD):
        return []
    return [{"waiting": 0}, {"waiting": run.settings.idle_clients}]


def planned(run: BenchRun) -> int:
    return len(configurations(run)) * len(echo_server_specs(run, RECEIVE_BUFFER_BYTES))


class WaitingClients:
    """N idle connections held open by the load generator's ``--idle`` mode until ``close()``."""

    def __init__(self, run: BenchRun, loadgen, server: Server, count: int):
        connect_timeout = 10 + count / 500
        self.process = subprocess.Popen(
            [str(loadgen), "--host", server.host, "--port", str(server.port), "--connections", str(count), "--idle",
             "--duration", "600", "--connect-timeout", str(connect_timeout), "--stall-timeout", str(STALL_S)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=pinned_to(run.cores.load))
        try:
            line = self.process.stdout.readline()   # bounded: the loadgen gives up after connect_timeout
            report = json.loads(line) if line.strip() else {"error": "the load generator printed nothing"}
        except (json.JSONDecodeError, OSError) as exc:
            report = {"error": str(exc)}
        if "error" in report:
            self.close()
            raise LoadFailed(f"{count} waiting clients could not all be served: {report['error']}")
        self.connect_seconds = report["connect_seconds"]

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()   # the loadgen's signal to let go
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()


def run(run: BenchRun) -> None:
    if not configurations(run):
        return
    specs = echo_server_specs(run, RECEIVE_BUFFER_BYTES)
    loadgen = loadgen_or_skip(run, WORKLOAD, specs)
    if loadgen is None:
        return

    def measure(server: Server, params: dict):
        count = params["waiting"]
        rss_before = current_rss_kib(server.pid)
        waiting = WaitingClients(run, loadgen, server, count) if count else None
        try:
            time.sleep(SETTLE_S if count else 0)
            rss_held = current_rss_kib(server.pid)
            threads = psutil.Process(server.pid).num_threads()
            samples, figures = run_load(run, loadgen, server, connections=1, depth=1, size=64)
        finally:
            if waiting:
                waiting.close()
        extra = dict(figures, threads=threads, rss_kib=rss_held,
                     rss_per_waiting_client_kib=round((rss_held - rss_before) / count, 2) if count else None,
                     connect_seconds=waiting.connect_seconds if waiting else None)
        return summarize(WORKLOAD, server.name, params, samples, extra=extra,
                         notes=["ops, latency and CPU are those of one ping-pong client beside the waiting ones"])

    sweep(run, WORKLOAD, specs, configurations(run), measure)
