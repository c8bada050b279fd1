"""Drives the C load generator (``csrc/loadgen.c``) against a running server and measures the server meanwhile.

The load generator prints a JSON line when its warm-up ends and one per timed run; at each line the server's counters
are sampled, so each run's CPU seconds and context switches are the server's over that run alone (the connect phase
and the warm-up are left out), and its peak-RSS window is restarted at the end of the warm-up.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import time
from pathlib import Path

from .context import BenchRun
from .processes import Server, pinned_to, reset_peak_rss
from .results import RunSample


class LoadFailed(RuntimeError):
    """The load generator reported an error (a refused or reset connection, a server that is not an echo server)."""


def loadgen_or_skip(run: BenchRun, workload: str, specs) -> Path | None:
    """The built load generator, or None after recording ``workload`` as skipped for every server in ``specs``."""
    loadgen = run.c_program("loadgen")
    if loadgen is None:
        for spec in specs:
            run.skip(workload, spec.name, "the load generator cannot be built")
    return loadgen


def loadgen_command(loadgen: Path, server: Server, *, connections: int, depth: int, size: int = 64,
                    http_path: str | None = None, warmup_s: float, run_s: float, runs: int) -> list[str]:
    command = [str(loadgen), "--host", server.host, "--port", str(server.port), "--connections", str(connections),
               "--depth", str(depth), "--size", str(size), "--warmup", str(warmup_s), "--duration", str(run_s),
               "--runs", str(runs)]
    if http_path:
        command += ["--http", http_path]
    return command


def _json_lines(process: subprocess.Popen, timeout: float):
    """The JSON lines the process prints, until it closes stdout; raises LoadFailed past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                process.kill()
                raise LoadFailed(f"the load generator overran its {timeout:.0f} s budget")
            if not selector.select(left):
                continue
            line = process.stdout.readline()
            if not line:
                return
            yield json.loads(line)


def run_load(run: BenchRun, loadgen: Path, server: Server, **load) -> tuple[list[RunSample], dict]:
    """Run the load generator once (warm-up + the settings' timed runs). Returns the runs, and the loadgen's figures
    that have no place in a RunSample (p90, p99.9, max, bytes, errors), from the median run."""
    settings = run.settings
    command = loadgen_command(loadgen, server, warmup_s=settings.warmup_s, run_s=settings.run_s, runs=settings.runs,
                              **load)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=pinned_to(run.cores.load))
    samples: list[RunSample] = []
    lines: list[dict] = []
    try:
        before = None
        budget = 60 + settings.warmup_s + settings.runs * settings.run_s
        for data in _json_lines(process, budget):
            if "error" in data:
                raise LoadFailed(data["error"])
            after = server.measure()
            if data.get("warmup_done"):
                reset_peak_rss(server.pid)
                after = server.measure()
            else:
                samples.append(RunSample(data["ops"], data["seconds"], data["p50_us"], data["p99_us"],
                                         after - before))
                lines.append(data)
            before = after
    except BaseException:
        process.kill()
        process.communicate()
        raise
    stderr = process.communicate(timeout=30)[1]
    if process.returncode != 0 or len(samples) != settings.runs:
        raise LoadFailed(f"load generator exit status {process.returncode}: {stderr.strip()[-300:]}")
    server.check_alive()
    median_run = sorted(lines, key=lambda line: line["ops_per_s"])[len(lines) // 2]
    figures = {key: median_run[key] for key in ("p90_us", "p999_us", "max_us", "bytes")}
    figures["errors"] = sum(line["errors"] for line in lines)
    return samples, figures
