"""Run anyio's own test suite (from its source distribution) on chosen event loops: a peer's tests for our loop.

anyio's ``tests/conftest.py`` parametrizes every async test over ``anyio_backend``: asyncio (debug mode), asyncio
with uvloop, and trio. We run a copy of its tests whose asyncio parameters are the loops asked for, and trio
dropped (it is not an asyncio loop). Where ``localhost`` has no IPv6 address, anyio's IPv6 tests are skipped as on
a machine without IPv6 (see ``prepare``)::

    python -m iokit.asyncio.anyio_suite --source anyio-4.16.0 --loops asyncio,uvloop,iokit-uring,iokit-epoll \\
        [--junit FILE] [-- pytest arguments]

``--source`` is an unpacked sdist (``pip download --no-deps --no-binary :all: anyio==<the installed version>``);
its version must match the installed anyio, whose code the tests exercise. Each test id ends in
``[asyncio+<loop>]``. Exits with pytest's status.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

LOOPS = {
    "asyncio": "None",
    "uvloop": "__import__('uvloop').new_event_loop",
    "iokit-uring": "__import__('iokit.asyncio').asyncio.loop_factory('uring')",
    "iokit-epoll": "__import__('iokit.asyncio').asyncio.loop_factory('epoll')",
}
_MARKER = "backend_params = asyncio_params.copy()"


def _params(loops: list[str]) -> str:
    lines = ["asyncio_params = ["]
    for loop in loops:
        options = '{"debug": True}' if LOOPS[loop] == "None" else f'{{"debug": True, "loop_factory": {LOOPS[loop]}}}'
        lines.append(f'    pytest.param(("asyncio", {options}), id="asyncio+{loop}"),')
    lines.append("]")
    return "\n".join(lines)


def prepare(source: Path, loops: list[str], workdir: Path) -> Path:
    """Copy anyio's tests and pytest configuration into ``workdir``, parametrized over ``loops``; return it."""
    shutil.copytree(source / "tests", workdir / "tests")
    shutil.copy(source / "pyproject.toml", workdir / "pyproject.toml")
    conftest = workdir / "tests" / "conftest.py"
    text = conftest.read_text()
    if _MARKER not in text:
        raise SystemExit(f"{conftest} has no line {_MARKER!r}: this anyio's conftest is not one this runner knows")
    # Our loops replace anyio's asyncio parameters; the loop over the other backends (trio) is emptied.
    text = text.replace(_MARKER, _params(loops) + "\n" + _MARKER)
    text = re.sub(r"for backend_name in get_all_backends\(\):", "for backend_name in ():", text)
    conftest.write_text(text)
    if not _localhost_has_ipv6():
        # anyio decides "IPv6 is available" by binding ::1, then binds and connects to "localhost" over IPv6. Where
        # localhost has no IPv6 address (/etc/hosts without ::1) those tests fail on every loop, and the sockets they
        # leak fail whichever test collects garbage next: they are skipped instead, as on a machine without IPv6.
        sockets = workdir / "tests" / "test_sockets.py"
        text = sockets.read_text()
        if _IPV6_PROBE not in text:
            raise SystemExit(f"{sockets} has no line {_IPV6_PROBE!r}: this anyio's IPv6 probe is not one we know")
        sockets.write_text(text.replace(_IPV6_PROBE, "if socket.has_ipv6 and _localhost_has_ipv6:", 1)
                           .replace("has_ipv6 = False\n", "has_ipv6 = False\n_localhost_has_ipv6 = False\n", 1))
    return workdir


_IPV6_PROBE = "if socket.has_ipv6:"


def _localhost_has_ipv6() -> bool:
    try:
        return bool(socket.getaddrinfo("localhost", 0, socket.AF_INET6))
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="an unpacked anyio sdist")
    parser.add_argument("--loops", default="iokit-uring,iokit-epoll",
                        help=f"comma-separated, of {', '.join(LOOPS)}")
    parser.add_argument("--junit", type=Path, help="write pytest's JUnit XML here")
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments (-k, test paths...)")
    args = parser.parse_args()
    loops = args.loops.split(",")
    unknown = [loop for loop in loops if loop not in LOOPS]
    if unknown:
        parser.error(f"unknown loop(s) {', '.join(unknown)}; choose from {', '.join(LOOPS)}")
    with tempfile.TemporaryDirectory(prefix="anyio-suite-") as tmp:
        workdir = prepare(args.source.resolve(), loops, Path(tmp))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not network"]
        if args.junit:
            command += ["--junit-xml", str(args.junit.resolve())]
        return subprocess.call(command + args.pytest_args, cwd=workdir, env=os.environ.copy())


if __name__ == "__main__":
    sys.exit(main())
