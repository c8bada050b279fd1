"""``python -m iokit info [--json]``: what this machine offers each backend, and which one ``auto`` picks."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys

from . import backends, open_backend
from ._errors import BackendUnavailable


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _liburing_version() -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "liburing-dev"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict:
    """The facts that decide which backend works here (kernel, Python, limits), plus each backend's availability."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    try:
        backend = open_backend("auto")
    except BackendUnavailable as exc:
        auto = {"backend": None, "because": exc.reason}
    else:
        auto = {"backend": backend.name, "because": backend.chosen_because}
        backend.close()
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "liburing": _liburing_version(),
        "io_uring_disabled_sysctl": _read("/proc/sys/kernel/io_uring_disabled"),
        "memlock_limit": {"soft": soft, "hard": hard},
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "backends": [{"name": b.name, "available": b.available, "reason": b.reason, "features": b.features}
                     for b in backends()],
        "auto": auto,
    }


def _print_text(info: dict) -> None:
    print(f"kernel   {info['kernel']} ({info['machine']})")
    print(f"python   {info['python']}")
    print(f"liburing {info['liburing'] or 'not installed (apt-get install liburing-dev)'}")
    print("backends")
    for b in info["backends"]:
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        print(f"  {b['name']:<9}{state}")
        for name, value in sorted(b["features"].items()):
            print(f"    {name:<28}{value}")
    auto = info["auto"]
    print(f"auto     {auto['backend'] or 'none'} ({auto['because']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iokit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="kernel, Python, and each backend's availability")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    facts = machine_info()
    if args.json:
        json.dump(facts, sys.stdout, indent=2)
        print()
    else:
        _print_text(facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
