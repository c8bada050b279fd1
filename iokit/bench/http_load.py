"""HTTP request/response: keep-alive ``GET /`` against ``examples/http_server.py`` on each backend, swept over 1, 16,
64 and 256 connections.

The load is wrk where it is installed (an outside client nobody here wrote, one thread pinned to the load core,
reporting through ``wrk_report.lua``), else our C load generator in its HTTP mode. wrk runs last whole seconds, so
each timed run is one wrk process of 1 s, as many as the profile's timed seconds (one in ``--quick``, five in the full
run), after a discarded 1 s warm-up when the profile warms up for a second or more.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from .context import BenchRun
from .loadgen import run_load
from .processes import Server, pinned_to, reset_peak_rss
from .results import RunSample, summarize
from .servers import example_server_specs, sweep

NAME = "http"
WORKLOADS = ("http",)
RATIO_REFERENCES: dict[str, tuple[str, ...]] = {"http": ()}
EXAMPLE = "http_server.py"
WRK_REPORT = Path(__file__).with_name("wrk_report.lua")


def configurations(run: BenchRun) -> list[dict]:
    return [{"connections": connections, "request": "GET /"} for connections in run.settings.connections]


def planned(run: BenchRun) -> int:
    return len(configurations(run)) * len(example_server_specs(run, EXAMPLE))


def _wrk_run(run: BenchRun, wrk: str, server: Server, connections: int) -> dict:
    command = [wrk, "-t1", f"-c{connections}", "-d1s", "-s", str(WRK_REPORT), f"http://{server.host}:{server.port}/"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60,
                               preexec_fn=pinned_to(run.cores.load))
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {(completed.stderr or completed.stdout)[-300:]}")
    return json.loads(lines[-1])


def _wrk_samples(run: BenchRun, wrk: str, server: Server, connections: int) -> tuple[list[RunSample], dict]:
    settings = run.settings
    if settings.warmup_s >= 1:
        _wrk_run(run, wrk, server, connections)
    reset_peak_rss(server.pid)
    samples, reports = [], []
    for _ in range(max(1, round(settings.runs * settings.run_s))):
        before = server.measure()
        report = _wrk_run(run, wrk, server, connections)
        samples.append(RunSample(report["requests"], report["duration_us"] / 1e6, report["p50_us"],
                                 report["p99_us"], server.measure() - before))
        reports.append(report)
    median = sorted(reports, key=lambda r: r["requests"])[len(reports) // 2]
    figures = {key: median[key] for key in ("p90_us", "p999_us", "max_us", "bytes")}
    figures["errors"] = sum(r["errors"] for r in reports)
    figures["client"] = "wrk"
    return samples, figures


def run(run: BenchRun) -> None:
    wrk = shutil.which("wrk")
    loadgen = None if wrk else run.c_program("loadgen")

    def measure(server: Server, params: dict):
        if wrk:
            samples, figures = _wrk_samples(run, wrk, server, params["connections"])
        elif loadgen:
            samples, figures = run_load(run, loadgen, server, connections=params["connections"], depth=1,
                                        http_path="/")
            figures["client"] = "iokit loadgen"
        else:
            raise RuntimeError("neither wrk nor a C compiler for the load generator is available")
        notes = [f"{figures['errors']} errors (connection or non-2xx)"] if figures["errors"] else []
        return summarize("http", server.name, params, samples, notes=notes, extra=figures)

    sweep(run, "http", example_server_specs(run, EXAMPLE), configurations(run), measure)
