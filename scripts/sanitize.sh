#!/usr/bin/env bash
# Run the io_uring tests with our C under AddressSanitizer and UndefinedBehaviorSanitizer.
#
# Why: csrc/iokit_uring.c and csrc/iokit_engine.c hand the kernel raw pointers into Python buffers and indexes rings by hand; an off-by-one
# there corrupts memory silently. This rebuilds the extension in place with -fsanitize=address,undefined, runs the
# uring tests (and the uring part of the conformance tests, when they exist), then always rebuilds it normally.
#
# CPython itself is not instrumented, so the ASan runtime is preloaded (it must come first in the process);
# PYTHONMALLOC=malloc makes Python's own buffers plain malloc blocks that ASan can guard; leak detection is off
# because CPython keeps memory until exit by design. Any report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
SANITIZERS="-fsanitize=address,undefined"

rebuild() {  # quiet, but shows the compiler's warnings, and everything if the build fails
    local output
    output=$("$PYTHON" setup.py --quiet build_ext --inplace --force 2>&1) || { echo "$output" >&2; return 1; }
    grep -E ": (warning|error):" <<<"$output" || true
}

trap 'echo "sanitize: rebuilding the extension without sanitizers"; IOKIT_CFLAGS= IOKIT_LDFLAGS= rebuild' EXIT

echo "sanitize: building with $SANITIZERS"
IOKIT_CFLAGS="$SANITIZERS -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g" \
    IOKIT_LDFLAGS="$SANITIZERS" rebuild

for extension in iokit/_uring_ffi*.so iokit/_engine*.so; do
    if ! ldd "$extension" | grep libasan >/dev/null; then  # no -q: with pipefail, an early exit would fail ldd
        echo "sanitize: $extension does not link libasan: were IOKIT_CFLAGS/IOKIT_LDFLAGS ignored?" >&2
        exit 1
    fi
done

LIBASAN=$(gcc -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
    echo "sanitize: libasan.so not found (gcc -print-file-name=libasan.so); install gcc's libasan" >&2
    exit 1
fi

run_tests() {
    LD_PRELOAD="$LIBASAN" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    PYTHONMALLOC=malloc \
        "$PYTHON" -m pytest -q -p no:cacheprovider "$@"
}

run_tests tests/test_uring.py
# The conformance and runtime suites on the two backends the native engine drives.
run_tests tests/test_conformance.py tests/test_runtime.py tests/test_engine.py tests/test_protocols.py -k "uring or epoll"
echo "sanitize: clean"
