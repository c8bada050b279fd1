"""The file workloads: 4 KiB random reads at queue depth 1 and 32, page-cache warm and with O_DIRECT; sequential 4 KiB
writes with an fsync after every write and after every 32. Each on every backend, next to fio (psync and io_uring
engines) and, for warm reads, a raw ``os.pread`` loop.

The batched read rows (``file-randread-batched``, queue depths ``BATCH_QUEUE_DEPTHS``) keep that many reads in flight as
``ops.read_batch`` ops: one op per batch, so Python's cost is paid per batch, not per read. Warm, one batch of all of
them (a page-cache read is a copy: what counts is the cost per call); O_DIRECT, four batches of a quarter each, so that
the device's queue never drains while the slowest read of a lone batch finishes (``batch_size``). Their references are
measured again in the same group (the ``os.pread`` loop for warm rows, fio's io_uring engine at that depth), so each
row's ratio is to a reference measured minutes, not an hour, apart.

What these rows are meant to show, both ways: with a warm page cache a read is a memory copy of ~1 us, so any machinery
around it (a completion queue, a thread hand-off, an op object) is pure overhead and a plain ``pread`` is hard to beat;
with O_DIRECT each read waits for the device, and what counts is how many reads one thread keeps in flight, which is
where io_uring's queue depth pays. fsync-bound writes show what batching durability buys.

Every configuration runs in a fresh child process (``file_worker.py``, or fio), pinned to the measured core, one engine
after the other for the same configuration so that the rows being compared were measured close together.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
from pathlib import Path

from .context import BenchRun
from .fio import FioFailed, engine_supported, fio_available, fio_command, run_fio
from .processes import Usage, pinned_to, python_child_environment, python_module_command
from .results import RunSample, summarize

NAME = "file"
WORKLOADS = ("file-randread", "file-randread-batched", "file-write")
READ_WORKLOADS = ("file-randread", "file-randread-batched")
# The references each row is compared with in the table (when measured).
RATIO_REFERENCES = {"file-randread": ("ref:fio-io_uring", "ref:pread"),
                    "file-randread-batched": ("ref:fio-io_uring", "ref:pread"), "file-write": ("ref:fio-psync",)}
CHUNK = 1 << 20
BATCH_QUEUE_DEPTHS = (1, 8, 32, 128)


def configurations(run: BenchRun) -> list[tuple[str, dict]]:
    settings = run.settings
    reads = [("file-randread", {"cache": cache, "queue_depth": depth})
             for cache in ("warm", "direct") for depth in settings.queue_depths]
    reads += [("file-randread-batched", {"cache": cache, "queue_depth": depth, "batch": batch_size(cache, depth)})
              for cache in ("warm", "direct") for depth in BATCH_QUEUE_DEPTHS]
    writes = [("file-write", {"fsync_every": every}) for every in settings.fsync_every]
    return [(workload, params) for workload, params in reads + writes if run.wants_workload(workload)]


def batch_size(cache: str, queue_depth: int) -> int:
    """Blocks per batch in a batched row (see the module's docstring)."""
    return queue_depth if cache == "warm" else max(1, queue_depth // 4)


def engines_for(run: BenchRun, workload: str, params: dict) -> list[str]:
    """Our backends, then the references that make sense for this configuration."""
    references = []
    if workload in READ_WORKLOADS:
        batched = workload == "file-randread-batched"
        if params["cache"] == "warm" and (params["queue_depth"] == 1 or batched):
            references.append("pread")       # a batched row's target is a ratio to it
        if params["queue_depth"] == 1 and not batched:
            references.append("fio-psync")   # synchronous: a deeper queue would be the same measurement
        references.append("fio-io_uring")
    else:
        references += ["fio-psync", "fio-io_uring"]
    return list(run.backends) + [f"ref:{name}" for name in references if run.wants_reference(name)]


def planned(run: BenchRun) -> int:
    return sum(len(engines_for(run, workload, params)) for workload, params in configurations(run))


def prepare_read_file(path: Path, size: int, note) -> None:
    """A file of ``size`` bytes of real (non-sparse) data; reused when one of that size is already there."""
    if path.exists() and path.stat().st_size == size:
        return
    note(f"  creating the {size >> 20} MiB read file {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    block = bytearray(os.urandom(CHUNK))
    with open(partial, "wb") as out:
        for index in range(size // CHUNK):
            block[:8] = index.to_bytes(8, "little")   # no two chunks alike
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as source:
        while source.read(CHUNK):
            pass


def direct_io_refusal(path: Path) -> str | None:
    """Why O_DIRECT reads cannot run on ``path``'s file system, or None when they can."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        return f"{path.parent} refuses O_DIRECT ({exc.strerror})"
    try:
        os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
    except OSError as exc:
        return f"{path.parent} refuses O_DIRECT reads ({exc.strerror})"
    finally:
        os.close(fd)
    return None


def _worker_samples(run: BenchRun, spec: dict) -> list[RunSample]:
    settings = run.settings
    spec = dict(spec, warmup_s=settings.warmup_s, run_s=settings.run_s, runs=settings.runs)
    timeout = settings.warmup_s + settings.runs * settings.run_s + 60
    completed = subprocess.run(python_module_command("iokit.bench.file_worker", json.dumps(spec)),
                               capture_output=True, text=True, timeout=timeout, env=python_child_environment(),
                               preexec_fn=pinned_to(run.cores.measured))
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr.strip().splitlines()[-1] if completed.stderr.strip()
                           else f"exit status {completed.returncode}")
    samples = []
    for line in completed.stdout.splitlines():
        data = json.loads(line)
        samples.append(RunSample(data["ops"], data["seconds"], data["p50_us"], data["p99_us"],
                                 Usage(data["cpu_s"], data["context_switches"], data["peak_rss_kib"])))
    return samples


def _fio_samples(run: BenchRun, engine: str, workload: str, params: dict, path: Path, size: int) -> list[RunSample]:
    fio = fio_available()
    if fio is None:
        raise LookupError("fio is not installed (apt-get install fio)")
    if not engine_supported(fio, engine):
        raise LookupError(f"this fio has no {engine} engine")
    settings = run.settings
    samples = []
    for index in range(settings.runs):
        command = fio_command(fio, path=path, kind="randread" if workload in READ_WORKLOADS else "write",
                              engine=engine, queue_depth=1 if workload == "file-write" else params["queue_depth"],
                              direct=params.get("cache") == "direct", fsync_every=params.get("fsync_every", 0),
                              size_bytes=size, runtime_s=settings.run_s,
                              ramp_s=settings.warmup_s if index == 0 else 0)
        samples.append(run_fio(command, run.cores.measured))
    return samples


def run(run: BenchRun) -> None:
    settings = run.settings
    if not configurations(run):
        return
    read_path = settings.data_dir / f"randread-{settings.file_size_mib}MiB.dat"
    write_path = settings.data_dir / "seqwrite.dat"
    read_size = settings.file_size_mib << 20
    prepare_read_file(read_path, read_size, run.progress.note)
    direct_refusal = direct_io_refusal(read_path)
    warm_page_cache(read_path)
    for workload, params in configurations(run):
        for engine in engines_for(run, workload, params):
            run.progress.step(f"{workload} {' '.join(f'{k}={v}' for k, v in params.items())} on {engine}")
            if params.get("cache") == "direct" and direct_refusal:
                run.skip(workload, engine, direct_refusal, params)
                continue
            try:
                if engine.startswith("ref:fio-"):
                    path, size = (read_path, read_size) if workload in READ_WORKLOADS else (write_path, 256 << 20)
                    samples = _fio_samples(run, engine[len("ref:fio-"):], workload, params, path, size)
                elif workload in READ_WORKLOADS:
                    samples = _worker_samples(run, {"engine": engine, "kind": "randread", "path": str(read_path),
                                                    "direct": params["cache"] == "direct",
                                                    "queue_depth": params["queue_depth"],
                                                    "batched": workload == "file-randread-batched",
                                                    "batch": params.get("batch")})
                else:
                    samples = _worker_samples(run, {"engine": engine, "kind": "write", "path": str(write_path),
                                                    "fsync_every": params["fsync_every"]})
            except (LookupError, FioFailed, RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                run.skip(workload, engine, str(exc), params)
                continue
            run.record(summarize(workload, engine, params, samples,
                                 extra={"file_mib": settings.file_size_mib if workload in READ_WORKLOADS else None}))
    write_path.unlink(missing_ok=True)

