"""Issue 19's scale runs with ``--store redis`` (slow: ``make test-all``), on ``uring`` with 2 workers.

* 10,000 long polls of one job held across the 2 workers of a jobs server; every one is answered 200 with the new
  version once the job ends. The issue's target is all released within 1 s of the job's end; this prints the figures
  and asserts every poll was released within ``RELEASE_BOUND_SECONDS`` (looser: the client here is one asyncio process
  on the same 2 cores as the servers and Redis).
* SSE: a client moved between two servers (one with 2 workers) 100 times during a 10,000-event stream, published
  alternately through both, receives each event exactly once, in order.
"""

from __future__ import annotations

import asyncio
import collections
import json
import resource
import shutil
import threading
import time

import httpx
import pytest

from example_servers import EXAMPLES, ServerProcess
from iokit.redis import RedisServerProcess
from test_redis_servers import read_events
from conftest import require_backend

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("redis-server") is None,
                                                   reason="redis-server is not installed (make test installs it)")]

HELD_POLLS = 10_000
RELEASE_BOUND_SECONDS = 3.0
EVENTS = 10_000
MOVES = 100


async def _hold_polls(port: int, job: dict, count: int) -> list[tuple[bytes, float]]:
    async def one():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /jobs/{job['id']}?wait=60&version={job['version']} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        arrived = time.time()
        writer.close()
        return head.split(b" ")[1], arrived

    tasks = []
    for index in range(count):
        tasks.append(asyncio.ensure_future(one()))
        if index % 500 == 499:
            await asyncio.sleep(0.05)  # do not overflow the listen backlog
    return await asyncio.gather(*tasks)


def test_ten_thousand_long_polls_across_two_workers():
    require_backend("uring")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    with RedisServerProcess() as redis, \
            ServerProcess(EXAMPLES / "jobs_server.py", "uring", "--store", redis.url, "--workers", "2",
                          "--max-held-requests", "8000", "--max-connections", "8500") as server:
        duration = 15.0  # time to open every connection first
        job = httpx.post(f"{server.url}/jobs", json={"duration_ms": int(duration * 1000)}, timeout=10.0).json()
        ends_at = time.time() + duration
        answers = asyncio.run(_hold_polls(server.port, job, HELD_POLLS))
    statuses = collections.Counter(status for status, _ in answers)
    late = sorted(arrived - ends_at for _, arrived in answers)
    print(f"{HELD_POLLS} held polls, statuses {dict(statuses)}, released after the job's end: "
          f"p50 {late[len(late) // 2]:.3f} s, max {late[-1]:.3f} s")
    assert statuses == {b"200": HELD_POLLS}
    assert late[-1] < RELEASE_BOUND_SECONDS


def test_sse_client_moved_a_hundred_times_in_ten_thousand_events():
    require_backend("uring")
    with RedisServerProcess() as redis:
        store = ("--store", redis.url, "--ring-events", str(2 * EVENTS))
        with ServerProcess(EXAMPLES / "push_server.py", "uring", *store, "--workers", "2") as first, \
                ServerProcess(EXAMPLES / "push_server.py", "uring", *store) as second:
            anchor = httpx.post(f"{first.url}/topics/moves/messages", json={"n": -1}, timeout=10.0).json()["id"]
            published: list[str] = []

            def publisher():
                with httpx.Client(timeout=10.0) as client:
                    for n in range(EVENTS):
                        answer = client.post(f"{(first, second)[n % 2].url}/topics/moves/messages", json={"n": n})
                        published.append(answer.json()["id"])

            thread = threading.Thread(target=publisher)
            thread.start()
            received: list = []
            last_id, moves = anchor, 0
            try:
                while len(received) < EVENTS:
                    events = read_events((first, second)[moves % 2], "moves",
                                         min(EVENTS // MOVES, EVENTS - len(received)), last_event_id=last_id,
                                         timeout=60.0)
                    assert all(event.event == "message" for event in events)
                    received += events
                    last_id = received[-1].id
                    moves += 1
            finally:
                thread.join()
    assert moves == MOVES
    assert [event.data for event in received] == [json.dumps({"n": n}, separators=(",", ":")) for n in range(EVENTS)]
    assert [event.id for event in received] == published
