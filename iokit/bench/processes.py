"""Child processes of a benchmark: started pinned to their cores, awaited until ready, measured, and stopped.

Why each piece is done the way it is:

* **Pinning** is set in the child before it runs anything (``preexec_fn``), so every thread it later creates inherits
  the mask; setting it from outside after start would miss threads already running.
* **CPU seconds** come from psutil (``/proc/PID/stat``), which is process-wide and keeps the time of threads that
  have exited.
* **Context switches** are counted per thread from ``/proc/PID/task``: psutil's ``num_ctx_switches`` reads only the
  main thread, which would miss every worker thread of the ``blocking`` and ``threads`` backends. An interval's count
  is, for each thread alive at its end, what it added since the start (all of it for a thread born meanwhile). A thread
  that exited during the interval takes its count with it, so the figure is a floor; snapshots are taken while the
  load's connections (and so the blocking backend's threads) are still open.
* **Peak RSS** is ``VmHWM``, reset before each measurement by writing 5 to ``/proc/PID/clear_refs`` so that one long
  lived server reports the peak of each workload, not of its whole life. Where the reset is refused, the peak is the
  process's lifetime peak and the result says so.
* **A server is its process tree**: the figures are summed over the process and its descendants alive at the moment,
  so a server that runs its work in a child (granian's worker, a ``--workers`` parent) is measured where it works.
  A descendant that exited takes its CPU time with it; none of the measured servers starts or stops children while
  it is measured. Peak RSS is then the sum of each process's peak, an upper bound of the tree's.
* Servers write stderr to a file, not a pipe: nobody reads a pipe during a run, and a full pipe would stall the server.
"""

from __future__ import annotations

import dataclasses
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import psutil

READY_LINE = re.compile(r"listening on (?P<host>[\d.]+):(?P<port>\d+)")


@dataclasses.dataclass(frozen=True)
class Usage:
    """A process's resource counters at one moment (or, after subtraction, over an interval)."""

    cpu_s: float
    context_switches: int
    peak_rss_kib: int
    switches_by_thread: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __sub__(self, earlier: "Usage") -> "Usage":
        # Context switches per thread alive now (see the module docstring). Peak RSS is not a counter: the later
        # peak is the peak of the interval (it was reset at its start).
        if not self.switches_by_thread:   # figures reported by a tool (fio, a worker's getrusage): plain counters
            return Usage(self.cpu_s - earlier.cpu_s, self.context_switches - earlier.context_switches,
                         self.peak_rss_kib)
        switches = 0
        for tid, count in self.switches_by_thread.items():
            previous = earlier.switches_by_thread.get(tid, 0)
            switches += count - previous if count >= previous else count   # smaller: a new thread reusing the id
        return Usage(self.cpu_s - earlier.cpu_s, switches, self.peak_rss_kib)


class ProcessGone(RuntimeError):
    """A child exited before it was done; the message holds the end of its stderr."""


def pinned_to(cpus: Iterable[int]):
    """A ``preexec_fn`` that pins the child to ``cpus`` before it execs."""
    cpu_set = set(cpus)

    def pin() -> None:
        os.sched_setaffinity(0, cpu_set)

    return pin


def python_module_command(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter (the venv's, when the harness runs in one)."""
    return [sys.executable, "-m", module, *args]


def python_script_command(script: Path, *args: str) -> list[str]:
    return [sys.executable, str(script), *args]


def python_child_environment() -> dict[str, str]:
    """This environment, with the directory holding the ``iokit`` package first on PYTHONPATH, so a child finds the
    same iokit as the harness whatever its working directory."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _status_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    values = {}
    try:
        with open(path) as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in names:
                    values[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return values


def process_tree(pid: int) -> list[int]:
    """``pid`` and the descendants it has now."""
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


def measure(pid: int) -> Usage:
    """Snapshot of the CPU time, context switches (summed over threads) and peak RSS of ``pid`` and its descendants
    (see the module docstring)."""
    cpu_s, peak, by_thread = 0.0, 0, {}
    for index, member in enumerate(process_tree(pid)):
        try:
            times = psutil.Process(member).cpu_times()
        except psutil.NoSuchProcess:
            if index == 0:
                raise
            continue   # a descendant that has just exited
        cpu_s += times.user + times.system
        try:
            tids = os.listdir(f"/proc/{member}/task")
        except OSError:
            tids = []
        for tid in tids:
            fields = _status_fields(f"/proc/{member}/task/{tid}/status",
                                    ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
            if fields:
                by_thread[int(tid)] = sum(fields.values())
        peak += _status_fields(f"/proc/{member}/status", ("VmHWM",)).get("VmHWM", 0)
    return Usage(cpu_s, sum(by_thread.values()), peak, by_thread)


def reset_peak_rss(pid: int) -> bool:
    """Start a new peak-RSS window for ``pid`` and its descendants. Returns False where the kernel refuses."""
    try:
        for member in process_tree(pid):
            Path(f"/proc/{member}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def stop_process(process: subprocess.Popen, sig: int, timeout: float) -> int:
    """Send ``sig`` to a child still running, SIGKILL it if it outlives ``timeout`` seconds, close its stdout, and
    return its exit status (negative: the signal that ended it)."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout:
        process.stdout.close()
    return process.returncode


def current_rss_kib(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss // 1024


class Server:
    """A server started in its own process, pinned, that announces itself with ``listening on HOST:PORT``."""

    def __init__(self, argv: list[str], cpus: Iterable[int], *, name: str, env: dict | None = None,
                 ready_timeout: float = 20.0):
        self.name = name
        self.argv = argv
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
                                        preexec_fn=pinned_to(cpus), env=env, text=True)
        self.host, self.port = self._wait_ready(ready_timeout)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_ready(self, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(max(0.0, deadline - time.monotonic())):
                    continue
                line = self.process.stdout.readline()
                if not line:
                    self.stop()
                    raise ProcessGone(f"{self.name} exited before it was ready: {self.stderr_tail()}")
                match = READY_LINE.search(line)
                if match:
                    return match["host"], int(match["port"])
        self.stop()
        raise ProcessGone(f"{self.name} printed no ready line within {timeout:.0f} s: {self.stderr_tail()}")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ProcessGone(f"{self.name} exited with status {self.process.returncode}: {self.stderr_tail()}")

    def measure(self) -> Usage:
        self.check_alive()
        return measure(self.pid)

    def stderr_tail(self, lines: int = 2, limit: int = 400) -> str:
        """The last lines the server wrote on stderr (where an error message ends), on one line."""
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return " / ".join(text.splitlines()[-lines:])[-limit:] if text else "(no output on stderr)"

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in ``timeout`` seconds. Returns the exit status."""
        return stop_process(self.process, signal.SIGTERM, timeout)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
        self._stderr.close()
