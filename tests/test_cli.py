"""The example servers' command lines as a user meets them: bad flags, --help, IPv6, and Ctrl-C.

Every server is run as a real process. A bad flag must be one line on stderr and exit 2, never a traceback; --help
must say what each limit means with its unit; Ctrl-C in a terminal (SIGINT to the whole process group) must exit 0,
with --workers too, and so must a SIGINT followed by a SIGTERM a few milliseconds later.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from example_servers import EXAMPLES, ROOT, ServerProcess

SERVERS = ["http_server.py", "upload_server.py", "jobs_server.py", "push_server.py"]
CLIENTS = ["jobs_client.py", "push_client.py", "upload_client.py"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run_example(script: str, *arguments: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *arguments], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=tempfile.gettempdir())


def assert_usage_error(done: subprocess.CompletedProcess, *words: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert "error:" in lines[0] and all(word in lines[0] for word in words), lines[0]
    assert "listening on" not in done.stdout


@pytest.mark.parametrize("script", SERVERS)
@pytest.mark.parametrize("flags, words", [
    (["--port", "70000"], ["--port", "0 to 65535"]),
    (["--port", "-1"], ["--port", "0 to 65535"]),
    (["--host", "192.0.2.1", "--port", "0"], ["cannot listen", "192.0.2.1"]),   # TEST-NET: no such local address
    (["--host", "no-such-host.invalid", "--port", "0"], ["cannot listen"]),
    (["--shutdown-grace", "-1"], ["--shutdown-grace", "negative"]),
    (["--idle-timeout", "-5"], ["--idle-timeout", "negative"]),
    (["--max-body-bytes", "-1"], ["--max-body-bytes", "negative"]),
    (["--idle-timeout", "0"], ["idle_timeout", "positive"]),
    (["--cors-origin", "example.com/page"], ["--cors-origin"]),
])
def test_bad_flags_are_one_line_usage_errors(script, flags, words):
    assert_usage_error(run_example(script, *flags), *words)


@pytest.mark.parametrize("script, flags, words", [
    ("jobs_server.py", ["--retention-seconds", "-1"], ["--retention-seconds", "negative"]),
    ("push_server.py", ["--ping-interval", "-0.5"], ["--ping-interval", "negative"]),
    ("push_server.py", ["--max-message-bytes", "-4"], ["--max-message-bytes", "negative"]),
    ("upload_server.py", ["--flush-interval", "-1"], ["--flush-interval", "negative"]),
    ("upload_server.py", ["--max-upload-bytes", "-1"], ["--max-upload-bytes", "negative"]),
])
def test_negative_pattern_limits_are_usage_errors(script, flags, words):
    assert_usage_error(run_example(script, *flags), *words)


@pytest.mark.parametrize("script", SERVERS)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_a_usage_error(script, workers):
    if workers == "2" and script != "http_server.py":
        pytest.skip("only the HTTP server takes --workers")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_usage_error(run_example(script, "--port", port, "--workers", workers), "cannot listen", port, "in use")


def test_dir_that_is_not_a_directory_is_a_usage_error():
    with tempfile.NamedTemporaryFile() as file:
        assert_usage_error(run_example("upload_server.py", "--port", "0", "--dir", file.name), "--dir",
                           "not a directory")


@pytest.mark.parametrize("script", ["upload_server.py", "jobs_server.py", "push_server.py"])
def test_reuse_port_is_refused_where_workers_is(script):
    # Two single-process upload servers on one port answered HEAD with 200 or 404 at random.
    assert_usage_error(run_example(script, "--port", "0", "--reuse-port"), "--reuse-port")
    assert_usage_error(run_example(script, "--port", "0", "--workers", "2"), "--workers must be 1")


@pytest.mark.parametrize("script", SERVERS)
def test_help_says_what_each_limit_means_with_its_unit(script):
    done = run_example(script, "--help")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.count("\nlimits:") == 1, text
    flattened = " ".join(text.split())
    # From HttpLimits' descriptions, on every server:
    assert "--header-timeout SECONDS The whole header section must arrive" in flattened
    assert "(slowloris). (default: 10 seconds)" in flattened
    assert "--max-body-bytes BYTES" in flattened and "(default: 1048576 bytes)" in flattened
    assert "--max-header-fields N More fields than this gets 431" in flattened
    assert "--port PORT port to listen on, 0 to 65535" in flattened and "--cors-origin ORIGIN" in flattened
    own = {"upload_server.py": "--flush-interval SECONDS Async durability: the flusher writes",
           "jobs_server.py": "--wait-jitter FRACTION A held request ends up to this fraction",
           "push_server.py": "--retry-ms MILLISECONDS The reconnection delay",
           "http_server.py": "--receive-size BYTES"}[script]
    assert own in flattened, flattened


@pytest.mark.parametrize("script", CLIENTS)
def test_clients_host_and_port_have_help(script):
    done = run_example(script, "--help")
    flattened = " ".join(done.stdout.split())
    assert done.returncode == 0 and "--host HOST the server's address" in flattened, done.stdout
    assert "--port PORT the server's port" in flattened


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_ipv6_host_is_printed_in_brackets_and_served(workers):
    with ServerProcess(EXAMPLES / "http_server.py", "auto", "--host", "::1", "--workers", workers) as server:
        assert server.listening_line.startswith(f"listening on [::1]:{server.port} "), server.listening_line
        with socket.create_connection(("::1", server.port), timeout=5) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert client.recv(100).startswith(b"HTTP/1.1 200")


# -- Ctrl-C ------------------------------------------------------------------------------------------------------------

def _start_in_own_group(*arguments: str) -> tuple[subprocess.Popen, int]:
    """Start a server as a terminal would (its own process group); return it and its port once it listens."""
    process = subprocess.Popen([sys.executable, str(EXAMPLES / "http_server.py"), "--port", "0", *arguments],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                               start_new_session=True)
    line = process.stdout.readline()
    assert line.startswith("listening on "), (line, process.stderr.read() if process.poll() is not None else "")
    return process, int(line.split()[2].rsplit(":", 1)[1])


def _exit_code(process: subprocess.Popen, timeout: float = 20.0) -> tuple[int, str]:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return process.returncode, process.stderr.read()


@pytest.mark.parametrize("backend", ["epoll", "blocking"])
def test_ctrl_c_to_the_process_group_with_workers_exits_0_every_time(backend):
    # The race: a worker that got the terminal's SIGINT restored Python's handlers on its way out, and the parent's
    # SIGTERM, a moment later, killed it mid-teardown; the parent then exited 1.
    for attempt in range(6):
        process, port = _start_in_own_group("--backend", backend, "--workers", "2")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:  # it serves
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert client.recv(100).startswith(b"HTTP/1.1 200")
        os.killpg(process.pid, signal.SIGINT)
        code, stderr = _exit_code(process)
        assert code == 0 and "Traceback" not in stderr, f"attempt {attempt}: exit {code}\n{stderr}"


@pytest.mark.parametrize("backend", ["blocking", "threads", "epoll", "uring"])
def test_sigint_then_sigterm_within_5_ms_exits_0(backend):
    from iokit import backends
    if not any(info.name == backend and info.available for info in backends()):
        pytest.skip(f"{backend} unavailable here")
    for gap in (0.0, 0.001, 0.003, 0.005):
        process, _ = _start_in_own_group("--backend", backend)
        process.send_signal(signal.SIGINT)
        time.sleep(gap)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        code, stderr = _exit_code(process)
        assert code == 0 and "Traceback" not in stderr, f"gap {gap * 1000:.0f} ms: exit {code}\n{stderr}"
