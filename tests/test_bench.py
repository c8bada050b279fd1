"""The benchmark harness itself (``python -m iokit.bench``): a tiny run of every workload on every backend yields
well-formed JSON, a table and readable PNG plots; the C programs build without a warning; the pieces that turn numbers
into rows do what the docs say.

No speed is asserted anywhere: this machine is shared and noisy, and the bench exists to *report* speed. The tiny run
uses runs of 0.1 s, two connection counts, one message size, an 8 MiB file, a 1 MiB upload and half a second of
updates; it checks shape, not figures. Its ``http`` rows are the slowest part (wrk runs last whole seconds, and each of
the eight servers is warmed for a second per request kind), so the whole module takes two to three minutes.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

import iokit
from iokit.bench import cbuild, http_load, processes, servers
from iokit.bench.http_refs import REQUIRES
from iokit.bench.report import describe_params, format_rate
from iokit.bench.results import RunSample, percentile, summarize
from iokit.bench.processes import Usage

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(480)   # the tiny run takes about two minutes; a backend failing slowly adds more
REQUIRED_NUMBERS = ("ops_per_s", "p50_us", "p99_us", "cpu_s", "cpu_us_per_op", "context_switches", "peak_rss_kib")
MACHINE_FIELDS = ("date", "command", "kernel", "cpu_model", "cpus", "python", "liburing", "pinning")
AVAILABLE_BACKENDS = [info.name for info in iokit.backends() if info.available]


EXAMPLE_WORKLOADS = {"http": ("http_server.py",), "held-long-polls": ("jobs_server.py",), "upload": ("upload_server.py",),
                     "updates": ("jobs_server.py", "push_server.py")}
PLOTS = {"echo": "echo", "file": "file-randread", "waiting": "waiting-clients", "http": "http", "upload": "upload",
         "updates": "updates"}


def _example_present(workload: str) -> bool:
    return all((ROOT / "examples" / name).exists() for name in EXAMPLE_WORKLOADS[workload])


def _workloads_expected() -> list[str]:
    return (["file-randread", "file-write", "echo", "waiting-clients"]
            + [workload for workload in EXAMPLE_WORKLOADS if _example_present(workload)])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of everything; returns (completed process, parsed JSON, output directory)."""
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "iokit.bench", "--quick", "--warmup-seconds", "0.05", "--run-seconds", "0.1",
               "--runs", "1", "--connections", "1,8", "--message-sizes", "64", "--file-size-mib", "8",
               "--idle-clients", "16", "--upload-mib", "1", "--upload-chunks-kib", "256", "--update-clients", "4",
               "--update-rate", "8", "--updates-seconds", "0.5", "--data-dir", str(out / "data"), "--json", str(out / "bench.json"),
               "--plot", str(out / "bench.png")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), IOKIT_BENCH_CACHE=str(out / "cache"))
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, f"bench failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed, json.loads((out / "bench.json").read_text()), out


def test_prints_the_machine_and_a_table(tiny_run):
    completed, _, _ = tiny_run
    first_lines = completed.stdout.splitlines()[:3]
    assert "kernel" in first_lines[0]
    assert "liburing" in first_lines[1] and ("pinned" in first_lines[2] or "one CPU" in first_lines[2])
    for workload in _workloads_expected():
        assert f"== {workload}:" in completed.stdout
    assert "ops/s" in completed.stdout and "p99 us" in completed.stdout
    assert "done:" in completed.stderr   # the progress display finished


def test_json_holds_the_machine_and_well_formed_results(tiny_run):
    _, data, _ = tiny_run
    for field in MACHINE_FIELDS:
        assert data["machine"].get(field) not in (None, ""), field
    assert data["results"], "no result at all"
    keys = set()
    for result in data["results"]:
        assert isinstance(result["workload"], str) and isinstance(result["backend"], str)
        assert isinstance(result["params"], dict) and result["params"]
        for name in REQUIRED_NUMBERS:
            assert isinstance(result[name], (int, float)) and result[name] >= 0, (name, result)
        assert result["ops_per_s"] > 0, result
        assert result["p50_us"] <= result["p99_us"] or result["p99_us"] == 0, result
        key = (result["workload"], result["backend"], json.dumps(result["params"], sort_keys=True))
        assert key not in keys, f"two results for {key}"
        keys.add(key)
    for skipped in data["skipped"]:
        assert skipped["reason"], skipped


def test_every_workload_ran_on_every_available_backend(tiny_run):
    _, data, _ = tiny_run
    measured = {(r["workload"], r["backend"]) for r in data["results"]}
    missing = [(workload, backend) for workload in _workloads_expected() for backend in AVAILABLE_BACKENDS
               if (workload, backend) not in measured]
    reasons = {(s["workload"], s["backend"]): s["reason"] for s in data["skipped"]}
    assert not missing, [(pair, reasons.get(pair, "no reason recorded")) for pair in missing]


def test_waiting_rows_report_memory_per_waiting_client(tiny_run):
    # The tiny run holds 16 idle echo clients and 16 long polls: each row with some held must have held them all and
    # say what one costs (a figure, not its size: RSS moves by whole pages, so 16 clients cannot show a reliable
    # size), and its short-poll or ping-pong probe must have been answered.
    _, data, _ = tiny_run
    rows = {(r["workload"], r["backend"]): r for r in data["results"] if r["params"].get("waiting") or
            r["params"].get("held")}
    for workload, key in (("waiting-clients", "rss_per_waiting_client_kib"),
                          ("held-long-polls", "rss_per_held_request_kib")):
        for backend in AVAILABLE_BACKENDS:
            row = rows[(workload, backend)]
            assert isinstance(row["extra"][key], float | int), (workload, backend, row["extra"])
            assert row["extra"]["connect_seconds" if workload == "waiting-clients" else "hold_seconds"] is not None
            assert row["ops_per_s"] > 0 and not row["extra"].get("errors"), (workload, backend)


def test_unavailable_backends_and_missing_examples_are_skipped_with_a_reason(tiny_run):
    _, data, _ = tiny_run
    skipped = {(s["workload"], s["backend"]): s["reason"] for s in data["skipped"]}
    for info in iokit.backends():
        if not info.available:
            assert ("echo", info.name) in skipped
    for workload in EXAMPLE_WORKLOADS:
        if not _example_present(workload):
            assert any(w == workload and "needs examples/" in reason for (w, _), reason in skipped.items())


def test_references_run_where_their_tools_are_installed(tiny_run):
    _, data, _ = tiny_run
    backends = {r["backend"] for r in data["results"]}
    assert {"ref:asyncio", "ref:c-epoll", "ref:pread"} <= backends
    if shutil.which("fio"):
        assert {"ref:fio-psync", "ref:fio-io_uring"} <= backends
    if Path("/usr/include/liburing.h").exists():
        assert "ref:c-uring" in backends
    if importlib.util.find_spec("uvloop"):
        assert "ref:uvloop" in backends


HTTP_REFERENCES = [f"ref:{name}" for name, needs in REQUIRES.items()
                   if all(importlib.util.find_spec(package) for package in needs)]
HTTP_REQUEST_BYTES = {"GET /": (30, 100), "GET / browser": (550, 700), "POST /echo 4KiB": (4096 + 60, 4096 + 200)}


def test_http_rows_cover_every_request_on_every_server_with_its_cpu(tiny_run):
    # Every server, ours and the references whose packages are installed, answers every request kind, and each row
    # has the server's CPU per request. No server answers HTTP in under a microsecond of CPU, so a smaller figure
    # means the process that did the work was not measured (granian's worker is a child of the process started).
    _, data, _ = tiny_run
    if not _example_present("http"):
        pytest.skip("needs examples/http_server.py")
    rows = {(r["backend"], r["params"]["request"]): r for r in data["results"] if r["workload"] == "http"}
    requests = list(HTTP_REQUEST_BYTES) if shutil.which("wrk") else ["GET /"]
    for backend in AVAILABLE_BACKENDS + HTTP_REFERENCES:
        for request in requests:
            row = rows.get((backend, request))
            assert row is not None, (backend, request, [s for s in data["skipped"] if s["backend"] == backend])
            assert row["ops_per_s"] > 0 and row["extra"]["errors"] == 0, (backend, request, row["extra"])
            assert row["cpu_us_per_op"] >= 1, (backend, request, row["cpu_us_per_op"])
            low, high = HTTP_REQUEST_BYTES[request]
            assert low <= row["extra"]["request_bytes"] <= high, (request, row["extra"]["request_bytes"])
    skipped = {s["backend"]: s["reason"] for s in data["skipped"] if s["workload"] == "http"}
    for name in REQUIRES:
        if f"ref:{name}" not in HTTP_REFERENCES:
            assert "not installed" in skipped[f"ref:{name}"]


def test_a_reference_without_its_package_is_skipped_with_the_reason(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "granian" else real_find_spec(name, *args))
    specs = {spec.name: spec for spec in servers.http_reference_specs(types.SimpleNamespace(
        wants_reference=lambda name: name != "httptools-asyncio"))}
    assert set(specs) == {"ref:uvicorn", "ref:granian", "ref:httptools-uvloop", "ref:uvicorn-iokit"}
    assert specs["ref:granian"].argv is None and "granian not installed" in specs["ref:granian"].reason
    if "ref:uvicorn" in HTTP_REFERENCES:
        assert specs["ref:uvicorn"].argv[-4:] == ["--host", "127.0.0.1", "--port", "0"]


def _exchange(host: str, port: int, method: str, path: str, body: bytes | None = None,
              headers: dict | None = None) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


@pytest.mark.skipif(not (ROOT / "examples" / "http_server.py").exists(), reason="needs examples/http_server.py")
def test_http_references_serve_what_the_example_serves():
    # The comparison is fair only if every server sends the same response to the same request.
    backend = "epoll" if "epoll" in AVAILABLE_BACKENDS else AVAILABLE_BACKENDS[0]
    payload = os.urandom(4096)
    exchanges = [("GET", "/", None, {}), ("POST", "/echo", payload, {"Content-Type": "application/x-iokit-test"}),
                 ("POST", "/echo", b"abc", {})]
    specs = [spec for spec in servers.http_reference_specs(types.SimpleNamespace(wants_reference=lambda name: True))
             if spec.argv]
    assert [spec.name for spec in specs] == HTTP_REFERENCES
    example = processes.python_script_command(ROOT / "examples" / "http_server.py", "--backend", backend, "--host",
                                              "127.0.0.1", "--port", "0")
    with processes.Server(example, os.sched_getaffinity(0), name=backend,
                          env=processes.python_child_environment()) as server:
        expected = [_exchange(server.host, server.port, *exchange) for exchange in exchanges]
    assert expected[0] == (200, "text/plain; charset=utf-8", b"hello from iokit\n")
    assert expected[1] == (200, "application/x-iokit-test", payload)
    for spec in specs:
        with processes.Server(spec.argv, os.sched_getaffinity(0), name=spec.name,
                              env=processes.python_child_environment()) as server:
            assert [_exchange(server.host, server.port, *exchange) for exchange in exchanges] == expected, spec.name
            assert _exchange(server.host, server.port, "GET", "/nowhere")[0] == 404, spec.name


def test_measure_counts_the_cpu_of_a_child_process():
    # A server whose work is done in a child (granian's worker) is measured over its process tree.
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"child = subprocess.Popen([sys.executable, '-c', {burn!r}])\n"
                               f"print(child.pid, flush=True)\nchild.wait()\ntime.sleep(5)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert processes.process_tree(parent.pid) == [parent.pid, child]
        before = processes.measure(parent.pid)
        deadline = time.monotonic() + 5
        while processes.measure(parent.pid).cpu_s - before.cpu_s < 0.3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert processes.measure(parent.pid).cpu_s - before.cpu_s >= 0.3
    finally:
        processes.stop_process(parent, signal.SIGTERM, 5)


def _recording_http_server(received: list[bytes]) -> socket.socket:
    """A listener on 127.0.0.1 whose thread answers every request of each connection in turn with a tiny 200 and
    appends the raw request (head and Content-Length body) to ``received``; closing the listener ends it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection, contextlib.suppress(OSError):   # wrk resets its connections when it stops
                data = b""
                while chunk := connection.recv(65536):
                    data += chunk
                    while (head_end := data.find(b"\r\n\r\n")) >= 0:
                        head = data[:head_end].decode("latin-1").lower()
                        length = int(head.split("content-length:")[1].split("\r\n")[0]) if "content-length:" in head \
                            else 0
                        end = head_end + 4 + length
                        if len(data) < end:
                            break
                        received.append(data[:end])
                        data = data[end:]
                        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.skipif(not shutil.which("wrk"), reason="wrk is not installed")
def test_wrk_sends_the_request_described():
    # wrk_report.lua builds each request from HttpRequest's arguments: what arrives is what the rows are labelled with.
    received: list[bytes] = []
    with _recording_http_server(received) as listener:
        port = listener.getsockname()[1]
        run = types.SimpleNamespace(cores=types.SimpleNamespace(load=os.sched_getaffinity(0)))
        server = types.SimpleNamespace(host="127.0.0.1", port=port)
        for request in http_load.REQUESTS.values():
            received.clear()
            report = http_load._wrk_run(run, shutil.which("wrk"), server, 1, request)
            assert report["requests"] > 0 and report["errors"] == 0, report
            first = received[0]
            assert len(first) == request.wire_bytes("127.0.0.1", port), first[:300]
            assert first.startswith(f"{request.method} {request.path} HTTP/1.1\r\n".encode())
            for name, value in request.headers:
                assert f"\r\n{name}: {value}\r\n".encode() in first, name
            assert first.endswith(b"\r\n\r\n" + b"x" * request.body_bytes)


def test_plots_are_real_pngs(tiny_run):
    _, _, out = tiny_run
    for family, workload in PLOTS.items():
        if workload not in _workloads_expected():
            continue
        path = out / f"bench-{family}.png"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", path
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 800 and height >= 400, (path, width, height)


@pytest.mark.parametrize("name", sorted(cbuild.PROGRAMS))
def test_c_programs_build_without_warnings(name, tmp_path):
    program = cbuild.PROGRAMS[name]
    if program.needs_header and not Path(program.needs_header).exists():
        pytest.skip(f"{program.needs_header} is missing")
    command = cbuild.compile_command(program, tmp_path / name, extra_flags=("-Werror",))
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 0 and not completed.stderr, completed.stderr


def test_loadgen_reports_a_refused_connection_as_a_json_error(tmp_path):
    loadgen = cbuild.build("loadgen", directory=tmp_path)
    import socket
    with socket.socket() as placeholder:   # a port that is bound but not listening: connect is refused
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
        completed = subprocess.run([str(loadgen), "--port", str(port), "--connect-timeout", "5"],
                                   capture_output=True, text=True, timeout=30)
    assert completed.returncode == 1
    assert "error" in json.loads(completed.stdout.splitlines()[-1])


def test_summarize_takes_medians_and_sums_cpu():
    runs = [RunSample(1000, 1.0, 10, 50, Usage(0.5, 10, 2048)), RunSample(3000, 1.0, 30, 90, Usage(0.7, 20, 4096)),
            RunSample(2000, 1.0, 20, 70, Usage(0.6, 30, 1024))]
    result = summarize("echo", "epoll", {"connections": 1}, runs)
    assert (result.ops_per_s, result.p50_us, result.p99_us) == (2000, 20, 70)
    assert result.cpu_s == pytest.approx(1.8)
    assert result.cpu_us_per_op == pytest.approx(1.8e6 / 6000)
    assert result.context_switches == 60 and result.peak_rss_kib == 4096


def test_small_formatting_helpers():
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([], 99) == 0
    assert format_rate(1_234_567) == "1.23M" and format_rate(93_210) == "93.2k" and format_rate(512) == "512"
    assert describe_params({"connections": 64, "message_bytes": 16384, "mode": "pipelined", "depth": 16}) == \
        "64 conns 16KiB pipelined x16"
    assert describe_params({"cache": "direct", "queue_depth": 32}) == "direct qd=32"
    assert describe_params({"connections": 64, "request": "GET / browser"}) == "64 conns GET / browser"
