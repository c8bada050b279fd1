"""The seed's patterns: what waiting clients cost, how to tell clients about updates, and what durability costs.

* ``waiting-clients`` (measured now): N clients connected to the echo server and waiting (each has made one round trip,
  so the server holds a pending receive for it), and meanwhile one more client doing ping-pong. The row reports the
  server's resident memory per waiting client (one thread each on ``blocking``; a pending op each on the others) and
  the latency of that other client, next to the same probe with no one waiting. The ``threads`` backend's pool bound
  shows here: each waiting client holds a worker, so past ``max_workers`` clients new ones are not served at all.
* ``updates`` (short polling vs long polling vs push for N clients waiting on updates produced at a fixed rate:
  requests sent, bytes on the wire, event-to-client latency) needs ``examples/jobs_server.py`` and
  ``examples/push_server.py``; ``upload`` (throughput with sync vs async durability) needs ``examples/upload_server.py``.
  Until those exist the rows are skipped with that reason.
"""

from __future__ import annotations

import json
import subprocess
import time

import psutil

from .context import BenchRun
from .loadgen import LoadFailed, run_load
from .processes import Server, current_rss_kib, pinned_to
from .results import summarize
from .servers import EXAMPLES_DIR, echo_server_specs, sweep

NAME = "patterns"
WORKLOADS = ("waiting-clients", "updates", "upload")
RATIO_REFERENCES: dict[str, tuple[str, ...]] = {"waiting-clients": ("ref:uvloop",)}
NEEDS_EXAMPLES = {"updates": ("jobs_server.py", "push_server.py"), "upload": ("upload_server.py",)}
SETTLE_S = 0.3


def configurations(run: BenchRun) -> list[dict]:
    if not run.wants_workload("waiting-clients"):
        return []
    return [{"waiting": 0}, {"waiting": run.settings.idle_clients}]


def planned(run: BenchRun) -> int:
    return len(configurations(run)) * len(echo_server_specs(run))


class WaitingClients:
    """N idle connections held open by the load generator's ``--idle`` mode until ``close()``."""

    def __init__(self, run: BenchRun, loadgen, server: Server, count: int):
        connect_timeout = 10 + count / 500
        self.process = subprocess.Popen(
            [str(loadgen), "--host", server.host, "--port", str(server.port), "--connections", str(count), "--idle",
             "--duration", "600", "--connect-timeout", str(connect_timeout)],
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
    for workload, examples in NEEDS_EXAMPLES.items():
        if not run.wants_workload(workload):
            continue
        missing = [name for name in examples if not (EXAMPLES_DIR / name).exists()]
        reason = (f"needs examples/{' and examples/'.join(missing)}" if missing
                  else "the examples exist; this measurement is not written yet")
        for backend in run.backends:
            run.skip(workload, backend, reason)

    if not configurations(run):
        return
    loadgen = run.c_program("loadgen")
    specs = echo_server_specs(run)
    if loadgen is None:
        for spec in specs:
            run.skip("waiting-clients", spec.name, "the load generator cannot be built")
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
        return summarize("waiting-clients", server.name, params, samples, extra=extra,
                         notes=["ops, latency and CPU are those of one ping-pong client beside the waiting ones"])

    sweep(run, "waiting-clients", specs, configurations(run), measure)
