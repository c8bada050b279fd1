"""The file workloads' measuring loops, run in a child process of the harness, one process per configuration.

    python -m iokit.bench.file_worker '{"engine": "uring", "kind": "randread", ...}'

prints one JSON line per timed run: ``{"ops", "seconds", "p50_us", "p99_us", "cpu_s", "context_switches",
"peak_rss_kib"}``.

Why a child process: it is pinned to one core like fio (the harness pins it), its resource counters are its own
(``getrusage(RUSAGE_SELF)`` covers every thread, including worker threads that have exited), its peak RSS is the
configuration's, and a crash in a C extension costs one row, not the run.

The loops drive the Backend API directly, the way a batched-I/O script would: ``submit_many`` keeps QUEUE_DEPTH ops
in flight, ``wait()`` collects whatever completed, and each completion is replaced at once by a new op on the same
buffer. Latency is from the moment an op was handed to ``submit_many`` to the moment ``wait()`` returned it, taken with
one clock read per batch. The raw ``os.pread`` loop (``ref:pread``) reads the clock the same way, so the difference is
what the abstraction costs.

The batched rows (``"batched": true``) keep QUEUE_DEPTH reads in flight as ``ops.read_batch`` ops of BATCH blocks
each, and replace each batch as soon as it completes; each of its reads counts as an op, with the batch's latency
(its submission to its completion). The offsets come from the same random list as the single-op rows', cut into batches beforehand, as the
``os.pread`` loop draws its offsets from that list.

For writes, an op's latency is the time until it is *durable*: from the submission of its batch of FSYNC_EVERY writes
to the completion of the fsync that follows them (fio's write rows, by contrast, time each write alone).
"""

from __future__ import annotations

import array
import itertools
import json
import mmap
import os
import random
import resource
import sys
import time

BLOCK = 4096
WRITE_WRAP_BYTES = 256 * 2**20   # sequential writes start over at the file's start past this, as fio's size= does
# After a wait() that returned many completions, the replacements go out REFILL_BATCH at a time rather than all at the
# end, so that the device is not left with a shallow queue while Python builds the rest (uring, QD32, O_DIRECT, side by
# side with fio on our machine: 0.65-0.72x fio's rate with the whole batch at the end, 0.80-0.84x with 8 at a time).
REFILL_BATCH = 8


class TimedRuns:
    """Warm-up, then RUNS timed runs of RUN_S seconds. The loop appends latencies to ``latencies_ns`` and calls
    ``tick(now)`` after each batch; at a boundary the run just ended is printed (the warm-up's figures are dropped)."""

    def __init__(self, warmup_s: float, run_s: float, runs: int):
        self.run_ns = int(run_s * 1e9)
        self.runs_left = runs
        self.in_warmup = True
        self.latencies_ns: list[int] = []
        self._restart(time.perf_counter_ns(), int(warmup_s * 1e9))

    def _restart(self, now: int, length_ns: int) -> None:
        self.start = now
        self.boundary = now + length_ns
        self.latencies_ns.clear()
        self.usage = resource.getrusage(resource.RUSAGE_SELF)

    def tick(self, now: int) -> bool:
        """Returns False once the last timed run has been printed."""
        if now < self.boundary:
            return True
        if not self.in_warmup:
            self._emit((now - self.start) / 1e9)
            self.runs_left -= 1
        self.in_warmup = False
        self._restart(now, self.run_ns)
        return self.runs_left > 0

    def _emit(self, seconds: float) -> None:
        now = resource.getrusage(resource.RUSAGE_SELF)
        values = sorted(self.latencies_ns)

        def percentile_us(percent: float) -> float:
            if not values:
                return 0.0
            return values[min(len(values) - 1, max(0, -(-len(values) * percent // 100) - 1))] / 1000

        cpu = (now.ru_utime - self.usage.ru_utime) + (now.ru_stime - self.usage.ru_stime)
        switches = (now.ru_nvcsw - self.usage.ru_nvcsw) + (now.ru_nivcsw - self.usage.ru_nivcsw)
        print(json.dumps({"ops": len(values), "seconds": seconds, "p50_us": percentile_us(50),
                          "p99_us": percentile_us(99), "cpu_s": cpu, "context_switches": switches,
                          "peak_rss_kib": now.ru_maxrss}), flush=True)


def random_offsets(file_size: int, count: int = 1 << 16, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    blocks = file_size // BLOCK
    return [rng.randrange(blocks) * BLOCK for _ in range(count)]


def aligned_buffers(count: int) -> tuple[mmap.mmap, list[memoryview]]:
    """COUNT page-aligned 4 KiB buffers (O_DIRECT needs the alignment; anonymous mmap gives it)."""
    memory = mmap.mmap(-1, count * BLOCK)
    view = memoryview(memory)
    return memory, [view[i * BLOCK:(i + 1) * BLOCK] for i in range(count)]


def _check(op) -> None:
    if op.result != BLOCK:
        raise OSError(f"{op!r}: expected {BLOCK} bytes (a short transfer or -errno)")


def backend_random_reads(backend, fd: int, queue_depth: int, offsets: list[int], runs: TimedRuns) -> None:
    from .. import ops
    next_offset = itertools.cycle(offsets).__next__
    clock = time.perf_counter_ns
    _memory, buffers = aligned_buffers(queue_depth)
    latencies = runs.latencies_ns
    now = clock()
    batch = []
    for buffer in buffers:
        op = ops.read_at(fd, buffer, next_offset())
        op.user_data = now
        batch.append(op)
    backend.submit_many(batch)
    while True:
        done = backend.wait()
        now = clock()
        if not runs.tick(now):
            break
        batch = []
        for op in done:
            _check(op)
            latencies.append(now - op.user_data)
            new = ops.read_at(fd, op.buffer, next_offset())
            new.user_data = now
            batch.append(new)
            if len(batch) == REFILL_BATCH:
                backend.submit_many(batch)
                batch = []
        if batch:
            backend.submit_many(batch)
    backend.close()   # cancels and drains what is still in flight before the buffers go


def backend_batched_reads(backend, fd: int, queue_depth: int, batch_size: int, offsets: list[int],
                          runs: TimedRuns) -> None:
    from .. import ops
    batches = [array.array("q", offsets[start:start + batch_size])
               for start in range(0, len(offsets) - batch_size + 1, batch_size)]
    next_batch = itertools.cycle(batches).__next__
    clock = time.perf_counter_ns
    memory, _blocks = aligned_buffers(queue_depth)
    view = memoryview(memory)
    latencies = runs.latencies_ns
    repeat = itertools.repeat
    now = clock()
    for start in range(0, queue_depth, batch_size):  # QD / batch_size batches in flight, each in its own buffer
        op = ops.read_batch(fd, view[start * BLOCK:(start + batch_size) * BLOCK], next_batch())
        op.user_data = now
        backend.submit(op)   # uring: queued, and submitted by the enter of the wait that follows
    while True:
        done = backend.wait()
        now = clock()
        if not runs.tick(now):
            break
        for op in done:
            if op.result != batch_size or op.results.count(BLOCK) != batch_size:
                raise OSError(f"{op!r}: expected {batch_size} blocks of {BLOCK} bytes, got {list(op.results)}")
            latencies.extend(repeat(now - op.user_data, batch_size))
            new = ops.read_batch(fd, op.buffer, next_batch())
            new.user_data = now
            backend.submit(new)
    backend.close()


def raw_pread_loop(fd: int, offsets: list[int], runs: TimedRuns) -> None:
    next_offset = itertools.cycle(offsets).__next__
    clock = time.perf_counter_ns
    pread = os.pread
    latencies = runs.latencies_ns
    now = clock()
    while runs.tick(now):
        start = clock()
        if len(pread(fd, BLOCK, next_offset())) != BLOCK:
            raise OSError("short read")
        now = clock()
        latencies.append(now - start)


def _wait_for(backend, count: int) -> None:
    while count:
        for op in backend.wait():
            if op.result < 0:
                op.value()   # raises the OSError
            count -= 1


def backend_sequential_writes(backend, fd: int, fsync_every: int, runs: TimedRuns) -> None:
    from .. import ops
    clock = time.perf_counter_ns
    _memory, (block,) = aligned_buffers(1)
    block[:] = bytes(range(256)) * (BLOCK // 256)
    offset = 0
    now = clock()
    while runs.tick(now):
        start = clock()
        backend.submit_many([ops.write_at(fd, block, offset + i * BLOCK) for i in range(fsync_every)])
        _wait_for(backend, fsync_every)
        backend.submit(ops.fsync(fd))
        _wait_for(backend, 1)
        now = clock()
        runs.latencies_ns.extend([now - start] * fsync_every)
        offset = (offset + fsync_every * BLOCK) % WRITE_WRAP_BYTES
    backend.close()


def main(spec: dict) -> None:
    runs = TimedRuns(spec["warmup_s"], spec["run_s"], spec["runs"])
    engine = spec["engine"]
    if spec["kind"] == "randread":
        flags = os.O_RDONLY | (os.O_DIRECT if spec["direct"] else 0)
        fd = os.open(spec["path"], flags)
        offsets = random_offsets(os.fstat(fd).st_size)
        if engine == "ref:pread":
            raw_pread_loop(fd, offsets, runs)
        elif spec.get("batched"):
            from .. import open_backend
            backend_batched_reads(open_backend(engine), fd, spec["queue_depth"], spec["batch"], offsets, runs)
        else:
            from .. import open_backend
            backend_random_reads(open_backend(engine), fd, spec["queue_depth"], offsets, runs)
    else:
        fd = os.open(spec["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        from .. import open_backend
        backend_sequential_writes(open_backend(engine), fd, spec["fsync_every"], runs)
    os.close(fd)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
