"""The bench's ``updates`` workload counts what the watching clients cost, not the producer's POSTs (which are the
same for every pattern): push's requests per update are its subscriptions only. Real servers, the bench's own clients."""

from __future__ import annotations

import asyncio

from example_servers import EXAMPLES, ServerProcess
from iokit.bench.updates import JOBS_SERVER_OPTIONS, Traffic, _poll, _push

CLIENTS, RATE, SECONDS = 2, 20.0, 0.5  # 10 updates, 5 per client


def test_push_counts_only_the_subscriptions():
    with ServerProcess(EXAMPLES / "push_server.py", "epoll") as server:
        traffic = Traffic()
        latencies = asyncio.run(_push(*server.address, CLIENTS, RATE, SECONDS, traffic))
    assert len(latencies) == 10
    assert traffic.requests == CLIENTS, traffic  # was 12: the producer's 10 POSTs counted as the pattern's


def test_long_polling_counts_the_watchers_polls_only():
    with ServerProcess(EXAMPLES / "jobs_server.py", "epoll", *JOBS_SERVER_OPTIONS) as server:
        traffic = Traffic()
        latencies = asyncio.run(_poll(*server.address, CLIENTS, RATE, SECONDS, traffic, long_poll=True))
    assert len(latencies) == 10
    assert traffic.requests == 10, traffic  # one poll per update (was 20: the 10 POSTs creating the jobs)
