"""Build ``iokit._uring_ffi``: cffi in API mode (out-of-line) over our own small C API, ``csrc/iokit_uring.h``.

The cdef is that header itself (minus its preprocessor lines), so it names only our API: the ring is an opaque struct,
liburing's structures and inline helpers never cross into Python, and there is no second copy of a declaration.

Extra flags come from the environment: ``IOKIT_CFLAGS`` and ``IOKIT_LDFLAGS`` (``scripts/sanitize.sh`` uses them to
build with ASan/UBSan). Run by setuptools through ``setup.py``'s ``cffi_modules``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from cffi import FFI

LIBURING_HEADER = "liburing.h"

# cffi's cdef parses C declarations, not the preprocessor: it gets the header without its `#` lines, except the
# #defines of plain integers (the feature bits), which it understands. struct iovec comes from <sys/uio.h>.
_INTEGER_DEFINE = re.compile(r"#define\s+\w+\s+\d+\b")


def cdef_from_header(text: str) -> str:
    lines = [line for line in text.splitlines()
             if not line.lstrip().startswith("#") or _INTEGER_DEFINE.match(line.lstrip())]
    return "struct iovec { void *iov_base; size_t iov_len; };\n" + "\n".join(lines)


def _find_liburing_header() -> bool:
    extra = [flag[2:] for flag in shlex.split(os.environ.get("IOKIT_CFLAGS", "")) if flag.startswith("-I")]
    from_env = [directory for directory in os.environ.get("CPATH", "").split(":") if directory]
    candidates = [*extra, *from_env, "/usr/include", "/usr/local/include"]
    return any((Path(directory) / LIBURING_HEADER).is_file() for directory in candidates)


if not _find_liburing_header():
    sys.exit(f"iokit: {LIBURING_HEADER} was not found, so the io_uring extension cannot be built.\n"
             f"Install liburing's development files: apt-get install liburing-dev (Debian/Ubuntu), "
             f"dnf install liburing-devel (Fedora).")

ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(Path("csrc/iokit_uring.h").read_text()))
ffibuilder.set_source(
    "iokit._uring_ffi",
    '#include "iokit_uring.h"',
    sources=["csrc/iokit_uring.c"],  # relative: setuptools runs this from the project's root
    include_dirs=["csrc"],
    libraries=["uring"],
    extra_compile_args=["-Wall", "-Wextra", "-O2", *shlex.split(os.environ.get("IOKIT_CFLAGS", ""))],
    extra_link_args=shlex.split(os.environ.get("IOKIT_LDFLAGS", "")),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
