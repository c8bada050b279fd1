"""Upload throughput with sync vs async durability, alone, concurrent and replicated, against
``examples/upload_server.py`` on each backend.

One client uploads a file of ``upload_mib`` MiB over one keep-alive connection, chunk after chunk (tus: a POST that
creates the upload, then one PATCH per chunk, each answered 204 once the server has taken it). With
``--durability sync`` the 204 waits for the chunk to be written and fdatasync'd; with ``async`` it goes out once the
bytes are in a server buffer and a flusher syncs every 200 ms. The gap between the two is what durability costs per
chunk, and how it shrinks with bigger chunks is what batching buys.

Three kinds of rows:

* one uploader (``durability``, ``chunk_kib``): the rows above;
* ``uploaders`` = 8: eight clients upload ``upload_mib`` MiB each at once, one connection each, and MiB/s is what they
  sent together over the time from the first PATCH to the last 204. In sync mode this is what a synchronous commit
  costs when many clients commit at once: the filesystem's journal commits their syncs together, so the aggregate
  should grow well past one uploader's (issue 15);
* ``replication`` = sync or async (issue 20): the primary (``--durability sync``) replicates every chunk to one replica,
  an upload server on the same backend and disk (``--durability sync --accept-replication``) pinned to the load core
  (the measured core holds the primary; the client and the replica share the other). Compare with the sync row of one
  uploader at the same chunk size. ``lag_ms_p50``/``lag_ms_max``/``lag_mib_max`` are the replica's lag as the
  primary's ``GET /stats`` reports it, sampled every 20 ms during the upload (async: seconds since the oldest chunk
  not yet shipped, bytes not yet confirmed; sync: always 0); ``replica_cpu_us_per_mib`` is the replica's CPU.

An operation is one acknowledged chunk: ops/s is chunks per second (the MiB/s are in the table), the latencies are those
of one PATCH (send the chunk, get the 204). The clients are a few lines of ``http.client`` in the harness process
(threads when there are several), pinned to the load core; the server's CPU is measured over the PATCHes only. Each
upload is deleted afterwards (tus termination), and each server's upload directory is removed when it stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import threading
import time
import urllib.parse

from .context import BenchRun
from .processes import ProcessGone, Server, python_child_environment
from .results import RunSample, percentile, summarize
from .servers import ServerSpec, example_server_specs, sweep

WORKLOAD = "upload"
EXAMPLE = "upload_server.py"
DURABILITIES = ("sync", "async")
CONCURRENT_UPLOADERS = 8
REPLICATION_MODES = ("sync", "async")
LAG_SAMPLE_SECONDS = 0.02
TUS_HEADERS = {"Tus-Resumable": "1.0.0"}


class UploadFailed(RuntimeError):
    pass


def configurations(run: BenchRun, durability: str) -> list[dict]:
    """One uploader, then ``CONCURRENT_UPLOADERS``, at each chunk size."""
    if not run.wants_workload(WORKLOAD):
        return []
    return [{"durability": durability, "chunk_kib": chunk, **({} if uploaders == 1 else {"uploaders": uploaders})}
            for uploaders in (1, CONCURRENT_UPLOADERS) for chunk in run.settings.upload_chunks_kib]


def replication_configurations(run: BenchRun, mode: str) -> list[dict]:
    if not run.wants_workload(WORKLOAD):
        return []
    return [{"durability": "sync", "chunk_kib": chunk, "replication": mode} for chunk in run.settings.upload_chunks_kib]


def planned(run: BenchRun) -> int:
    servers = len(example_server_specs(run, EXAMPLE))
    return servers * (sum(len(configurations(run, d)) for d in DURABILITIES)
                      + sum(len(replication_configurations(run, m)) for m in REPLICATION_MODES))


def _expect(response: http.client.HTTPResponse, status: int, what: str) -> None:
    body = response.read()
    if response.status != status:
        raise UploadFailed(f"{what}: {response.status} {body[:200]!r}")


class Uploader:
    """One client's upload: ``create`` it (POST), ``send`` its chunks (the timed part), ``finish`` (DELETE, close)."""

    def __init__(self, host: str, port: int, total_bytes: int, chunk_bytes: int):
        self.total_bytes, self.chunk_bytes = total_bytes, chunk_bytes
        self.connection = http.client.HTTPConnection(host, port, timeout=60)
        self.path = ""
        self.latencies: list[float] = []
        self.error: BaseException | None = None

    def create(self) -> None:
        self.connection.request("POST", "/files", headers={**TUS_HEADERS, "Upload-Length": str(self.total_bytes)})
        response = self.connection.getresponse()
        _expect(response, 201, "POST /files")
        self.path = urllib.parse.urlsplit(response.getheader("Location", "")).path

    def send(self) -> None:
        chunk = memoryview(os.urandom(self.chunk_bytes))
        for offset in range(0, self.total_bytes, self.chunk_bytes):
            body = chunk[:min(self.chunk_bytes, self.total_bytes - offset)]
            sent = time.perf_counter()
            self.connection.request("PATCH", self.path, body=body, headers={
                **TUS_HEADERS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
            _expect(self.connection.getresponse(), 204, f"PATCH at {offset}")
            self.latencies.append(time.perf_counter() - sent)

    def finish(self) -> None:
        try:
            if self.path:
                self.connection.request("DELETE", self.path, headers=TUS_HEADERS)
                self.connection.getresponse().read()
        finally:
            self.connection.close()


def upload_once(host: str, port: int, total_bytes: int, chunk_bytes: int) -> tuple[list[float], float]:
    """Upload ``total_bytes`` in chunks; return each PATCH's seconds and the seconds of all of them."""
    return upload_concurrently(host, port, 1, total_bytes, chunk_bytes)


def upload_concurrently(host: str, port: int, uploaders: int, total_bytes: int,
                        chunk_bytes: int) -> tuple[list[float], float]:
    """``uploaders`` clients upload ``total_bytes`` each at once, one connection and thread each; return every PATCH's
    seconds and the seconds from the first PATCH to the last 204 (the uploads are created before, deleted after)."""
    clients = [Uploader(host, port, total_bytes, chunk_bytes) for _ in range(uploaders)]
    try:
        for client in clients:
            client.create()
        start = threading.Barrier(uploaders + 1)

        def send(client: Uploader) -> None:
            try:
                start.wait()
                client.send()
            except BaseException as error:  # reported below, in the harness's thread
                client.error = error

        threads = [threading.Thread(target=send, args=(client,), daemon=True) for client in clients]
        for thread in threads:
            thread.start()
        start.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        for client in clients:
            if client.error is not None:
                raise client.error
        return [seconds for client in clients for seconds in client.latencies], elapsed
    finally:
        for client in clients:
            with contextlib.suppress(OSError, http.client.HTTPException):
                client.finish()


class LagSampler:
    """Samples the primary's ``GET /stats`` every ``LAG_SAMPLE_SECONDS`` in a thread while a block runs: the replica's
    lag in seconds and bytes."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.seconds: list[float] = []
        self.bytes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "LagSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            while not self._stop.wait(LAG_SAMPLE_SECONDS):
                connection.request("GET", "/stats")
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    continue
                for replica in json.loads(body)["replication"]["replicas"]:
                    self.seconds.append(replica["lag_seconds"])
                    self.bytes.append(replica["lag_bytes"])
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
            pass  # the figures are then those sampled so far
        finally:
            connection.close()


def run(run: BenchRun) -> None:
    settings = run.settings
    total_bytes = settings.upload_mib << 20

    def measure(server: Server, params: dict, replica: Server | None = None):
        chunk_bytes = params["chunk_kib"] << 10
        uploaders = params.get("uploaders", 1)
        upload_once(server.host, server.port, 8 * chunk_bytes, chunk_bytes)   # warm-up: files, buffers, the disk
        samples, lag_seconds, lag_bytes, replica_cpu_s = [], [], [], 0.0
        for _ in range(settings.runs):
            before = server.measure()
            replica_before = replica.measure() if replica is not None else None
            with LagSampler(server.host, server.port) if replica is not None else contextlib.nullcontext() as lag:
                latencies, elapsed = upload_concurrently(server.host, server.port, uploaders, total_bytes,
                                                         chunk_bytes)
            usage = server.measure() - before
            if replica is not None:
                replica_cpu_s += (replica.measure() - replica_before).cpu_s
                lag_seconds += lag.seconds
                lag_bytes += lag.bytes
            latencies_us = sorted(seconds * 1e6 for seconds in latencies)
            samples.append(RunSample(len(latencies), elapsed, percentile(latencies_us, 50),
                                     percentile(latencies_us, 99), usage))
        mib_per_s = sorted(uploaders * settings.upload_mib / sample.seconds for sample in samples)[len(samples) // 2]
        extra = {"mib_per_s": round(mib_per_s, 1), "upload_mib": settings.upload_mib, "uploaders": uploaders}
        if replica is not None:
            lag_seconds.sort()
            extra.update(lag_ms_p50=round(percentile(lag_seconds, 50) * 1e3, 1),
                         lag_ms_max=round(max(lag_seconds, default=0.0) * 1e3, 1),
                         lag_mib_max=round(max(lag_bytes, default=0) / (1 << 20), 2),
                         replica_cpu_us_per_mib=round(replica_cpu_s * 1e6 / (settings.runs * settings.upload_mib)))
        return summarize(WORKLOAD, server.name, params, samples, extra=extra)

    directories = []
    try:
        for durability in DURABILITIES:
            specs = [_with_directory(run, spec, f"{durability}", directories, "--durability", durability)
                     for spec in example_server_specs(run, EXAMPLE)]
            sweep(run, WORKLOAD, specs, configurations(run, durability), measure)
        for mode in REPLICATION_MODES:
            _replicated_sweep(run, mode, directories, measure)
    finally:
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)


def _with_directory(run: BenchRun, spec: ServerSpec, label: str, directories: list, *options: str) -> ServerSpec:
    """``spec`` with an upload directory of its own (``--dir``, removed at the end) and ``options``."""
    if spec.argv is None:
        return spec
    directory = run.settings.data_dir / f"uploads-{spec.name}-{label}"
    directories.append(directory)
    return dataclasses.replace(spec, argv=[*spec.argv, "--dir", str(directory), *options])


def _replicated_sweep(run: BenchRun, mode: str, directories: list, measure) -> None:
    """The replication rows of ``mode``: each backend's primary with a replica of its own on the same backend, the
    replica pinned to the load core (see the module docstring)."""
    configurations = replication_configurations(run, mode)
    if not configurations:
        return
    with contextlib.ExitStack() as stack:
        specs, replicas = [], {}
        for spec in example_server_specs(run, EXAMPLE):
            if spec.argv is not None:
                replica_spec = _with_directory(run, spec, f"replica-{mode}", directories, "--durability", "sync",
                                               "--accept-replication")
                try:
                    replica = stack.enter_context(Server(replica_spec.argv, run.cores.load, name=f"{spec.name} replica",
                                                         env=python_child_environment()))
                except (ProcessGone, OSError) as exc:
                    spec = dataclasses.replace(spec, argv=None, reason=f"its replica did not start: {exc}")
                else:
                    replicas[spec.name] = replica
                    spec = _with_directory(run, spec, f"primary-{mode}", directories, "--durability", "sync",
                                           "--replica", f"http://{replica.host}:{replica.port}", "--replication", mode)
            specs.append(spec)
        sweep(run, WORKLOAD, specs, configurations,
              lambda server, params: measure(server, params, replicas[server.name]))
