"""Compiles the C reference programs (``csrc/``) on the fly into a cache directory.

No binary is ever committed: the sources are small, gcc is quick, and a binary built here is built for this machine's
kernel headers and liburing. A build is keyed by a hash of the source, the shared header, the flags and the compiler's
version, so an edit or a new gcc rebuilds and an unchanged tree reuses the cached binary. A program that cannot be built
(no gcc, no liburing headers) is reported with the reason, and the rows that need it are skipped, not failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE_DIR = Path(__file__).with_name("csrc")
WARNING_FLAGS = ["-Wall", "-Wextra"]
OPTIMIZE_FLAGS = ["-O2", "-g"]


@dataclasses.dataclass(frozen=True)
class CProgram:
    name: str            # the binary's name, e.g. "echo_uring"
    source: str          # file in csrc/
    libraries: tuple[str, ...] = ()
    needs_header: str | None = None   # a system header without which it cannot build (reported as the reason)


PROGRAMS = {
    "loadgen": CProgram("loadgen", "loadgen.c", ("-lm",)),
    "echo_epoll": CProgram("echo_epoll", "echo_epoll.c"),
    "echo_uring": CProgram("echo_uring", "echo_uring.c", ("-luring",), needs_header="/usr/include/liburing.h"),
}


class BuildFailed(RuntimeError):
    """The program could not be built; the message says why (missing tool or header, or the compiler's errors)."""


def cache_dir() -> Path:
    """``$IOKIT_BENCH_CACHE``, else ``$XDG_CACHE_HOME/iokit-bench``, else ``~/.cache/iokit-bench``."""
    if os.environ.get("IOKIT_BENCH_CACHE"):
        return Path(os.environ["IOKIT_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iokit-bench"


def _compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout


def compile_command(program: CProgram, output: Path, compiler: str = "gcc", extra_flags: tuple[str, ...] = ()) -> list[str]:
    return [compiler, *OPTIMIZE_FLAGS, *WARNING_FLAGS, *extra_flags, "-o", str(output),
            str(SOURCE_DIR / program.source), *program.libraries]


def build(name: str, *, directory: Path | None = None) -> Path:
    """Return the path of the built program ``name``, compiling it if the cache has no current build.

    Raises ``BuildFailed`` with the reason when it cannot be built.
    """
    program = PROGRAMS[name]
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise BuildFailed("no C compiler (apt-get install gcc)")
    if program.needs_header and not Path(program.needs_header).exists():
        raise BuildFailed(f"{program.needs_header} is missing (apt-get install liburing-dev)")
    digest = hashlib.sha256()
    for source in sorted(SOURCE_DIR.iterdir()):
        if source.suffix in (".c", ".h"):
            digest.update(source.name.encode() + source.read_bytes())
    digest.update(" ".join(compile_command(program, Path("out"), compiler)).encode())
    digest.update(_compiler_version(compiler).encode())
    target_dir = (directory or cache_dir()) / "bin" / digest.hexdigest()[:16]
    target = target_dir / program.name
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial{os.getpid()}")
    result = subprocess.run(compile_command(program, partial, compiler), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise BuildFailed(f"{compiler} failed on {program.source}:\n{result.stderr.strip()}")
    os.replace(partial, target)   # atomic: a concurrent run sees either no binary or a whole one
    return target
