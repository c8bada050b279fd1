"""What machine a benchmark ran on, printed with every run and stored in the JSON.

A figure means nothing without its machine: the same server does 14k or 190k round trips/s on one connection depending
on whether client and server share a core (cross-core wake-ups cost ~30 us each way on a KVM guest). So every run
records the kernel, CPU, core count and how the processes were pinned, Python, the io_uring sysctl and the versions of
liburing and the outside tools whose numbers appear next to ours.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class CorePlan:
    """Which CPUs the measured process (server, file worker) and the load (client, fio's peer) run on."""

    measured: frozenset[int]
    load: frozenset[int]
    description: str


def plan_cores() -> CorePlan:
    """Put the measured process and the load on different cores when there are two or more; say what was done."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        measured, load = cpus[0], cpus[1]
        return CorePlan(frozenset({measured}), frozenset({load}),
                        f"measured process pinned to CPU {measured}, load generator (and this harness) to CPU {load}")
    return CorePlan(frozenset(cpus), frozenset(cpus),
                    f"one CPU ({cpus[0]}): server and load share it, so socket figures include their contention")


def _first_line(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].strip() if text else None


def debian_package_version(package: str) -> str | None:
    """The installed version of a Debian package, or None (not Debian, or not installed)."""
    line = _first_line(["dpkg-query", "-W", "-f=${Version}", package])
    return line or None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _virtualization() -> str | None:
    """Like "kvm" or "kvm in docker", or None on bare metal (systemd-detect-virt, else the cpuinfo hypervisor flag)."""
    vm = _first_line(["systemd-detect-virt", "--vm"])
    container = _first_line(["systemd-detect-virt", "--container"])
    found = [name for name in (vm, container) if name and name != "none"]
    if found:
        return " in ".join(found)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "a hypervisor (cpu flag)" if " hypervisor" in flags else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _python_package_version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _memory_gib() -> float | None:
    try:
        import psutil
        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def python_call_ns() -> float:
    """Nanoseconds per call of an empty Python function, the best of 5 rounds: how fast this interpreter runs Python
    code. Builds differ a lot (on the machine of docs/benchmarks.md, Debian's optimised python3.11 takes 28 ns and a
    plain ``./configure`` build such as pyenv's 49 ns), and every backend row is mostly Python, so rows measured on
    different interpreters do not compare; this figure says which kind ran."""
    import timeit
    return round(min(timeit.repeat("f()", "def f(): pass", number=200_000, repeat=5)) / 200_000 * 1e9, 1)


def describe_machine(cores: CorePlan, command: list[str]) -> dict:
    """Everything needed to read the figures later: a flat dict, stored as the JSON's ``machine``."""
    debian = _read("/etc/debian_version")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(command),
        "kernel": platform.release(),
        "os": f"Debian {debian}" if debian else platform.platform(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "virtualization": _virtualization(),
        "memory_gib": _memory_gib(),
        "pinning": cores.description,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_call_ns": python_call_ns(),
        "python_executable": sys.executable,
        "io_uring_disabled_sysctl": _read("/proc/sys/kernel/io_uring_disabled"),
        "liburing": debian_package_version("liburing-dev") or debian_package_version("liburing2"),
        "gcc": _first_line(["gcc", "--version"]),
        "fio": _first_line(["fio", "--version"]),
        "wrk": _first_line(["wrk", "--version"]),
        "uvloop": _python_package_version("uvloop"),
        "matplotlib": _python_package_version("matplotlib"),
        "psutil": _python_package_version("psutil"),
        "iokit": _python_package_version("iokit"),
    }


def machine_summary(machine: dict) -> str:
    """Three lines for the top of the terminal output."""
    return (f"{machine['date']}  kernel {machine['kernel']}  {machine['os']}  {machine['cpu_model']} "
            f"x{machine['cpus']}{'  (' + machine['virtualization'] + ')' if machine['virtualization'] else ''}\n"
            f"{machine['python']} ({machine.get('python_call_ns', '?')} ns per call)  liburing {machine['liburing'] or 'not installed'}  "
            f"{machine['fio'] or 'fio not installed'}  wrk {'yes' if machine['wrk'] else 'not installed'}  "
            f"uvloop {machine['uvloop'] or 'not installed'}\n"
            f"{machine['pinning']}; load average {' '.join(map(str, machine['load_average_at_start']))} "
            f"(other work on this machine disturbs the figures)")
