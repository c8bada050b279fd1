# Two extensions: the cffi module (iokit._uring_ffi; setuptools reads cffi's `cffi_modules` only from setup.py, so this
# file stays) and the native engine (iokit._engine), a CPython C-API module: the engine resumes coroutines and builds
# `bytes` per message, which cffi cannot do without a Python callback per call. Both compile csrc/iokit_uring.c and
# share one ring (see csrc/iokit_ring_internal.h). IOKIT_CFLAGS/IOKIT_LDFLAGS add flags (scripts/sanitize.sh).
import os
import shlex

from setuptools import Extension, setup

engine = Extension(
    "iokit._engine",
    sources=["csrc/iokit_engine.c", "csrc/iokit_uring.c"],
    include_dirs=["csrc"],
    libraries=["uring"],
    extra_compile_args=["-Wall", "-Wextra", "-Wno-missing-field-initializers", "-O2",
                        *shlex.split(os.environ.get("IOKIT_CFLAGS", ""))],
    extra_link_args=shlex.split(os.environ.get("IOKIT_LDFLAGS", "")),
)

setup(cffi_modules=["build_ffi.py:ffibuilder"], ext_modules=[engine])
