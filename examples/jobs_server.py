"""Short and long polling of long-running jobs, over HTTP/1.1 on iokit's shared core.

    POST /jobs                {"duration_ms": N, "fail": bool}: 202, Location, Retry-After: 1, the job's monitor
                              (Idempotency-Key: the same key and request give the same job; another request, 409)
    GET  /jobs/{id}           the monitor (short poll; Retry-After: 1 until the job has ended); 304 without a body
                              when If-None-Match names its current ETag
    GET  /jobs/{id}?wait=S&version=V
                              long poll: held until the job's version is not V, the job ends, or S seconds pass
                              (default 30, at most 60, plus a little jitter); always 200 with the monitor
    POST /jobs/{id}/cancel    202 and the canceled monitor (409 if it already succeeded or failed)
    GET  /stats               jobs, queued, running, held: what the server holds now; pid (with --workers, each
                              worker counts its own held requests)
    GET  /                    a page that follows one job by short and by long polling, side by side

Every job response has an ``ETag`` (the job's version) and ``Cache-Control: no-store``. The rules (states, versions,
retention, queue limit, idempotency keys, the registry of held requests) are in ``iokit.patterns.jobs``; the limits in
``iokit.patterns.limits`` (each a flag: ``--retention-seconds``, ``--max-held-requests``...). Here is the part that
runs:

* **One runner task** advances the job table at its next deadline (a job ends, a finished job expires), and is woken
  early when a job is added or canceled. Jobs are timers on the runtime: no thread or task sleeps per job.
* **A held request** registers its wake-up, *then* reads the job (so a change in between is not missed), then waits on
  its connection (``request.wait_disconnected()``: a readiness wait that returns when the client leaves, with no
  receive buffer) until the client leaves, its time is up, the server stops (``request.interruptible()``), or a change
  of the job cancels the wait, whichever comes first. It is unregistered on the way out in every case. A woken request
  answers with the monitor its wake-up brought, without going back to the table, and with its JSON encoded once for
  every request that change woke (``Change``).

The job table and the held requests live in this process's memory: the server is ``single_process`` (``--workers``
must be 1), and the runner is the service's lifespan, beside the accept loop.

``--store redis://HOST:PORT/DB`` keeps the jobs in Redis instead (``iokit.redis.jobs``: records with versions, TTL
expiry, every change one Lua script on Redis's clock), so ``--workers N`` and several servers serve the same jobs.
Each process keeps its own held requests, and one subscription to the store's ``changed`` channel wakes them, whichever
server made the change; its runner advances the shared table at its own jobs' deadlines and at least every second.
With Redis unreachable a request gets 503 ``store_unavailable`` with Retry-After.

Run: ``python examples/jobs_server.py --backend epoll --port 8080``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pathlib
import random
import sys
import threading

import iokit
from iokit import serve
from iokit.redis import RedisAddress, RedisClient, RedisConnectionError, parse_redis_url
from iokit.redis.jobs import RedisJobStore
from iokit.http import App, HttpError, HttpLimits, HttpServer, Response, cors
from iokit.patterns.jobs import (IdempotencyConflict, InvalidJobRequest, JobError, JobFinished, JobGone, JobNotFound,
                                 JobTable, QueueFull, TooManyWaiters, Waiter, WaiterRegistry, check_idempotency_key,
                                 parse_job_request, parse_long_poll)
from iokit.patterns.limits import JobLimits, check_connections, connections_for

NO_STORE = ("Cache-Control", "no-store")
PAGE = pathlib.Path(__file__).with_name("pages") / "jobs.html"
POLL_AGAIN_AFTER = ("Retry-After", "1")

# How each refusal of the job table reaches the client: status and error code.
_ERRORS: dict[type, tuple[int, str]] = {
    InvalidJobRequest: (400, "invalid_request"),
    JobNotFound: (404, "not_found"),
    JobGone: (410, "gone"),
    JobFinished: (409, "job_finished"),
    IdempotencyConflict: (409, "idempotency_conflict"),
    QueueFull: (503, "queue_full"),
    TooManyWaiters: (503, "too_many_waiters"),
}


def http_error(error: JobError) -> HttpError:
    """Return the ``HttpError`` for a refusal of the job table (503s say when to retry)."""
    status, code = _ERRORS[type(error)]
    headers = []
    if status == 503:
        headers.append(("Retry-After", str(getattr(error, "retry_after", 1))))
    return HttpError(status, str(error), error=code, headers=headers)


def etag(monitor: dict) -> str:
    return f'"{monitor["version"]}"'


def monitor_response(monitor: dict, status: int, *extra_headers: tuple[str, str]) -> Response:
    return Response.json(monitor, status, headers=[("ETag", etag(monitor)), NO_STORE, *extra_headers])


class Change:
    """What a change of a job brings the long polls it wakes: the job's monitor, and the 200 answering them, whose
    body is encoded once for all of them (one change of a job held by 10,000 requests wakes them all at once, and
    encoding it 10,000 times was a tenth of the time it took to answer them)."""

    __slots__ = ("monitor", "_body")

    def __init__(self, monitor: dict):
        self.monitor = monitor
        self._body: bytes | None = None

    def response(self) -> Response:
        """Return a new 200 for one request (a response is not shared: a CORS policy adds its headers to it)."""
        if self._body is None:  # on ``blocking`` two threads may both encode it: the same bytes
            self._body = monitor_response(self.monitor, 200).body
        return Response(200, self._body, headers=[("ETag", etag(self.monitor)), NO_STORE],
                        content_type="application/json")


def not_modified(monitor: dict, *extra_headers: tuple[str, str]) -> Response:
    """304: the client's copy (its If-None-Match) is the current one. No body; the headers a 200 would have."""
    return Response(304, headers=[("ETag", etag(monitor)), NO_STORE, *extra_headers])


def etag_matches(if_none_match: str | None, current: str) -> bool:
    """Return ``True`` if ``If-None-Match`` names ``current`` (RFC 9110 section 13.1.2: ``*``, or a list of tags,
    compared weakly: ``W/"3"`` matches ``"3"``)."""
    if if_none_match is None:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == current for tag in if_none_match.split(","))


class JobsServer:
    """The job table, the held requests, the runner, and the routes that use them."""

    def __init__(self, limits: JobLimits):
        self.limits = limits
        # Two locks, always taken one at a time or table-then-waiters (a table change notifies waiters), never the
        # other way round. On ``blocking`` the handlers are threads; elsewhere the locks are never contended.
        self._table_lock = threading.Lock()
        self._waiters_lock = threading.Lock()
        self._to_wake: list[Waiter] = []  # notified under the table lock, woken once it is released
        self.waiters = WaiterRegistry(limits.max_held_requests)
        self.table = JobTable(limits, on_change=self._notify_waiters)
        self._runner_wakeup = iokit.Event()
        self.app = App()
        self.app.add_route("POST", "/jobs", self.create_job, max_body_size=limits.max_request_bytes)
        self.app.add_route("GET", "/jobs/{job_id}", self.get_job)
        self.app.add_route("POST", "/jobs/{job_id}/cancel", self.cancel_job)
        self.app.add_route("GET", "/stats", self.stats)
        self.app.add_route("GET", "/", self.page)

    # -- routes ------------------------------------------------------------------------------------------------------

    async def create_job(self, request) -> Response:
        body = await request.read_body()
        try:
            key = check_idempotency_key(request.headers.get("idempotency-key"), self.limits)
            job_request = parse_job_request(body, self.limits)
            with self._locked_table() as table:
                job, created = table.submit(job_request, iokit.current_time(), key)
                monitor = job.monitor()
        except JobError as error:
            raise http_error(error) from None
        self._runner_wakeup.set()
        return accepted_response(monitor, created)

    async def get_job(self, request) -> Response:
        job_id = request.path_params["job_id"]
        try:
            long_poll = parse_long_poll(request.query, self.limits, jitter=random.random())
            if long_poll is None:
                monitor = await self._read_monitor(job_id)
                terminal = monitor["status"] in ("succeeded", "failed", "canceled")
                extra = () if terminal else (POLL_AGAIN_AFTER,)
                if etag_matches(request.headers.get("if-none-match"), etag(monitor)):
                    return not_modified(monitor, *extra)
                return monitor_response(monitor, 200, *extra)
            return (await self._hold(request, job_id, long_poll)).response()
        except JobError as error:
            raise http_error(error) from None

    async def cancel_job(self, request) -> Response:
        try:
            with self._locked_table() as table:
                monitor = table.cancel(request.path_params["job_id"], iokit.current_time()).monitor()
        except JobError as error:
            raise http_error(error) from None
        self._runner_wakeup.set()
        return monitor_response(monitor, 202)

    async def stats(self, request) -> Response:
        with self._locked_table() as table:
            table.advance(iokit.current_time())
            counts = {"jobs": len(table), "queued": table.queued, "running": table.running}
        with self._waiters_lock:
            counts["held"] = self.waiters.held
        counts["pid"] = os.getpid()
        return Response.json(counts, headers=[NO_STORE])

    async def page(self, request) -> Response:
        return Response(200, _page_bytes(), content_type="text/html; charset=utf-8",
                        headers=[("Cache-Control", "no-cache")])

    # -- holding -----------------------------------------------------------------------------------------------------

    async def _hold(self, request, job_id: str, long_poll) -> Change:
        """Return the job's ``Change`` once its version differs from the one asked about, or when the wait is
        over."""
        # One wait, on the client's connection: it returns if the client leaves, and a change of the job cancels it.
        # So a held request is one task and one pending receive (one thread on ``blocking``), and waking it is one
        # cancel, rather than an event plus a second task watching the connection.
        woken = iokit.CancelScope()
        with self._waiters_lock:
            waiter = self.waiters.register(job_id, woken.cancel)  # first register, then look: no change slips between
        try:
            monitor = await self._read_monitor(job_id)
            seen = monitor["version"] if long_poll.version is None else long_poll.version
            if monitor["version"] != seen or monitor["status"] in ("succeeded", "failed", "canceled"):
                return Change(monitor)
            with woken, request.interruptible(long_poll.wait_seconds):
                await request.wait_disconnected()
        finally:
            if waiter.registered:  # not if a change already took it out (read without the lock: notify clears it)
                with self._waiters_lock:
                    self.waiters.unregister(waiter)
        # Woken by a change: answer with the monitor it came with. The table is not read again, so a thousand woken
        # requests do not queue on its lock, and a job dropped since (a short retention) is still answered.
        # Otherwise (time is up, the server stops, the client left) the job has not changed: read it as it is.
        # News of None: woken without one (a shared store's notifications were cut): read it.
        if waiter.woken and waiter.news is not None:
            return waiter.news
        return Change(await self._read_monitor(job_id))

    async def _read_monitor(self, job_id: str) -> dict:
        return self._monitor(job_id)

    def _monitor(self, job_id: str) -> dict:
        with self._locked_table() as table:
            return table.get(job_id, iokit.current_time()).monitor()

    @contextlib.contextmanager
    def _locked_table(self):
        """Return a context manager giving the table under its lock; the long polls its changes woke are woken once
        the lock is released, so that a woken request (at once a running thread on ``blocking``) finds it free."""
        self._table_lock.acquire()
        try:
            yield self.table
        finally:
            to_wake, self._to_wake = self._to_wake, []
            self._table_lock.release()
            for waiter in to_wake:
                waiter.wake()

    def _notify_waiters(self, job) -> None:
        # Called by the table, under the table lock, after each version change.
        with self._waiters_lock:
            if self.waiters.waiting_on(job.id):
                self._to_wake += self.waiters.notify(job.id, Change(job.monitor()))

    # -- the runner --------------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self):
        """Return an async context manager that runs the runner while the block (the server) runs."""
        async with iokit.TaskGroup() as tasks:
            tasks.spawn(self.run_jobs, name="job-runner")
            yield
            tasks.cancel_scope.cancel()

    async def run_jobs(self) -> None:
        """Advance the table at each of its deadlines, and whenever a job is added or canceled. Runs until cancelled."""
        while True:
            self._runner_wakeup.clear()  # before advancing: a job added after this sets it again, and is not missed
            with self._locked_table() as table:
                table.advance(iokit.current_time())
                deadline = table.next_deadline()
            with iokit.CancelScope(deadline=math.inf if deadline is None else deadline):
                await self._runner_wakeup.wait()


def accepted_response(monitor: dict, created: bool) -> Response:
    """The 202 to ``POST /jobs``: the monitor, where to poll it, and whether an idempotency key replayed it."""
    headers = [("Location", f"/jobs/{monitor['id']}"), POLL_AGAIN_AFTER]
    if not created:
        headers.append(("Idempotent-Replayed", "true"))
    return monitor_response(monitor, 202, *headers)


def store_unavailable(error: RedisConnectionError) -> HttpError:
    return HttpError(503, f"the job store is unavailable: {error}", error="store_unavailable",
                     headers=[("Retry-After", "1")])


RUNNER_POLL_SECONDS = 1.0  # the Redis store's runner advances at least this often (jobs of servers that stopped)
RECONNECT_PAUSE = 0.5
WAKE_SLICE = 256  # long polls woken per turn of the loop (see _wake_in_slices)


class RedisJobsServer(JobsServer):
    """The same routes over ``RedisJobStore``: the jobs in Redis, the held requests in this process, woken through
    the store's ``changed`` channel (see the module's docstring)."""

    def __init__(self, limits: JobLimits, redis: RedisAddress):
        super().__init__(limits)
        self.redis = redis
        self.store: RedisJobStore | None = None  # set by the lifespan

    async def create_job(self, request) -> Response:
        body = await request.read_body()
        try:
            key = check_idempotency_key(request.headers.get("idempotency-key"), self.limits)
            monitor, created = await self.store.submit(parse_job_request(body, self.limits), key)
        except JobError as error:
            raise http_error(error) from None
        except RedisConnectionError as error:
            raise store_unavailable(error) from None
        self._runner_wakeup.set()
        return accepted_response(monitor, created)

    async def cancel_job(self, request) -> Response:
        try:
            monitor = await self.store.cancel(request.path_params["job_id"])
        except JobError as error:
            raise http_error(error) from None
        except RedisConnectionError as error:
            raise store_unavailable(error) from None
        self._runner_wakeup.set()
        return monitor_response(monitor, 202)

    async def stats(self, request) -> Response:
        try:
            counts = {"jobs": None, **await self.store.counts()}
        except RedisConnectionError as error:
            raise store_unavailable(error) from None
        with self._waiters_lock:
            counts["held"] = self.waiters.held
        counts["pid"] = os.getpid()
        return Response.json(counts, headers=[NO_STORE])

    async def _read_monitor(self, job_id: str) -> dict:
        try:
            return await self.store.get(job_id)
        except RedisConnectionError as error:
            raise store_unavailable(error) from None

    @contextlib.asynccontextmanager
    async def lifespan(self):
        async with RedisClient(self.redis) as client:
            self.store = RedisJobStore(client, self.limits)
            async with client.subscription() as subscription:
                await subscription.subscribe(self.store.changed_channel)  # before the first request is held
                async with iokit.TaskGroup() as tasks:
                    tasks.spawn(self.run_jobs, name="job-runner")
                    tasks.spawn(self.wake_on_changes, subscription, name="job-changes")
                    yield
                    tasks.cancel_scope.cancel()

    async def run_jobs(self) -> None:
        """Advance the shared table at the next deadline Redis reports (at least every ``RUNNER_POLL_SECONDS``), and
        whenever this server adds or cancels a job."""
        while True:
            self._runner_wakeup.clear()
            try:
                wait = await self.store.advance()
            except RedisConnectionError:
                wait = RECONNECT_PAUSE
            with iokit.move_on_after(RUNNER_POLL_SECONDS if wait is None else min(wait, RUNNER_POLL_SECONDS)):
                await self._runner_wakeup.wait()

    async def wake_on_changes(self, subscription) -> None:
        """Wake this server's long polls on each job id published on the ``changed`` channel, with the job's monitor
        read once for all of them. When the subscription breaks, changes may have been missed: every held request is
        woken to read its job again, and the subscription is opened anew."""
        while True:
            try:
                message = await subscription.next_message()
                if message is None:
                    continue
                job_id = message[1].decode()
                with self._waiters_lock:
                    if not self.waiters.waiting_on(job_id):
                        continue
                try:
                    news = Change(await self.store.get(job_id))
                except JobError:
                    news = None  # dropped meanwhile: the woken requests read it and answer 404/410
                with self._waiters_lock:
                    to_wake = self.waiters.notify(job_id, news)
            except RedisConnectionError:
                with self._waiters_lock:
                    to_wake = self.waiters.notify_all()
                for waiter in to_wake:
                    waiter.wake()
                await self._resubscribe(subscription)
                continue
            await self._wake_in_slices(to_wake)

    @staticmethod
    async def _wake_in_slices(to_wake: list[Waiter]) -> None:
        """Wake ``to_wake``, ``WAKE_SLICE`` at a time with a turn of the loop between slices. The loop runs every task
        that is ready before it sends what they wrote, so 5,000 requests woken at once were all answered before the
        first answer left (first answer 0.6-1.9 s after the job's end, on the engine's HTTP core); in slices the
        answers flow while the rest are woken (first 0.04-0.1 s; the last one, median of five runs, 1.6 s against
        2.4 s, under a load average of 6-11 on 2 cores). A woken waiter that waits for its slice is out of the registry already, with its
        news: if its client leaves meanwhile, the late wake-up finds its scope exited and does nothing."""
        for first in range(0, len(to_wake), WAKE_SLICE):
            if first:
                await iokit.checkpoint()
            for waiter in to_wake[first:first + WAKE_SLICE]:
                waiter.wake()

    @staticmethod
    async def _resubscribe(subscription) -> None:
        while True:
            await iokit.sleep(RECONNECT_PAUSE)
            try:
                await subscription.reconnect()
                return
            except RedisConnectionError:
                continue


@functools.cache
def _page_bytes() -> bytes:
    return PAGE.read_bytes()  # once, at the first request for it: a few KiB


def make_service(arguments) -> HttpServer:
    limits = serve.limits_from_arguments(arguments, JobLimits)
    http_limits = serve.limits_from_arguments(arguments, HttpLimits)
    check_connections(http_limits.max_connections, limits.max_held_requests, "--max-held-requests")
    redis = None if arguments.store == "memory" else parse_redis_url(arguments.store)  # ValueError: a usage error
    jobs = JobsServer(limits) if redis is None else RedisJobsServer(limits, redis)
    return HttpServer(jobs.app, http_limits, lifespan=jobs.lifespan, single_process=redis is None,
                      cors=cors.policy_from_arguments(arguments))


def main(argv: list[str] | None = None) -> int:
    parser = serve.argument_parser(__doc__.splitlines()[0], HttpLimits, JobLimits)
    parser.set_defaults(max_connections=connections_for(JobLimits.max_held_requests))
    cors.add_argument(parser)
    parser.add_argument("--store", default="memory", metavar="memory|redis://HOST:PORT/DB",
                        help="where the jobs live: this process's memory (default), or Redis, shared by every worker "
                             "and server on it (then --workers may be above 1)")
    return serve.main(make_service, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
