"""fio as the outside reference for the file workloads: the same operations, measured by a C tool everyone trusts.

Each timed run is one fio process (``--output-format=json``), pinned to the same core as our file worker, on the same
file. Options chosen to match our loops:

* ``--norandommap --randrepeat=0``: random offsets drawn with replacement, as ours are (fio's default random map visits
  each block once per pass, which is a different access pattern).
* ``--invalidate=0`` for the warm-cache rows: fio otherwise drops the file's page cache before starting, which would
  turn the warm rows cold.
* ``--lat_percentiles=1``: percentiles of the total latency (submission to completion), the closest to ours.
* ``--thread``: fio's job runs as a thread of the one process, so the process's peak RSS is the job's.
* Writes with fsync use ``--iodepth=1``: fio 3.33 (Debian 12) does not order an fsync after writes still in flight at
  a higher depth (it issues about one sync per completion), so a deeper queue would not be the same durability contract.
  fio's write latency is per write, not "until durable" as in our rows.
* ``psync`` only runs at queue depth 1: it is synchronous, so a deeper queue is the same measurement.

CPU seconds and context switches are fio's own (``usr_cpu``/``sys_cpu`` of the job's runtime, ``ctx``); peak RSS comes
from ``wait4`` on the fio process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from .processes import Usage, pinned_to
from .results import RunSample

ENGINES = ("psync", "io_uring")


class FioFailed(RuntimeError):
    pass


def fio_command(fio: str, *, path: Path, kind: str, engine: str, queue_depth: int, direct: bool,
                fsync_every: int, size_bytes: int, runtime_s: float, ramp_s: float) -> list[str]:
    command = [fio, "--name=iokit-bench", f"--filename={path}", "--bs=4k", f"--size={size_bytes}",
               f"--ioengine={engine}", f"--iodepth={queue_depth}", "--time_based",
               f"--runtime={max(1, round(runtime_s * 1000))}ms", "--thread", "--lat_percentiles=1",
               "--output-format=json", "--group_reporting"]
    if ramp_s > 0:
        command.append(f"--ramp_time={max(1, round(ramp_s * 1000))}ms")
    if kind == "randread":
        command += ["--rw=randread", "--norandommap", "--randrepeat=0", f"--direct={int(direct)}", "--invalidate=0"]
    else:
        command += ["--rw=write", f"--fsync={fsync_every}"]
    return command


def _parse(stdout: str) -> dict:
    start = stdout.find("{")   # fio may print warnings before the JSON document
    if start < 0:
        raise FioFailed(f"fio printed no JSON: {stdout[-300:]!r}")
    return json.loads(stdout[start:])


def run_fio(command: list[str], cpus) -> RunSample:
    """Run one fio job and turn its JSON into a timed run of ours."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, preexec_fn=pinned_to(cpus))
        watchdog = threading.Timer(120, process.kill)   # fio bounds its own runtime; this bounds a hung fio
        watchdog.start()
        try:
            _pid, status, rusage = os.wait4(process.pid, 0)   # wait4, not wait: its rusage holds fio's peak RSS
        finally:
            watchdog.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read().strip()
    if process.returncode != 0:
        raise FioFailed(f"fio exited with {process.returncode}: {errors[-400:]}")
    job = _parse(output)["jobs"][0]
    if job.get("error"):
        raise FioFailed(f"fio job error {job['error']}: {errors[-400:]}")
    side = job["read"] if job["read"]["total_ios"] else job["write"]
    seconds = side["runtime"] / 1000 or job["job_runtime"] / 1000
    percentiles = side["lat_ns"].get("percentile") or side["clat_ns"].get("percentile") or {}
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
    return RunSample(ops=side["total_ios"], seconds=seconds,
                     p50_us=percentiles.get("50.000000", 0) / 1000, p99_us=percentiles.get("99.000000", 0) / 1000,
                     usage=Usage(cpu_s, int(job["ctx"]), rusage.ru_maxrss))


def fio_available() -> str | None:
    """The fio executable, or None."""
    return shutil.which("fio")


def engine_supported(fio: str, engine: str) -> bool:
    """Whether this fio build has ``engine`` (Debian's has io_uring since bullseye)."""
    out = subprocess.run([fio, "--enghelp"], capture_output=True, text=True, timeout=30).stdout
    return engine in out.split()

