#!/usr/bin/env bash
# Run the io_uring tests under valgrind's memcheck and say what it found in *our* C.
#
# Why: csrc/iokit_uring.c allocates the ring, the provided-buffer rings and the reap arrays, and hands the kernel
# pointers into them; a leak or an access one past an array's end there is invisible to the Python tests. ASan
# (scripts/sanitize.sh) needs a rebuild; memcheck checks the extension exactly as it is built and installed.
#
# How: PYTHONMALLOC=malloc makes every Python object a plain malloc block that memcheck tracks (pymalloc's arenas would
# hide them and report false invalid reads); Debian's python3.supp, when installed, silences CPython's known noise.
# CPython keeps much memory until exit on purpose, so only *definite* leaks count, and only errors whose stack passes
# through our extension (iokit_uring.c, _uring_ffi*.so) are ours; the rest (CPython, cffi, libc) is counted apart.
# The kernel writes completions and received bytes into our memory without a syscall memcheck can see, so a read of
# such bytes may show as "uninitialised"; those are listed, not counted as our bugs, unless their origin is our C.
#
# valgrind 3.19 runs one guest thread at a time and does not treat io_uring_enter as a call that may block: a wait
# holds valgrind's lock until the kernel returns, so another thread cannot run and a signal is delivered only after
# the wait. Three tests depend on exactly that and are left out by default: test_wakeup_from_another_thread (waits
# forever for another thread: deadlock), test_signal_during_wait_is_retried_within_the_timeout (its SIGALRM arrives
# after it restored the default action, which kills the run) and test_recv_multishot_until_end_of_stream (its sender
# thread runs only between waits and misses the test's 5 s deadline; the failed test then leaves its ring unclosed,
# which memcheck rightly calls a leak from iokit_ring_open). The wakeup path itself (an eventfd write) and waits with
# timeouts are exercised by the other tests. For the same reason pytest-timeout is off (its own SIGALRM would land
# late, in another test); `timeout` bounds the whole run instead.
#
#   scripts/valgrind_uring.sh                 tests/test_uring.py but those three (about 2 minutes on 2 vCPUs)
#   scripts/valgrind_uring.sh -k multishot    a subset instead (any pytest arguments replace the default -k)
#
# Exit status: 0 when our C has no definite leak and no invalid access, 1 otherwise (or when the tests fail).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
LOG=${VALGRIND_LOG:-${TMPDIR:-/tmp}/valgrind-uring.log}
OURS='iokit_uring|_uring_ffi'

suppressions=()
for candidate in /usr/lib/valgrind/python3.supp /usr/lib/x86_64-linux-gnu/valgrind/python3.supp; do
    [ -f "$candidate" ] && suppressions+=("--suppressions=$candidate")
done

selection=("$@")
[ ${#selection[@]} -eq 0 ] && selection=(-k "not wakeup_from_another_thread and not signal_during_wait and not recv_multishot_until_end_of_stream")

echo "valgrind_uring: memcheck over tests/test_uring.py ${selection[*]} (log: $LOG, suppressions: ${suppressions[*]:-none})"
started=$(date +%s)
set +e
PYTHONMALLOC=malloc timeout 3600 valgrind --tool=memcheck --log-file="$LOG" --num-callers=40 --error-limit=no \
    --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
    --track-origins=no "${suppressions[@]}" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -p no:timeout -o addopts="" tests/test_uring.py "${selection[@]}"
tests_status=$?
echo "valgrind_uring: tests exited $tests_status after $(( $(date +%s) - started )) s"

# memcheck writes each error as a block of lines "==PID== ..." ended by an empty "==PID== " line. Classify each block
# by its first line, and call it ours when any frame of its stack is in our extension.
"$PYTHON" - "$LOG" "$OURS" <<'SUMMARY'
import re
import sys

log_path, ours_pattern = sys.argv[1], re.compile(sys.argv[2])
KINDS = {"Invalid read": "invalid read", "Invalid write": "invalid write", "Invalid free": "invalid free",
         "Mismatched free": "invalid free", "Conditional jump": "uninitialised value",
         "Use of uninitialised": "uninitialised value", "Syscall param": "syscall param",
         "definitely lost": "definite leak", "Source and destination overlap": "overlap"}

blocks, current = [], []
with open(log_path, errors="replace") as log:
    for line in log:
        text = re.sub(r"^==\d+== ?", "", line.rstrip("\n"))
        if text:
            current.append(text)
        elif current:
            blocks.append(current)
            current = []
if current:
    blocks.append(current)

counts = {"ours": {}, "module init": {}, "elsewhere": {}}
# cffi's module initialisation (PyInit__uring_ffi -> _cffi_init -> _cffi_backend) allocates the module's type objects
# once and keeps them for the life of the process: memcheck calls that "definitely lost", but it is neither our C nor
# a leak that grows.
MODULE_INIT = re.compile(r"_cffi_init|PyInit__uring_ffi")
shown = []
for block in blocks:
    kind = next((name for marker, name in KINDS.items() if marker in block[0]), None)
    if kind is None:
        continue
    our_frames = [line for line in block if ours_pattern.search(line)]
    if not our_frames:
        where = "elsewhere"
    elif all(MODULE_INIT.search(line) for line in our_frames):
        where = "module init"
    else:
        where = "ours"
    counts[where][kind] = counts[where].get(kind, 0) + 1
    if where == "ours":
        shown.append(block)

summary = [line for block in blocks for line in block if line.startswith(("ERROR SUMMARY", "definitely lost"))]
print("valgrind_uring: memcheck says:", *(f"  {line}" for line in summary), sep="\n")
LABELS = {"ours": "in our C (iokit_uring.c, _uring_ffi)", "module init": "in cffi's one-time module init",
          "elsewhere": "outside our C (CPython, cffi, libc)"}
for where, label in LABELS.items():
    found = ", ".join(f"{count} {kind}" for kind, count in sorted(counts[where].items())) or "nothing"
    print(f"valgrind_uring: {label}: {found}")
for block in shown:
    print("\n".join(["---", *block[:25]]))
serious = sum(count for kind, count in counts["ours"].items() if kind != "uninitialised value")
sys.exit(1 if serious else 0)
SUMMARY
summary_status=$?
[ "$tests_status" -eq 0 ] && [ "$summary_status" -eq 0 ]
