"""The kill -9 durability proof, repeated: in sync mode no byte the upload server acknowledged is ever lost.

``tests/test_upload.py`` kills the server once, at 40 %. A single kill point can hide a window: the kill landing while a
chunk is being written, between the fdatasync and the record's rename, or just after a 204 left. Here each trial
picks its kill point at random, an offset between 5 % and 95 % of the upload and then a delay of up to one chunk's
sending time (so it may land anywhere inside the next PATCH), kills the server with SIGKILL, restarts it on the same
directory and port, and lets our client (``examples/upload_client.py``) resume from what the server says it holds.

What counts as acknowledged is stricter than "before the kill": every ``ack`` line the client logged before its first
``resume`` came from the killed server (a 204 it sent, possibly an instant before dying), and the restarted server
must resume at or past the highest of them. The upload must then finish with the right sha256, and the bytes the
restarted server kept must be the source's own bytes (nothing torn or stale below the resume point).

Uploads go to the real disk (not tmpfs): what is tested is what fdatasync promised. The seed of each trial is printed,
so a failure can be replayed (``IOKIT_DURABILITY_SEED``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from example_servers import _backend_params, wait_until
from test_upload import CLIENT, KIB, MIB, random_file, read_ack_log, restart_on, start_upload_server

FULL_TRIALS = 20
CI_TRIALS = 3
UPLOAD_SIZE = 8 * MIB
CHUNK_SIZE = 256 * KIB
RATE_MIB_PER_S = 8           # ~1 s per upload: room for a kill anywhere, and 20 trials in well under a minute each
# example_servers' parameters (uring skips with the reason where it cannot run), for the two backends asked for.
BACKEND_PARAMS = [param for param in _backend_params() if param.id in ("uring", "epoll")]


def kill_point(rng: random.Random) -> tuple[int, float]:
    """Return (an acknowledged offset to wait for, then a delay in seconds before the kill)."""
    offset = int(rng.uniform(0.05, 0.95) * UPLOAD_SIZE)
    chunk_seconds = CHUNK_SIZE / (RATE_MIB_PER_S * MIB)
    return offset, rng.uniform(0.0, chunk_seconds)


def acknowledged_by_the_killed_server(ack_log: str, killed_at: float) -> tuple[int, int]:
    """Return (the highest offset the first server acknowledged, the offset the restarted server resumed at)."""
    events = read_ack_log(ack_log)
    first_resume = next((index for index, (event, when, _, _) in enumerate(events)
                         if event == "resume" and when > killed_at), None)
    if first_resume is None:
        # The kill landed after the last PATCH was acknowledged: the client had nothing to resume, and its verified
        # sha256 came from the restarted server, which therefore holds every byte.
        assert events[-1][0] == "ack" and events[-1][2] == UPLOAD_SIZE, events[-3:]
        return UPLOAD_SIZE, UPLOAD_SIZE
    acknowledged = max((offset for event, _, offset, _ in events[:first_resume] if event == "ack"), default=0)
    _, _, resumed_offset, resumed_durable = events[first_resume]
    assert resumed_offset == resumed_durable, "after a restart the offset must be the durable one"
    return acknowledged, resumed_offset


def kept_bytes_match(directory: str, source: str) -> bool:
    """The upload's data file (the only one in ``directory``) is a prefix of ``source``."""
    data_files = [name for name in os.listdir(directory) if name.endswith(".data")]
    assert len(data_files) == 1, data_files
    with open(os.path.join(directory, data_files[0]), "rb") as kept, open(source, "rb") as original:
        data = kept.read()
        return data == original.read(len(data))


def kill_trial(backend: str, work: str, seed: int, at: tuple[int, float] | None = None) -> dict:
    """Run one upload, kill -9 the server at a random point (or ``at``: an offset and a delay), restart it, let the
    client finish. Return the figures."""
    rng = random.Random(seed)
    wait_for_offset, extra_delay = at or kill_point(rng)
    directory = os.path.join(work, f"uploads-{seed}")
    source = random_file(work, UPLOAD_SIZE, f"source-{seed}.bin")
    ack_log = os.path.join(work, f"acks-{seed}.log")
    first = start_upload_server(backend, directory, "--durability", "sync")
    first.start()
    client = subprocess.Popen([sys.executable, str(CLIENT), "--port", str(first.port), source, "--chunk-size",
                               str(CHUNK_SIZE), "--rate", str(RATE_MIB_PER_S), "--ack-log", ack_log,
                               "--retry-seconds", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        assert wait_until(lambda: os.path.exists(ack_log) and any(
            offset >= wait_for_offset for _, _, offset, _ in read_ack_log(ack_log)), timeout=30)
        time.sleep(extra_delay)
        killed_at = time.time()
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        second = restart_on(backend, directory, first.port, "sync")
        output, errors = client.communicate(timeout=60)
        assert client.returncode == 0 and "verified=yes" in output, errors
        assert second.stop() == 0, second.stderr_text
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        for server in (first, second):
            if server is not None:
                server.close()
    acknowledged, resumed = acknowledged_by_the_killed_server(ack_log, killed_at)
    assert kept_bytes_match(directory, source), "the restarted server kept bytes that are not the source's"
    return {"seed": seed, "kill_after_offset": wait_for_offset, "extra_delay_ms": round(1000 * extra_delay, 1),
            "acknowledged": acknowledged, "resumed": resumed, "lost": max(0, acknowledged - resumed)}


def run_trials(backend: str, trials: int, tmp_path) -> None:
    base_seed = int(os.environ.get("IOKIT_DURABILITY_SEED", time.time_ns() % 1_000_000))
    results = [kill_trial(backend, str(tmp_path), base_seed + number) for number in range(trials)]
    for result in results:
        print(f"\nkill -9 trial {backend}/sync: {result}")
    lost = [result for result in results if result["lost"]]
    print(f"\nkill -9 {backend}/sync: {trials} trials, seeds {base_seed}..{base_seed + trials - 1}, "
          f"{len(lost)} lost acknowledged bytes")
    assert not lost, f"sync mode lost acknowledged bytes: {lost}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("trials", [pytest.param(CI_TRIALS, id=f"{CI_TRIALS}-trials"),
                                    pytest.param(FULL_TRIALS, id=f"{FULL_TRIALS}-trials", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_kill_9_at_random_points_loses_no_acknowledged_byte(backend, trials, tmp_path):
    run_trials(backend, trials, tmp_path)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_kill_after_the_last_acknowledgement_still_verifies(backend, tmp_path):
    """The latest kill point: the upload is complete and the client is asking for its sha256 when the server dies.
    The client must ask the restarted server again, which must hold every byte."""
    result = kill_trial(backend, str(tmp_path), seed=1, at=(UPLOAD_SIZE, 0.0))
    assert result["acknowledged"] == result["resumed"] == UPLOAD_SIZE, result
