"""The bench's ``updates`` workload: what the watching clients cost, not the producer's POSTs (the same for every
pattern), and the sweep over client counts, each row with its requests/s, bytes/s and server CPU per delivered update.
Real servers, the bench's own clients, short windows."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from example_servers import EXAMPLES, ServerProcess
from iokit.bench import redis_store, updates
from iokit.bench.context import BenchRun, make_settings
from iokit.bench.machine import plan_cores
from iokit.bench.progress import Progress
from iokit.bench.results import Report
from iokit.bench.updates import JOBS_SERVER_OPTIONS, Traffic, _poll, _push
from iokit.redis import RedisServerProcess

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="redis-server is not installed (make test installs it)")

CLIENTS, RATE, SECONDS = 2, 20.0, 0.5  # 10 updates, 5 per client
CONTRACT = ("workload", "backend", "params", "ops_per_s", "p50_us", "p99_us", "cpu_s")


def test_push_counts_only_the_subscriptions():
    with ServerProcess(EXAMPLES / "push_server.py", "epoll") as server:
        traffic = Traffic()
        outcome = asyncio.run(_push(*server.address, CLIENTS, RATE, SECONDS, traffic))
    assert len(outcome.latencies) == 10
    assert traffic.requests == CLIENTS, traffic  # was 12: the producer's 10 POSTs counted as the pattern's
    assert outcome.setup.requests == CLIENTS and outcome.window.requests == 0, outcome
    assert outcome.window.bytes_received > 0   # the 10 events


def test_long_polling_counts_the_watchers_polls_only():
    with ServerProcess(EXAMPLES / "jobs_server.py", "epoll", *JOBS_SERVER_OPTIONS) as server:
        traffic = Traffic()
        outcome = asyncio.run(_poll(*server.address, CLIENTS, RATE, SECONDS, traffic, long_poll=True))
    assert len(outcome.latencies) == 10
    # One held poll per client before the window, then one poll per update (was 20 with the POSTs creating the jobs).
    assert outcome.setup.requests == CLIENTS and outcome.window.requests == 10, outcome
    assert outcome.held == CLIENTS   # every client held a request in the middle of the window


def test_only_127_0_0_1():
    with pytest.raises(RuntimeError, match="127.0.0.1"):
        asyncio.run(_push("127.0.0.2", 9, 1, 1, 1, Traffic()))


def test_threaded_backends_skip_what_does_not_fit_the_descriptor_limit(monkeypatch):
    monkeypatch.setattr(updates, "descriptor_limit", lambda: 20000)
    for backend in ("blocking", "threads"):
        assert updates.too_many_clients(backend, 1000) is None
        assert "RLIMIT_NOFILE 20000" in updates.too_many_clients(backend, 10000)
    assert updates.too_many_clients("epoll", 10000) is None and updates.too_many_clients("uring", 10000) is None


@pytest.mark.timeout(240)
def test_the_sweep_reports_the_figures_and_push_costs_fewer_requests_than_short_polling(monkeypatch, tmp_path):
    # Sweep 2 and 8 clients on blocking and epoll, 1 update/s for 2 s (each client gets one every 2 or 8 s: rarer
    # than the 1 s poll interval). A descriptor limit of 265 lets blocking run 2 clients (2 x 2 + 256 descriptors)
    # and not 8 (272): those rows must be skipped with the reason, while epoll runs them.
    monkeypatch.setattr(updates, "descriptor_limit", lambda: 265)
    # The --store redis rows double the sweep; their figures are checked below on their own, and by test_bench's run.
    monkeypatch.setattr(redis_store, "unavailable", lambda: "left out of this test")
    settings = make_settings(True, tmp_path, update_clients=(2, 8), update_rate=1.0, updates_seconds=2.0)
    backends = ["blocking", "epoll"]
    run = BenchRun(settings, plan_cores(), backends, frozenset(), frozenset({"updates"}), Report({}, {}))
    planned = updates.planned(run)
    run.progress = Progress(planned)
    updates.run(run)
    report = run.report
    assert planned == 9 and len(report.results) == 9, [(r.backend, r.params) for r in report.results]
    redis_skips = [s for s in report.skipped if s.params.get("store") == "redis"]
    assert len(redis_skips) == 2 * 2 * 3 and all(s.reason == "left out of this test" for s in redis_skips)
    skipped = [(s.backend, s.params["clients"], s.params["mode"]) for s in report.skipped if s not in redis_skips]
    assert sorted(skipped) == [("blocking", 8, mode) for mode in ("long", "push", "short")], report.skipped
    assert all("RLIMIT_NOFILE 265" in s.reason for s in report.skipped if s not in redis_skips)
    rows = {(r.backend, r.params["clients"], r.params["mode"]): r for r in report.results}
    for (backend, clients, mode), row in rows.items():
        for field in CONTRACT:
            assert getattr(row, field) is not None, (field, row)
        extra = row.extra
        assert extra["updates"] == extra["expected_updates"] == 2, row
        assert extra["requests_per_s"] >= 0 and extra["bytes_per_s"] > 0, row
        # CPU is counted in 10 ms ticks: a long-poll or push row of 2 clients over 2 s may well take none.
        assert extra["server_cpu_us_per_update"] >= 0 and row.cpu_s >= 0, row
        assert extra["seconds_between_updates_per_client"] > updates.POLL_INTERVAL_S
        assert extra["window_seconds"] >= 2.0
        assert extra["held"] == {"short": 0, "long": clients, "push": clients}[mode], row
    for backend, clients in (("blocking", 2), ("epoll", 2), ("epoll", 8)):
        short, long, push = (rows[(backend, clients, mode)].extra for mode in ("short", "long", "push"))
        assert push["requests_per_event"] < long["requests_per_event"] < short["requests_per_event"], (short, push)
        assert push["requests_per_s"] == 0 and long["requests_per_event"] == 1
        # Short polling: about one request per client per second, whether or not anything changed.
        assert short["requests_per_s"] >= 0.7 * clients, short
    assert rows[("epoll", 8, "short")].extra["requests_per_s"] > 3 * rows[("epoll", 2, "short")].extra["requests_per_s"]


@needs_redis
def test_with_the_redis_store_two_workers_count_together():
    # Each of the 2 workers answers /stats for itself: the row must count the clients held or subscribed across both
    # (asked on new connections until both pids answered), and Redis's CPU beside the server's.
    with RedisServerProcess() as redis:
        store = ("--store", redis.url, "--workers", str(redis_store.STORE_WORKERS))
        with ServerProcess(EXAMPLES / "jobs_server.py", "epoll", *JOBS_SERVER_OPTIONS, *store) as jobs, \
                ServerProcess(EXAMPLES / "push_server.py", "epoll", *store) as push:
            clients = 8
            redis_cpu = lambda: redis_store.measure(redis.process.pid).cpu_s  # noqa: E731
            long = asyncio.run(_poll(*jobs.address, clients, RATE, SECONDS, Traffic(), long_poll=True, workers=2,
                                     store_cpu=redis_cpu))
            pushed = asyncio.run(_push(*push.address, clients, RATE, SECONDS, Traffic(), workers=2,
                                       store_cpu=redis_cpu))
    for outcome in (long, pushed):
        assert len(outcome.latencies) == 10 and outcome.held == clients, outcome
        assert outcome.store_cpu_s is not None and outcome.store_cpu_s >= 0
    assert long.setup.requests == clients and long.window.requests == 10, long
    assert pushed.window.requests == 0


@needs_redis
def test_worker_stats_need_every_worker():
    stats = redis_store.WorkerStats(2)
    assert not stats.add({"pid": 10, "held": 3})
    assert not stats.add({"pid": 10, "held": 4})   # the same worker again: its newest count
    assert stats.add({"pid": 11, "held": 5})
    assert stats.total("held") == 9
