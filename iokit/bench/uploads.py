"""Upload throughput with sync vs async durability, against ``examples/upload_server.py`` on each backend.

One client uploads a file of ``upload_mib`` MiB over one keep-alive connection, chunk after chunk (tus: a POST that
creates the upload, then one PATCH per chunk, each answered 204 once the server has taken it). With
``--durability sync`` the 204 waits for the chunk to be written and fdatasync'd; with ``async`` it goes out once the
bytes are in a server buffer and a flusher syncs every 200 ms. The gap between the two is what durability costs per
chunk, and how it shrinks with bigger chunks is what batching buys.

An operation is one acknowledged chunk: ops/s is chunks per second (the MiB/s are in the table), the latencies are those
of one PATCH (send the chunk, get the 204). The client is a few lines of ``http.client`` in the harness process,
pinned to the load core; the server's CPU is measured over the PATCHes only. Each upload is deleted afterwards
(tus termination), and each server's upload directory is removed when it stops.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import shutil
import time
import urllib.parse

from .context import BenchRun
from .processes import Server
from .results import RunSample, percentile, summarize
from .servers import example_server_specs, sweep

WORKLOAD = "upload"
EXAMPLE = "upload_server.py"
DURABILITIES = ("sync", "async")
TUS_HEADERS = {"Tus-Resumable": "1.0.0"}


class UploadFailed(RuntimeError):
    pass


def configurations(run: BenchRun, durability: str) -> list[dict]:
    if not run.wants_workload(WORKLOAD):
        return []
    return [{"durability": durability, "chunk_kib": chunk} for chunk in run.settings.upload_chunks_kib]


def planned(run: BenchRun) -> int:
    return sum(len(configurations(run, d)) * len(example_server_specs(run, EXAMPLE)) for d in DURABILITIES)


def _expect(response: http.client.HTTPResponse, status: int, what: str) -> None:
    body = response.read()
    if response.status != status:
        raise UploadFailed(f"{what}: {response.status} {body[:200]!r}")


def upload_once(host: str, port: int, total_bytes: int, chunk_bytes: int) -> tuple[list[float], float]:
    """Upload ``total_bytes`` in chunks; return each PATCH's seconds and the seconds of all of them."""
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.request("POST", "/files", headers={**TUS_HEADERS, "Upload-Length": str(total_bytes)})
        response = connection.getresponse()
        _expect(response, 201, "POST /files")
        path = urllib.parse.urlsplit(response.getheader("Location", "")).path
        chunk = memoryview(os.urandom(chunk_bytes))
        latencies = []
        started = time.perf_counter()
        for offset in range(0, total_bytes, chunk_bytes):
            body = chunk[:min(chunk_bytes, total_bytes - offset)]
            sent = time.perf_counter()
            connection.request("PATCH", path, body=body, headers={
                **TUS_HEADERS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
            _expect(connection.getresponse(), 204, f"PATCH at {offset}")
            latencies.append(time.perf_counter() - sent)
        elapsed = time.perf_counter() - started
        connection.request("DELETE", path, headers=TUS_HEADERS)
        connection.getresponse().read()
        return latencies, elapsed
    finally:
        connection.close()


def run(run: BenchRun) -> None:
    settings = run.settings
    total_bytes = settings.upload_mib << 20

    def measure(server: Server, params: dict):
        chunk_bytes = params["chunk_kib"] << 10
        upload_once(server.host, server.port, 8 * chunk_bytes, chunk_bytes)   # warm-up: files, buffers, the disk
        samples = []
        for _ in range(settings.runs):
            before = server.measure()
            latencies, elapsed = upload_once(server.host, server.port, total_bytes, chunk_bytes)
            latencies_us = sorted(seconds * 1e6 for seconds in latencies)
            samples.append(RunSample(len(latencies), elapsed, percentile(latencies_us, 50),
                                     percentile(latencies_us, 99), server.measure() - before))
        mib_per_s = sorted(settings.upload_mib / sample.seconds for sample in samples)[len(samples) // 2]
        return summarize(WORKLOAD, server.name, params, samples,
                         extra={"mib_per_s": round(mib_per_s, 1), "upload_mib": settings.upload_mib})

    for durability in DURABILITIES:
        directories = []
        specs = []
        for spec in example_server_specs(run, EXAMPLE):
            if spec.argv is not None:
                directory = settings.data_dir / f"uploads-{spec.name}-{durability}"
                directories.append(directory)
                spec = dataclasses.replace(spec, argv=[*spec.argv, "--dir", str(directory), "--durability", durability])
            specs.append(spec)
        try:
            sweep(run, WORKLOAD, specs, configurations(run, durability), measure)
        finally:
            for directory in directories:
                shutil.rmtree(directory, ignore_errors=True)
