"""A small tus client for ``upload_server.py``: chunks a file, uploads it, resumes, and checks the sha256.

It uploads the file whole or as partial uploads joined by a final one, resumes after any interruption from the offset
the server reports, and checks the result's sha256 by downloading it.

    upload_client.py --port 8080 FILE                          one upload, chunk after chunk
    upload_client.py --port 8080 FILE --parts 3 --parallel 3   three partial uploads at once, then the final
    upload_client.py --port 8080 FILE --order 1,3,2            three partial uploads sent in that order, then the final
    upload_client.py --port 8080 FILE --resume /files/ID       finish an upload begun earlier
    upload_client.py --measure                                 sync vs async durability throughput on this machine
    upload_client.py --measure-replication                     no vs sync vs async replication (one local replica)

After a failed request (connection lost, server restarted, 409, 460, 5xx) it asks the server where the upload stands
(HEAD) and goes on from there, for up to ``--retry-seconds``. ``--failover HOST:PORT`` (repeatable) names servers to
turn to when the current one refuses connections: a replica that keeps the primary's upload ids
(``upload_server.py --accept-replication``), where the upload resumes at the same path. ``--ack-log FILE`` writes a line per acknowledged chunk
(``ack <unix time> <offset> <durable offset>``) and per resumption (``resume <unix time> <offset> <durable offset>``),
which is how the crash test knows what the server had promised. It prints one line:

    uploaded /files/ID bytes=67108864 sha256=... verified=yes elapsed=0.52s rate=123.4MiB/s

and exits 1 if the upload failed or the downloaded sha256 differs. It uses only the standard library (http.client).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TUS_VERSION = "1.0.0"
MIB = 1024 * 1024
DOWNLOAD_PIECE = MIB
RETRY_PAUSE = 0.1
SERVER_SCRIPT = Path(__file__).with_name("upload_server.py")
# Answers after which asking the server where the upload stands (HEAD) and going on can help.
RESUMABLE_STATUSES = {409, 423, 460, 500, 502, 503, 504}


class UploadFailed(Exception):
    """The server refused a request in a way retrying cannot fix (``status`` says which), or time ran out."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Server:
    """Where the server is, and how to reach it: one new keep-alive connection per worker. ``failovers`` are
    ``(host, port)`` of replicas to turn to, in order, when the current server refuses connections."""

    def __init__(self, host: str, port: int, timeout: float = 30.0, failovers: list[tuple[str, int]] = ()):
        self.host, self.port, self.timeout = host, port, timeout
        self._failovers = list(failovers)
        self._lock = threading.Lock()

    def connect(self) -> "TusConnection":
        return TusConnection(http.client.HTTPConnection(self.host, self.port, timeout=self.timeout))

    def fail_over(self, refused_port: int) -> bool:
        """The server at ``refused_port`` refused a connection: turn to the next failover, if there is one (and no
        other thread did already). Return ``True`` if the server changed."""
        with self._lock:
            if self.port != refused_port:
                return True
            if not self._failovers:
                return False
            self.host, self.port = self._failovers.pop(0)
            print(f"failing over to {self.host}:{self.port}", file=sys.stderr)
            return True


class TusConnection:
    """The tus requests, over one HTTP connection. Each returns what the server said or raises ``UploadFailed``
    (an unexpected status) or ``OSError`` / ``http.client.HTTPException`` (the connection)."""

    def __init__(self, connection: http.client.HTTPConnection):
        self.connection = connection

    def close(self) -> None:
        self.connection.close()

    def _request(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None,
                 expect: int = 204) -> http.client.HTTPResponse:
        self.connection.request(method, path, body=body, headers={"Tus-Resumable": TUS_VERSION, **headers})
        response = self.connection.getresponse()
        if response.status != expect:
            detail = response.read()[:300].decode(errors="replace")
            raise UploadFailed(f"{method} {path}: {response.status} {detail}", response.status)
        return response

    def create(self, length: int | None, metadata: dict[str, str], concat: str | None = None) -> str:
        """Create an upload (``length`` None for a final); return its path."""
        headers = {"Upload-Metadata": ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                                               for key, value in metadata.items())}
        if length is not None:
            headers["Upload-Length"] = str(length)
        if concat is not None:
            headers["Upload-Concat"] = concat
        response = self._request("POST", "/files", headers, expect=201)
        response.read()
        return response.headers["Location"]

    def head(self, path: str) -> tuple[int, int]:
        """Return the upload's (offset, durable offset)."""
        response = self._request("HEAD", path, {}, expect=200)
        response.read()
        return int(response.headers["Upload-Offset"]), int(response.headers.get("Iokit-Durable-Offset", -1))

    def patch(self, path: str, offset: int, data: bytes, checksum: str | None) -> tuple[int, int]:
        """Send ``data`` at ``offset``; return the new (offset, durable offset)."""
        headers = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)}
        if checksum:
            digest = hashlib.new(checksum, data).digest()
            headers["Upload-Checksum"] = f"{checksum} {base64.b64encode(digest).decode()}"
        response = self._request("PATCH", path, headers, data)
        response.read()
        return int(response.headers["Upload-Offset"]), int(response.headers.get("Iokit-Durable-Offset", -1))

    def sha256(self, path: str) -> str:
        """Download the finished upload at ``path`` and return its sha256 (hex)."""
        response = self._request("GET", path, {}, expect=200)
        digest = hashlib.sha256()
        while piece := response.read(DOWNLOAD_PIECE):
            digest.update(piece)
        return digest.hexdigest()


class AckLog:
    """``--ack-log``: one line per acknowledged chunk or resumption, flushed at once (the writer may be killed).
    With ``keep_times`` it also keeps each acknowledgement's monotonic time in ``ack_times`` (for ``--measure``)."""

    def __init__(self, path: str | None, keep_times: bool = False):
        self._file = open(path, "a", buffering=1) if path else None
        self._lock = threading.Lock()
        self.ack_times: list[float] | None = [] if keep_times else None

    def write(self, event: str, offset: int, durable: int) -> None:
        if self.ack_times is not None and event == "ack":
            self.ack_times.append(time.monotonic())
        if self._file is not None:
            with self._lock:
                self._file.write(f"{event} {time.time():.6f} {offset} {durable}\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def send(server: Server, path: str, source: str, start: int, length: int, arguments, log: AckLog) -> None:
    """Send bytes ``[start, start + length)`` of ``source`` into the upload at ``path``, resuming from the server's
    offset after any failure that retrying can fix, for up to ``--retry-seconds``. Raises ``UploadFailed``."""
    deadline = time.monotonic() + arguments.retry_seconds
    offset: int | None = None   # None: ask the server (HEAD)
    resumed = False
    with open(source, "rb") as file:
        while True:
            connection = server.connect()
            port = server.port
            try:
                if offset is None:
                    offset, durable = connection.head(path)
                    if resumed:
                        log.write("resume", offset, durable)
                while offset < length:
                    started = time.monotonic()
                    file.seek(start + offset)
                    data = file.read(min(arguments.chunk_size, length - offset))
                    offset, durable = connection.patch(path, offset, data, arguments.checksum)
                    log.write("ack", offset, durable)
                    if arguments.rate:
                        time.sleep(max(0.0, len(data) / (arguments.rate * MIB) - (time.monotonic() - started)))
                return
            except (OSError, http.client.HTTPException, UploadFailed) as error:
                if isinstance(error, UploadFailed) and error.status not in RESUMABLE_STATUSES:
                    raise
                if time.monotonic() > deadline:
                    raise UploadFailed(f"gave up on {path} after {arguments.retry_seconds} s: {error}") from error
                if isinstance(error, ConnectionRefusedError):
                    server.fail_over(port)
                print(f"{path}: {error}; asking the server where the upload stands", file=sys.stderr)
                offset, resumed = None, True
                time.sleep(RETRY_PAUSE)
            finally:
                connection.close()


def split(size: int, count: int) -> list[tuple[int, int]]:
    """Return ``count`` (start, length) ranges covering ``size`` bytes, as equal as can be."""
    bounds = [size * index // count for index in range(count + 1)]
    return [(bounds[index], bounds[index + 1] - bounds[index]) for index in range(count)]


def upload_file(server: Server, arguments, log: AckLog) -> str:
    """Upload ``arguments.file`` as the arguments say; return the path of the complete upload."""
    size = os.path.getsize(arguments.file)
    metadata = {"filename": os.path.basename(arguments.file)}
    order = parse_order(arguments)
    if not order:
        path = arguments.resume or request_once(server, TusConnection.create, size, metadata)
        send(server, path, arguments.file, 0, size, arguments, log)
        return path
    ranges = split(size, len(order))
    parts = [request_once(server, TusConnection.create, length, {}, "partial") for _, length in ranges]
    with concurrent.futures.ThreadPoolExecutor(max_workers=arguments.parallel) as pool:
        sending = [pool.submit(send, server, parts[number - 1], arguments.file, *ranges[number - 1], arguments, log)
                   for number in order]
        for future in sending:
            future.result()
    return request_once(server, TusConnection.create, None, metadata, "final;" + " ".join(parts))


def request_once(server: Server, method, *arguments):
    """Make one request on a connection of its own, closed after it: an idle connection left open would keep a
    restarted server's port busy (the killed server's end lingers in FIN-WAIT-2 until ours closes)."""
    connection = server.connect()
    try:
        return method(connection, *arguments)
    finally:
        connection.close()


def request_retrying(server: Server, retry_seconds: float, method, *arguments):
    """``request_once``, tried again for up to ``retry_seconds`` while the server cannot be reached (it may be
    restarting, or a failover may take over): the upload is done, the question asked of it must not be lost."""
    deadline = time.monotonic() + retry_seconds
    while True:
        port = server.port
        try:
            return request_once(server, method, *arguments)
        except (OSError, http.client.HTTPException) as error:
            if time.monotonic() > deadline:
                raise UploadFailed(f"gave up after {retry_seconds} s: {error}") from error
            if isinstance(error, ConnectionRefusedError):
                server.fail_over(port)
            time.sleep(RETRY_PAUSE)


def parse_order(arguments) -> list[int]:
    """Return the part numbers (1-based) in sending order: ``--order``, or 1..``--parts``; empty for one upload."""
    if arguments.order:
        order = [int(number) for number in arguments.order.split(",")]
        if sorted(order) != list(range(1, len(order) + 1)):
            raise SystemExit(f"--order must list 1..N once each, not {arguments.order}")
        return order
    return list(range(1, arguments.parts + 1)) if arguments.parts > 1 else []


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while piece := file.read(DOWNLOAD_PIECE):
            digest.update(piece)
    return digest.hexdigest()


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def run_upload(arguments) -> int:
    server = Server(arguments.host, arguments.port, failovers=[parse_address(text) for text in arguments.failover])
    log = AckLog(arguments.ack_log)
    started = time.monotonic()
    try:
        path = upload_file(server, arguments, log)
    except UploadFailed as error:
        print(f"upload failed: {error}", file=sys.stderr)
        return 1
    finally:
        log.close()
    elapsed = time.monotonic() - started
    size = os.path.getsize(arguments.file)
    expected = file_sha256(arguments.file)
    try:
        received = request_retrying(server, arguments.retry_seconds, TusConnection.sha256, path)
    except UploadFailed as error:
        print(f"could not verify {path}: {error}", file=sys.stderr)
        return 1
    verified = "yes" if received == expected else "NO"
    print(f"uploaded {path} bytes={size} sha256={received} verified={verified} elapsed={elapsed:.2f}s "
          f"rate={size / MIB / elapsed:.1f}MiB/s", flush=True)
    return 0 if received == expected else 1


# -- --measure: sync vs async durability ------------------------------------------------------------------------------

def start_server(backend: str, durability: str, directory: str, *flags: str) -> tuple[subprocess.Popen, int]:
    """Start ``upload_server.py`` on a free port; return the process and its port once it listens."""
    process = subprocess.Popen([sys.executable, str(SERVER_SCRIPT), "--backend", backend, "--port", "0",
                                "--dir", directory, "--durability", durability, *flags], stdout=subprocess.PIPE,
                               text=True)
    line = process.stdout.readline()
    found = re.search(r"listening on \S+:(\d+) ", line)
    if not found:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, int(found[1])


def measure_once(backend: str, durability: str, chunk_bytes: int, source: str, directory: str) -> tuple[float, float]:
    """Upload ``source`` once to a fresh server in ``directory``; return (total seconds, median seconds per chunk)."""
    process, port = start_server(backend, durability, directory)
    try:
        options = argparse.Namespace(file=source, chunk_size=chunk_bytes, checksum=None, rate=0, retry_seconds=0,
                                     resume=None, order=None, parts=1, parallel=1)
        log = AckLog(None, keep_times=True)
        started = time.monotonic()
        upload_file(Server("127.0.0.1", port), options, log)
        times = [started, *log.ack_times]
        return times[-1] - started, statistics.median(later - earlier for earlier, later in zip(times, times[1:]))
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def measurement_workspace(arguments, prefix: str):
    """Yield (a fresh directory under ``--measure-dir``, a random file of ``--measure-mib`` in it); removed after."""
    work = tempfile.mkdtemp(prefix=prefix, dir=arguments.measure_dir)  # a real disk: fsync must cost
    try:
        source = os.path.join(work, "source.bin")
        with open(source, "wb") as file:
            file.write(os.urandom(arguments.measure_mib * MIB))
        yield work, source
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sweep(arguments) -> list[tuple[str, int]]:
    """Return the (backend, chunk KiB) pairs that ``--backends`` and ``--chunk-kib`` ask to measure, in order."""
    return [(backend, int(size)) for backend in arguments.backends.split(",") for size in arguments.chunk_kib.split(",")]


def print_table_head(arguments, work: str, setup: str, columns: str) -> None:
    print(f"# {arguments.measure_mib} MiB per upload, one connection, {setup}medians of {arguments.repeat} runs, data "
          f"under {work} (kernel {os.uname().release})")
    print(f"{'backend':8} {'chunk':>7} {columns}")


def measure(arguments) -> int:
    """Upload one file to a server in each durability mode, for each backend and chunk size. Print the median MiB/s
    of ``--repeat`` runs, the median time per chunk (request to acknowledgement) and what sync adds to it."""
    with measurement_workspace(arguments, "upload-measure-") as (work, source):
        print_table_head(arguments, work, "", f"{'sync MiB/s':>10} {'async MiB/s':>11} {'sync ms/chunk':>13} "
                                              f"{'async ms/chunk':>14} {'sync adds':>9}")
        for backend, chunk_kib in sweep(arguments):
            figures = {}
            for durability in ("sync", "async"):
                runs = [measure_once(backend, durability, chunk_kib * 1024, source, os.path.join(work, durability))
                        for _ in range(arguments.repeat)]
                figures[durability] = (arguments.measure_mib / statistics.median(total for total, _ in runs),
                                       1000 * statistics.median(per_chunk for _, per_chunk in runs))
            (sync_rate, sync_ms), (async_rate, async_ms) = figures["sync"], figures["async"]
            print(f"{backend:8} {chunk_kib:>5}Ki {sync_rate:>10.1f} {async_rate:>11.1f} {sync_ms:>13.2f} "
                  f"{async_ms:>14.2f} {sync_ms - async_ms:>6.2f} ms", flush=True)
    return 0


# -- --measure-replication: none vs sync vs async replication ---------------------------------------------------------

REPLICATION_MODES = ("none", "sync", "async")
LAG_POLL_SECONDS = 0.05


class LagWatcher(threading.Thread):
    """Polls the primary's ``GET /stats`` while an upload runs; keeps the largest lag seen (bytes, seconds)."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.done = threading.Event()
        self.max_lag_bytes = 0
        self.max_lag_seconds = 0.0

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            while not self.done.wait(LAG_POLL_SECONDS):
                connection.request("GET", "/stats")
                replicas = json.loads(connection.getresponse().read())["replication"]["replicas"]
                self.max_lag_bytes = max(self.max_lag_bytes, *(replica["lag_bytes"] for replica in replicas))
                self.max_lag_seconds = max(self.max_lag_seconds, *(replica["lag_seconds"] for replica in replicas))
        finally:
            connection.close()


def measure_replication_once(backend: str, mode: str, chunk_bytes: int, source: str, work: str) -> dict:
    """Upload ``source`` once through a fresh primary (with one fresh replica unless ``mode`` is none); return the
    seconds, the acknowledgement latencies and the largest replica lag seen."""
    processes = []
    try:
        flags: list[str] = []
        if mode != "none":
            replica, replica_port = start_server(backend, "sync", os.path.join(work, "replica"),
                                                 "--accept-replication")
            processes.append(replica)
            flags = ["--replica", f"http://127.0.0.1:{replica_port}", "--replication", mode]
        primary, port = start_server(backend, "sync", os.path.join(work, "primary"), *flags)
        processes.append(primary)
        watcher = LagWatcher(port) if mode == "async" else None
        if watcher is not None:
            watcher.start()
        options = argparse.Namespace(file=source, chunk_size=chunk_bytes, checksum=None, rate=0, retry_seconds=0,
                                     resume=None, order=None, parts=1, parallel=1)
        log = AckLog(None, keep_times=True)
        started = time.monotonic()
        upload_file(Server("127.0.0.1", port), options, log)
        if watcher is not None:
            watcher.done.set()
            watcher.join()
        times = [started, *log.ack_times]
        latencies = sorted(later - earlier for earlier, later in zip(times, times[1:]))
        return {"seconds": times[-1] - started, "p50": latencies[len(latencies) // 2],
                "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
                "lag_bytes": watcher.max_lag_bytes if watcher else 0,
                "lag_seconds": watcher.max_lag_seconds if watcher else 0.0}
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait()
        shutil.rmtree(os.path.join(work, "primary"), ignore_errors=True)
        shutil.rmtree(os.path.join(work, "replica"), ignore_errors=True)


def measure_replication(arguments) -> int:
    """For each backend and chunk size: MiB/s (median of ``--repeat`` runs), p50/p99 acknowledgement latency and the
    largest lag of the replica, without replication and with one local replica in each mode (both servers
    ``--durability sync``, on the same disk)."""
    with measurement_workspace(arguments, "upload-replication-") as (work, source):
        print_table_head(arguments, work, "1 local replica, --durability sync on both, ",
                         f"{'mode':6} {'MiB/s':>7} {'vs none':>7} {'p50 ms':>7} {'p99 ms':>7} {'max lag':>10} "
                         f"{'max lag s':>9}")
        for backend, chunk_kib in sweep(arguments):
            baseline = None
            for mode in REPLICATION_MODES:
                runs = [measure_replication_once(backend, mode, chunk_kib * 1024, source, work)
                        for _ in range(arguments.repeat)]
                rate = arguments.measure_mib / statistics.median(run["seconds"] for run in runs)
                baseline = baseline or rate
                print(f"{backend:8} {chunk_kib:>5}Ki {mode:6} {rate:>7.1f} {rate / baseline:>6.2f}x "
                      f"{1000 * statistics.median(run['p50'] for run in runs):>7.2f} "
                      f"{1000 * statistics.median(run['p99'] for run in runs):>7.2f} "
                      f"{max(run['lag_bytes'] for run in runs) / MIB:>6.2f} MiB "
                      f"{max(run['lag_seconds'] for run in runs):>9.3f}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="the file to upload")
    parser.add_argument("--host", default="127.0.0.1", help="the server's address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="the server's port (default: 8000)")
    parser.add_argument("--chunk-size", type=int, default=4 * MIB, help="bytes per PATCH (default: 4 MiB)")
    parser.add_argument("--checksum", choices=["sha1", "md5"], help="send Upload-Checksum with each chunk")
    parser.add_argument("--parts", type=int, default=1, help="split into this many partial uploads, then join them")
    parser.add_argument("--order", help="send the partial uploads in this order, e.g. 1,3,2 (implies --parts)")
    parser.add_argument("--parallel", type=int, default=1, help="partial uploads sent at once (default: 1)")
    parser.add_argument("--resume", metavar="PATH", help="continue the upload at this path (/files/ID)")
    parser.add_argument("--retry-seconds", type=float, default=30.0,
                        help="keep resuming after failures for this long (default: 30)")
    parser.add_argument("--rate", type=float, default=0.0, help="send at most this many MiB/s (default: no limit)")
    parser.add_argument("--failover", action="append", default=[], metavar="HOST:PORT",
                        help="a replica to resume on when the server refuses connections (repeatable)")
    parser.add_argument("--ack-log", help="append a line per acknowledged chunk and per resumption to this file")
    parser.add_argument("--measure", action="store_true", help="measure sync vs async throughput (starts servers)")
    parser.add_argument("--measure-replication", action="store_true",
                        help="measure no replication vs sync vs async (one local replica; starts servers)")
    parser.add_argument("--measure-mib", type=int, default=32, help="--measure: upload size in MiB (default: 32)")
    parser.add_argument("--chunk-kib", default="64,256,1024,8192", help="--measure: chunk sizes in KiB")
    parser.add_argument("--repeat", type=int, default=5, help="--measure: runs per figure (the median is shown)")
    parser.add_argument("--backends", default="blocking,threads,epoll,uring", help="--measure: backends to run")
    parser.add_argument("--measure-dir", default=".", help="--measure: where the data goes (default: here, a disk)")
    arguments = parser.parse_args(argv)
    if arguments.measure:
        return measure(arguments)
    if arguments.measure_replication:
        return measure_replication(arguments)
    if arguments.file is None:
        parser.error("a file to upload is needed (or --measure)")
    return run_upload(arguments)


if __name__ == "__main__":
    sys.exit(main())
