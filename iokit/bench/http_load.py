"""HTTP request/response: keep-alive requests against ``examples/http_server.py`` on each backend and against the
reference servers of ``http_refs`` (uvicorn, granian, and our httptools ``Protocol`` server on uvloop and on the stdlib
loop), all pinned alike and measured in the same sweep.

Three requests (:data:`REQUESTS`): ``GET /`` with wrk's three headers, swept over 1, 16, 64 and 256 connections; and at
64 connections (the sweep's largest count when 64 is not swept) a browser-like ``GET /`` with 12 headers (~600 bytes)
and a 4 KiB ``POST /echo``, so what a server pays per header and per body byte shows beside the bare request.

The load is wrk where it is installed (an outside client nobody here wrote, one thread pinned to the load core,
reporting through ``wrk_report.lua``, which also sends the request described here), else our C load generator in its
HTTP mode, which sends only the plain ``GET /`` (the other requests are then skipped with the reason). wrk runs last
whole seconds, so each timed run is one wrk process of 1 s, as many as the profile's timed seconds (one in ``--quick``,
five in the full run), after a discarded 1 s warm-up when the profile warms up for a second or more.

**Warm-up, the same for every server**: before its first measured row each server answers one discarded second of
each request measured, at the realistic requests' connection count. A fresh server's first burst can be several times
slower than the same process later (a stdlib asyncio server's first 64-connection burst ran at a quarter of its later
rate: allocator thresholds and buffers grown on first use), so without it whichever row came first would be judged on
its cold start.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

from .context import BenchRun
from .loadgen import run_load
from .processes import Server, pinned_to, reset_peak_rss
from .results import RunSample, summarize
from .servers import example_server_specs, http_reference_specs, sweep

NAME = "http"
WORKLOADS = ("http",)
RATIO_REFERENCES: dict[str, tuple[str, ...]] = {"http": ("ref:uvicorn", "ref:httptools-uvloop")}
EXAMPLE = "http_server.py"
WRK_REPORT = Path(__file__).with_name("wrk_report.lua")
REALISTIC_CONNECTIONS = 64


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    """One kind of request: its label (the results' ``params["request"]``), method, path, the headers it sends
    besides ``Host`` (and ``Content-Length``, added for a body), and the size of its body."""

    label: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body_bytes: int = 0

    @property
    def is_plain(self) -> bool:
        """wrk's default request (and the only one the C load generator sends)."""
        return (self.method, self.path, self.headers, self.body_bytes) == ("GET", "/", (), 0)

    def wrk_arguments(self) -> list[str]:
        """What ``wrk_report.lua`` reads after wrk's ``--`` to send this request."""
        if self.is_plain:
            return []
        return ["--", self.method, str(self.body_bytes), *(f"{name}: {value}" for name, value in self.headers)]

    def wire_bytes(self, host: str, port: int) -> int:
        """The request's size on the wire, as wrk sends it to ``host:port``."""
        fields = [("Host", f"{host}:{port}"), *self.headers]
        if self.body_bytes:
            fields.append(("Content-Length", str(self.body_bytes)))
        head = f"{self.method} {self.path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n"
        return len(head) + self.body_bytes


# What Chrome sends for a page typed into its address bar (less the sec-ch-ua hints), with a session cookie.
BROWSER_HEADERS = (
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
                   "Safari/537.36"),
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,"
               "application/signed-exchange;v=b3;q=0.7"),
    ("Accept-Language", "en-US,en;q=0.9,de;q=0.8"),
    ("Accept-Encoding", "gzip, deflate, br, zstd"),
    ("Cache-Control", "max-age=0"),
    ("Connection", "keep-alive"),
    ("Upgrade-Insecure-Requests", "1"),
    ("Sec-Fetch-Dest", "document"),
    ("Sec-Fetch-Mode", "navigate"),
    ("Sec-Fetch-Site", "none"),
    ("Cookie", "session=7f3a9c2e41d84b6f9a0e5c1d2b3a4f5e; theme=dark; lang=en"),
)
PLAIN_GET = HttpRequest("GET /", "GET", "/")
BROWSER_GET = HttpRequest("GET / browser", "GET", "/", BROWSER_HEADERS)
POST_4K = HttpRequest("POST /echo 4KiB", "POST", "/echo", (("Content-Type", "application/octet-stream"),), 4096)
REQUESTS = {request.label: request for request in (PLAIN_GET, BROWSER_GET, POST_4K)}


def realistic_connections(run: BenchRun) -> int:
    swept = run.settings.connections
    return REALISTIC_CONNECTIONS if REALISTIC_CONNECTIONS in swept else max(swept)


def all_configurations(run: BenchRun) -> list[dict]:
    """Every (connections, request) measured where wrk is installed."""
    plain = [{"connections": connections, "request": PLAIN_GET.label} for connections in run.settings.connections]
    realistic = [{"connections": realistic_connections(run), "request": request.label}
                 for request in (BROWSER_GET, POST_4K)]
    return plain + realistic


def configurations(run: BenchRun) -> list[dict]:
    """What this run measures: all of them with wrk; the plain GET only with the C load generator."""
    if shutil.which("wrk"):
        return all_configurations(run)
    return [params for params in all_configurations(run) if REQUESTS[params["request"]].is_plain]


def server_specs(run: BenchRun):
    return example_server_specs(run, EXAMPLE) + http_reference_specs(run)


def planned(run: BenchRun) -> int:
    return len(configurations(run)) * len(server_specs(run))


def _wrk_run(run: BenchRun, wrk: str, server: Server, connections: int, request: HttpRequest) -> dict:
    command = [wrk, "-t1", f"-c{connections}", "-d1s", "-s", str(WRK_REPORT),
               f"http://{server.host}:{server.port}{request.path}", *request.wrk_arguments()]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=60,
                               preexec_fn=pinned_to(run.cores.load))
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {(completed.stderr or completed.stdout)[-300:]}")
    return json.loads(lines[-1])


def _wrk_samples(run: BenchRun, wrk: str, server: Server, connections: int,
                 request: HttpRequest) -> tuple[list[RunSample], dict]:
    settings = run.settings
    if settings.warmup_s >= 1:
        _wrk_run(run, wrk, server, connections, request)
    reset_peak_rss(server.pid)
    samples, reports = [], []
    for _ in range(max(1, round(settings.runs * settings.run_s))):
        before = server.measure()
        report = _wrk_run(run, wrk, server, connections, request)
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
    specs = server_specs(run)
    measured = configurations(run)
    for params in all_configurations(run):
        if params not in measured:
            for spec in specs:
                run.skip("http", spec.name, "needs wrk (the C load generator sends only a plain GET /)", params)

    def load(server: Server, connections: int, request: HttpRequest) -> tuple[list[RunSample], dict]:
        if wrk:
            return _wrk_samples(run, wrk, server, connections, request)
        if loadgen:
            samples, figures = run_load(run, loadgen, server, connections=connections, depth=1, http_path="/")
            figures["client"] = "iokit loadgen"
            return samples, figures
        raise RuntimeError("neither wrk nor a C compiler for the load generator is available")

    def warm(server: Server) -> None:
        for request in dict.fromkeys(REQUESTS[params["request"]] for params in measured):
            if wrk:
                _wrk_run(run, wrk, server, realistic_connections(run), request)
            else:
                load(server, realistic_connections(run), request)

    def measure(server: Server, params: dict):
        request = REQUESTS[params["request"]]
        samples, figures = load(server, params["connections"], request)
        figures["request_bytes"] = request.wire_bytes(server.host, server.port)
        notes = [f"{figures['errors']} errors (connection or non-2xx)"] if figures["errors"] else []
        return summarize("http", server.name, params, samples, notes=notes, extra=figures)

    sweep(run, "http", specs, measured, measure, warm=warm)
