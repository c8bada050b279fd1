"""The Redis client (``iokit.redis``) against a real ``redis-server``, on every backend.

Each test module starts its own server on a free port in a temporary directory (``RedisServerProcess``); a test that
kills its server starts one of its own. What is checked: replies and error replies, pipelining (one round trip, replies
in order, an error reply in its place), the pool's bound, timeouts (typed, the connection dropped, the next command
fine), the server down (``RedisUnavailable``, nothing applied), reconnects after ``redis-server`` is killed and
restarted, with no acknowledged write lost (a durable server, counted), ``AUTH``, a peer that does not speak RESP, and
pub/sub.
"""

from __future__ import annotations

import shutil
import time

import pytest

import iokit
from iokit.redis import (RedisAuthError, RedisClient, RedisConnectionError, RedisProtocolError, RedisReplyError,
                         RedisServerProcess, RedisTimeout, RedisUnavailable, parse_redis_url)
from iokit.redis.server_process import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (make test installs it)")


@pytest.fixture(scope="module")
def redis_server():
    with RedisServerProcess() as server:
        yield server


@pytest.fixture
def redis_url(redis_server, run) -> str:
    return redis_server.url


def test_commands_and_error_replies(run, redis_url):
    async def main():
        async with RedisClient(redis_url) as client:
            key = f"plain:{run.name}"
            assert await client.execute("SET", key, "value") == b"OK"
            assert await client.execute("GET", key) == b"value"
            assert await client.execute("GET", f"{key}:absent") is None
            with pytest.raises(RedisReplyError, match="WRONGTYPE"):
                await client.execute("LPUSH", key, "x")
            assert await client.execute("PING") == b"PONG"  # the error reply left the connection usable
            assert client.statistics()["opened"] == 1
    run(main)


def test_pipeline_is_one_round_trip_in_order(run, redis_url):
    async def main():
        async with RedisClient(redis_url) as client:
            key = f"counter:{run.name}"
            await client.execute("DEL", key)
            replies = await client.pipeline([("INCR", key)] * 1000)
            assert replies == list(range(1, 1001))
            mixed = await client.pipeline([("SET", f"{key}:s", "x"), ("INCR", f"{key}:s"), ("GET", f"{key}:s")],
                                          raise_on_error=False)
            assert mixed[0] == b"OK" and isinstance(mixed[1], RedisReplyError) and mixed[2] == b"x"
            with pytest.raises(RedisReplyError):
                await client.pipeline([("INCR", f"{key}:s"), ("INCR", key)])
            assert await client.execute("GET", key) == b"1001"  # the command after the error reply was applied
            assert client.statistics()["opened"] == 1
    run(main)


def test_pool_is_bounded_and_shared(run, redis_url):
    async def main():
        async with RedisClient(redis_url, max_connections=4) as client:
            key = f"shared:{run.name}"
            await client.execute("DEL", key)

            async def add(count):
                for _ in range(count):
                    await client.execute("INCR", key)

            async with iokit.TaskGroup() as tasks:
                for _ in range(20):
                    tasks.spawn(add, 10)
            assert await client.execute("GET", key) == b"200"
            assert client.statistics()["opened"] <= 4
    run(main)


def test_timeout_is_typed_and_drops_the_connection(run, redis_url):
    async def main():
        async with RedisClient(redis_url) as client:
            started = iokit.current_time()
            with pytest.raises(RedisTimeout) as caught:
                await client.execute("BLPOP", f"never:{run.name}", 5, timeout=0.2)
            assert iokit.current_time() - started < 2.0
            assert caught.value.maybe_applied and caught.value.replies == []
            assert await client.execute("PING") == b"PONG"  # on a new connection: the late reply cannot answer it
            assert client.statistics()["dropped"] == 1 and client.statistics()["opened"] == 2
    run(main)


def test_server_down_is_unavailable_and_applies_nothing(run):
    async def main():
        async with RedisClient(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1.0) as client:
            with pytest.raises(RedisUnavailable) as caught:
                await client.execute("SET", "k", "v")
            assert caught.value.maybe_applied is False
            assert isinstance(caught.value, RedisConnectionError)
    run(main)


def test_reconnects_after_restart_and_loses_no_acknowledged_write(run):
    """A durable server (every write fsynced before its reply) is killed while a task increments a counter one
    command at a time, and restarted on the same port. Every increment that was acknowledged is in the counter
    afterwards; the only ones in doubt are those whose error said ``maybe_applied``; the client reconnects by itself."""
    with RedisServerProcess(durable=True) as server:
        acknowledged = 0
        in_doubt = 0
        errors: list[type] = []

        async def increment_until(stop: iokit.Event, client: RedisClient):
            nonlocal acknowledged, in_doubt
            while not stop.is_set():
                try:
                    await client.execute("INCR", "counter", timeout=2.0)
                    acknowledged += 1
                except RedisConnectionError as error:
                    errors.append(type(error))
                    in_doubt += error.maybe_applied
                    await iokit.sleep(0.01)

        async def main():
            stop = iokit.Event()
            async with RedisClient(server.url, connect_timeout=0.5) as client:
                async with iokit.TaskGroup() as tasks:
                    tasks.spawn(increment_until, stop, client)
                    await iokit.sleep(0.3)
                    before_kill = acknowledged
                    server.kill()
                    await iokit.sleep(0.3)
                    server.start()
                    restarted = acknowledged
                    with iokit.move_on_after(10.0):
                        while acknowledged < restarted + 50:
                            await iokit.sleep(0.02)
                    stop.set()
                assert acknowledged >= restarted + 50, "no reconnect within 10 s of the restart"
                assert before_kill > 0
                value = int(await client.execute("GET", "counter"))
                assert acknowledged <= value <= acknowledged + in_doubt, (acknowledged, in_doubt, value)
                assert RedisUnavailable in errors  # while it was down: told as such
                assert client.statistics()["opened"] >= 2
        run(main)


def test_auth(run):
    with RedisServerProcess(password="s3cret") as server:
        async def main():
            async with RedisClient(f"redis://:s3cret@127.0.0.1:{server.port}/2") as client:
                assert await client.execute("SET", "k", "v") == b"OK"
                assert await client.execute("CLIENT", "INFO") is not None
            async with RedisClient(f"redis://:wrong@127.0.0.1:{server.port}/0") as client:
                with pytest.raises(RedisAuthError):
                    await client.execute("PING")
            async with RedisClient(f"redis://127.0.0.1:{server.port}/0") as client:
                with pytest.raises(RedisReplyError, match="NOAUTH"):
                    await client.execute("PING")
        run(main)


def test_a_peer_that_does_not_speak_resp(run):
    async def main():
        listener = await iokit.open_tcp_listener("127.0.0.1", 0)

        async def not_redis():
            stream = await listener.accept()
            await stream.receive_some()
            await stream.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await stream.receive_some()  # until the client closes
            await stream.aclose()

        async with iokit.TaskGroup() as tasks:
            tasks.spawn(not_redis)
            async with RedisClient(f"redis://127.0.0.1:{listener.address[1]}/0") as client:
                with pytest.raises(RedisProtocolError):
                    await client.execute("PING")
        await listener.aclose()
    run(main)


def test_subscription(run, redis_url):
    async def main():
        channel = f"news:{run.name}"
        async with RedisClient(redis_url) as client:
            async with client.subscription() as subscription:
                await subscription.subscribe(channel)
                assert await subscription.next_message(timeout=0.1) is None  # a quiet wait breaks nothing
                assert await client.execute("PUBLISH", channel, "one") == 1
                assert await client.execute("PUBLISH", channel, "two") == 1
                assert await subscription.next_message(timeout=2.0) == (channel.encode(), b"one")
                assert await subscription.next_message(timeout=2.0) == (channel.encode(), b"two")
    run(main)


def test_parse_redis_url():
    address = parse_redis_url("redis://user:p%40ss@127.0.0.1:6380/3")
    assert (address.host, address.port, address.database, address.username, address.password) == \
        ("127.0.0.1", 6380, 3, "user", "p@ss")
    assert parse_redis_url("redis://localhost").host in ("127.0.0.1", "::1")
    assert parse_redis_url("redis://[::1]:7000/0").host == "::1"
    for bad in ("http://127.0.0.1", "redis://127.0.0.1/x", "redis://127.0.0.1:99999/0", "redis:///0"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


def test_stream_reader_reports_an_unreachable_redis_once_through_logging(run, caplog):
    """The push server's stream reader says once, on the ``iokit.redis`` logger, that Redis is unreachable, and keeps
    trying (here three attempts or more in 1.2 s: ``RECONNECT_PAUSE`` is 0.5 s)."""
    import threading

    from iokit.redis.events import RedisEventLog, StreamReader

    async def main():
        async with RedisClient(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.2) as client:
            reader = StreamReader(RedisEventLog(client, f"stream:{run.name}", 10), lambda event: None,
                                  threading.Lock())
            with iokit.move_on_after(1.2):
                await reader.run()

    with caplog.at_level("WARNING", logger="iokit.redis"):
        run(main)
    records = [record for record in caplog.records if record.name == "iokit.redis"]
    assert len(records) == 1, records
    assert records[0].levelname == "WARNING"
    assert "reading the event stream failed, retrying" in records[0].getMessage()
    assert "cannot connect" in records[0].getMessage()


def test_pipeline_encoded_runs_commands_encoded_once(run, redis_url):
    """``pipeline_encoded``: the same bytes sent again and again, replies in order, an error reply raised or kept in
    its place, and a connection reused for each (the pool's fast path)."""
    from iokit.redis.connection import pack_commands

    async def main():
        async with RedisClient(redis_url) as client:
            key = f"encoded:{run.name}"
            await client.execute("DEL", key)
            data = pack_commands([("INCR", key), ("GET", key)])
            for expected in range(1, 101):
                assert await client.pipeline_encoded(data, 2, read_only=False) == [expected, str(expected).encode()]
            bad = pack_commands([("SET", f"{key}:s", "x"), ("INCR", f"{key}:s"), ("INCR", key)])
            replies = await client.pipeline_encoded(bad, 3, read_only=False, raise_on_error=False)
            assert replies[0] == b"OK" and isinstance(replies[1], RedisReplyError) and replies[2] == 101
            with pytest.raises(RedisReplyError, match="not an integer"):
                await client.pipeline_encoded(bad, 3, read_only=False)
            assert await client.execute("GET", key) == b"102"  # the command after the error reply was applied
            statistics = client.statistics()
            assert statistics["opened"] == 1 and statistics["reused"] >= 102 and statistics["dropped"] == 0
    run(main)


def test_a_connection_idle_past_the_probe_time_is_looked_at_before_reuse(run, redis_url, monkeypatch):
    """A connection the server closed while it sat idle is not reused once it has been idle for
    ``PROBE_AFTER_IDLE_SECONDS``: the write goes on a new connection, applied once. On ``uring`` the engine's armed
    receive takes the close instead of the peek; the write then fails as maybe applied, and was not applied twice."""
    from iokit.redis import client as client_module

    monkeypatch.setattr(client_module, "PROBE_AFTER_IDLE_SECONDS", 0.05)

    async def main():
        async with RedisClient(redis_url) as client, RedisClient(redis_url) as killer:
            key = f"probed:{run.name}"
            await client.execute("SET", key, 0)
            name = f"probed-{run.name}"
            await client.execute("CLIENT", "SETNAME", name)
            listing = (await killer.execute("CLIENT", "LIST")).decode()
            client_id = next(line.split()[0].removeprefix("id=") for line in listing.splitlines()
                             if f" name={name} " in f" {line} ")
            assert await killer.execute("CLIENT", "KILL", "ID", client_id) == 1
            await iokit.sleep(0.2)
            try:
                assert await client.execute("INCR", key) == 1
                applied_here = True
            except RedisConnectionError as error:
                assert run.backend == "uring" and error.maybe_applied
                applied_here = False
            assert await client.execute("GET", key) == (b"1" if applied_here else b"0")
            statistics = client.statistics()
            assert statistics["dropped"] == 1 and statistics["opened"] == 2
    run(main)


def test_job_store_reads_the_monitor_its_scripts_return(run, redis_url):
    """``RedisJobStore.get`` (HMGET of a monitor's fields, and TIME) answers what the scripts' HGETALL answers, in
    every state: queued, running, succeeded (with a result), failed (with an error), canceled; 404 for an id never
    given, 410 for one dropped after its retention."""
    from iokit.patterns.jobs import JobGone, JobNotFound, JobRequest
    from iokit.patterns.limits import JobLimits
    from iokit.redis.jobs import RedisJobStore

    async def main():
        async with RedisClient(redis_url) as client:
            store = RedisJobStore(client, JobLimits(max_running_jobs=1, retention_seconds=1.0),
                                  prefix=f"iokit:test:{run.name}:")
            running, _ = await store.submit(JobRequest(duration_ms=300))
            queued, _ = await store.submit(JobRequest(duration_ms=100, fail=True))
            assert running["status"] == "running" and queued["status"] == "queued"
            assert await store.get(running["id"]) == running and await store.get(queued["id"]) == queued
            await iokit.sleep(0.35)  # the first ends; the second starts
            succeeded = await store.get(running["id"])
            assert succeeded == {"id": running["id"], "status": "succeeded", "result": {"duration_ms": 300},
                                 "error": None, "version": running["version"] + 1}
            await iokit.sleep(0.15)
            failed = await store.get(queued["id"])
            assert failed == {"id": queued["id"], "status": "failed", "result": None,
                              "error": "the job failed, as it was asked to", "version": queued["version"] + 2}
            third, _ = await store.submit(JobRequest(duration_ms=10_000))
            canceled = await store.cancel(third["id"])
            assert canceled["status"] == "canceled" and canceled["error"] == "canceled by request"
            assert await store.get(third["id"]) == canceled
            with pytest.raises(JobNotFound):
                await store.get("0" * 32)
            await iokit.sleep(1.2)  # past the retention: dropped by Redis, remembered as gone
            with pytest.raises(JobGone):
                await store.get(running["id"])
    run(main)


def test_a_long_timeout_is_kept_by_the_watchdog(run, redis_url):
    """A command with ``WATCHED_FROM_SECONDS`` or more to go has no cancel scope: the client's watchdog times it out
    (within a tick of ``WATCH_TICK_SECONDS``), as a ``RedisTimeout`` holding the replies that came, the connection
    dropped; the next command goes on a new one. A client used without ``async with`` keeps the same timeout with a
    scope."""
    from iokit.redis.client import WATCH_TICK_SECONDS, WATCHED_FROM_SECONDS

    timeout = WATCHED_FROM_SECONDS + 0.2

    async def expect_timeout(client, key):
        started = iokit.current_time()
        with pytest.raises(RedisTimeout) as caught:
            await client.pipeline([("PING",), ("BLPOP", key, 10)], timeout=timeout)
        waited = iokit.current_time() - started
        assert timeout - 0.01 <= waited < timeout + WATCH_TICK_SECONDS + 1.0, waited
        assert caught.value.maybe_applied and caught.value.replies == [b"PONG"]  # the PING was acknowledged
        assert await client.execute("RPUSH", key, "x") == 1  # on a new connection: the BLPOP is gone with the old
        assert await client.execute("LPOP", key) == b"x"
        statistics = client.statistics()
        assert statistics["dropped"] == 1 and statistics["opened"] == 2

    async def main():
        key = f"watched:{run.name}"
        async with RedisClient(redis_url) as client:
            await expect_timeout(client, key)
        client = RedisClient(redis_url)
        try:
            await expect_timeout(client, key)
        finally:
            await client.aclose()
    run(main)
