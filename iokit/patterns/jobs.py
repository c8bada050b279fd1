"""Long-running jobs that clients poll: the job table and the registry of held requests, with no I/O in them.

A job is asked for with ``POST /jobs`` and answered at once with 202 and a *monitor* (``{id, status, result, error,
version}``) that the client polls. What this module decides:

* **States and versions.** ``queued -> running -> succeeded | failed``, and ``canceled`` from either of the first two.
  Every change of state adds 1 to the job's ``version`` (it starts at 1), which the server sends as the ``ETag``; a long
  poll names the version it has seen and is answered when the job's version differs.
* **Capacity.** At most ``max_running_jobs`` run at once; the others wait, at most ``max_queued_jobs`` of them (then
  ``QueueFull``, with how long until a slot frees: the Retry-After). A job "runs" by reaching its end time: the server's
  one job-runner task calls ``advance(now)`` at each ``next_deadline()``, so no thread or task sleeps per job.
* **Retention.** A finished job stays readable ``retention_seconds``, then its id answers ``JobGone`` (410) for as long
  as the table remembers it (``max_gone_ids``), then ``JobNotFound`` (404).
* **Idempotency keys.** A ``POST`` that repeats an ``Idempotency-Key`` with the same request gets the same job back;
  with another request it gets ``IdempotencyConflict`` (409). A key lives as long as its job.

``WaiterRegistry`` holds the long polls. Its rule is *register before checking*: a handler registers its wake-up first,
then reads the job; a change that lands between the two wakes the waiter (which then finds the new version), so no
change is ever missed, and nothing needs a lock held across both steps.

Times are whatever clock the caller passes in (the server uses ``iokit.current_time()``), so tests can drive it by hand.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import itertools
import json
import math
import secrets
from typing import Any, Callable

from ..http.client_input import InvalidJson, read_decimal, read_integer, read_json
from .limits import JobLimits


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


# -- errors: each names what the client did wrong or can do ------------------------------------------------------------

class JobError(Exception):
    """Base of the job table's refusals; ``str()`` is a sentence for the client."""


class InvalidJobRequest(JobError):
    """The request body or a parameter is not what the API takes (400)."""


class JobNotFound(JobError):
    """No job has, or recently had, this id (404)."""


class JobGone(JobError):
    """The job existed but has passed its retention time (410)."""


class JobFinished(JobError):
    """A cancel for a job that already succeeded or failed (409)."""


class IdempotencyConflict(JobError):
    """The idempotency key was used before with another request (409)."""


class QueueFull(JobError):
    """Too many jobs are queued (503); ``retry_after`` is whole seconds until a slot should free."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class TooManyWaiters(JobError):
    """The server holds as many long polls as it may (503)."""


# -- requests ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class JobRequest:
    """What a client asked for: run ``duration_ms``, then succeed (or fail if ``fail``)."""

    duration_ms: int
    fail: bool = False

    def fingerprint(self) -> str:
        """Return a canonical text of the request, to compare two requests made with one idempotency key."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def parse_job_request(body: bytes, limits: JobLimits) -> JobRequest:
    """Return the ``JobRequest`` in a JSON body ``{"duration_ms": N, "fail": bool}``.

    Raises ``InvalidJobRequest`` for a body that is not a JSON object, an unknown field, a ``duration_ms`` that is not
    an integer from 0 to ``max_duration_ms``, or a ``fail`` that is not a boolean.
    """
    try:
        value = read_json(body)
    except InvalidJson as error:
        raise InvalidJobRequest(str(error)) from None
    if not isinstance(value, dict):
        raise InvalidJobRequest("the body must be a JSON object")
    unknown = sorted(set(value) - {"duration_ms", "fail"})
    if unknown:
        raise InvalidJobRequest(f"unknown field(s): {', '.join(unknown)}")
    duration = value.get("duration_ms")
    if type(duration) is not int or not 0 <= duration <= limits.max_duration_ms:  # bool is an int: refuse it too
        raise InvalidJobRequest(f"duration_ms must be an integer from 0 to {limits.max_duration_ms}")
    fail = value.get("fail", False)
    if not isinstance(fail, bool):
        raise InvalidJobRequest("fail must be true or false")
    return JobRequest(duration, fail)


def check_idempotency_key(key: str | None, limits: JobLimits) -> str | None:
    """Return ``key`` if it is usable (1 to ``max_idempotency_key_chars`` visible ASCII characters), ``None`` if absent.
    Raises ``InvalidJobRequest`` otherwise."""
    if key is None:
        return None
    if not 0 < len(key) <= limits.max_idempotency_key_chars or not all(33 <= ord(c) <= 126 for c in key):
        raise InvalidJobRequest(f"Idempotency-Key must be 1 to {limits.max_idempotency_key_chars} visible ASCII "
                                f"characters")
    return key


@dataclasses.dataclass(frozen=True)
class LongPoll:
    """A poll that may be held: answer when the version differs from ``version`` (``None``: from the current one), or
    after ``wait_seconds`` (already including the jitter)."""

    wait_seconds: float
    version: int | None


def parse_long_poll(query: dict[str, str], limits: JobLimits, jitter: float) -> LongPoll | None:
    """Return the ``LongPoll`` asked for by ``?wait=S&version=V``, or ``None`` for a plain (short) poll.

    ``jitter`` is a number from 0 to 1 (the caller's random draw) scaled by ``limits.wait_jitter``. Raises
    ``InvalidJobRequest`` for a ``wait`` that is not a number from 0 to ``max_wait_seconds``, or a ``version`` that is
    not a whole number.
    """
    if "wait" not in query and "version" not in query:
        return None
    wait = limits.default_wait_seconds
    if "wait" in query:
        wait = read_decimal(query["wait"])
        if wait is None or wait > limits.max_wait_seconds:
            raise InvalidJobRequest(f"wait must be a number of seconds from 0 to {limits.max_wait_seconds:g}, "
                                    f"not {query['wait'][:40]!r}")
    version = None
    if "version" in query:
        version = read_integer(query["version"])
        if version is None:
            raise InvalidJobRequest(f"version must be a whole number, not {query['version'][:40]!r}")
    return LongPoll(wait * (1 + limits.wait_jitter * jitter), version)


# -- the table ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    """One job. ``ends_at`` is set while it runs, ``finished_at`` once it is terminal (both on the caller's clock)."""

    id: str
    request: JobRequest
    status: JobStatus = JobStatus.QUEUED
    version: int = 1
    result: Any = None
    error: str | None = None
    ends_at: float | None = None
    finished_at: float | None = None
    idempotency_key: str | None = None

    def monitor(self) -> dict:
        """Return the monitor a client sees: ``{id, status, result, error, version}``."""
        return {"id": self.id, "status": self.status.value, "result": self.result, "error": self.error,
                "version": self.version}


class JobTable:
    """Every job the server knows. Not thread-safe: the server calls it under one lock.

    ``on_change(job)`` is called after every version change (the server wakes that job's long polls with it).
    """

    def __init__(self, limits: JobLimits, on_change: Callable[[Job], None] = lambda job: None,
                 new_id: Callable[[], str] = lambda: secrets.token_hex(16)):
        self.limits = limits
        self._on_change = on_change
        self._new_id = new_id
        self._jobs: dict[str, Job] = {}
        self._queue: collections.deque[str] = collections.deque()   # queued ids, oldest first
        self._running: list[tuple[float, int, str]] = []              # heap of (ends_at, seq, id)
        self._finished: collections.deque[str] = collections.deque()  # terminal ids, oldest finish first
        self._gone: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._keys: dict[str, str] = {}                               # idempotency key -> job id
        self._sequence = itertools.count()

    # -- what clients do -----------------------------------------------------------------------------------------------

    def submit(self, request: JobRequest, now: float, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Create a job for ``request`` (starting it now if a slot is free); return ``(job, created)``.

        With an ``idempotency_key`` already used for the same request, return that job and ``created=False``.
        Raises ``IdempotencyConflict`` (the key was used for another request) or ``QueueFull``.
        """
        self.advance(now)
        if idempotency_key is not None and idempotency_key in self._keys:
            job = self._jobs[self._keys[idempotency_key]]
            if job.request.fingerprint() != request.fingerprint():
                raise IdempotencyConflict("this Idempotency-Key was used for another request")
            return job, False
        if len(self._running) >= self.limits.max_running_jobs and len(self._queue) >= self.limits.max_queued_jobs:
            raise QueueFull(f"{len(self._queue)} jobs are already queued; retry later", self._seconds_to_a_slot(now))
        job = Job(self._new_id(), request, idempotency_key=idempotency_key)
        self._jobs[job.id] = job
        if idempotency_key is not None:
            self._keys[idempotency_key] = job.id
        self._queue.append(job.id)
        self._start_queued(now)
        return job, True

    def get(self, job_id: str, now: float) -> Job:
        """Return the job. Raises ``JobNotFound`` or ``JobGone``."""
        self.advance(now)
        job = self._jobs.get(job_id)
        if job is None:
            if job_id in self._gone:
                raise JobGone(f"job {job_id} finished more than {self.limits.retention_seconds:g} s ago and was "
                              f"dropped")
            raise JobNotFound(f"no job {job_id}")
        return job

    def cancel(self, job_id: str, now: float) -> Job:
        """Cancel a queued or running job (a canceled one stays canceled) and return it.
        Raises ``JobNotFound``, ``JobGone``, or ``JobFinished`` for a job that already succeeded or failed."""
        job = self.get(job_id, now)
        if job.status is JobStatus.CANCELED:
            return job
        if job.status.terminal:
            raise JobFinished(f"job {job_id} already {job.status.value}")
        if job.status is JobStatus.QUEUED:
            self._queue.remove(job.id)
        else:
            self._running = [entry for entry in self._running if entry[2] != job.id]
            heapq.heapify(self._running)
        self._finish(job, JobStatus.CANCELED, now, error="canceled by request")
        self._start_queued(now)
        return job

    # -- time ----------------------------------------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Bring every job up to ``now``: finish the jobs whose time is up, start queued ones in the freed slots, drop
        finished jobs past their retention."""
        while self._running and self._running[0][0] <= now:
            ends_at, _, job_id = heapq.heappop(self._running)
            job = self._jobs[job_id]
            if job.request.fail:
                self._finish(job, JobStatus.FAILED, ends_at, error="the job failed, as it was asked to")
            else:
                self._finish(job, JobStatus.SUCCEEDED, ends_at, result={"duration_ms": job.request.duration_ms})
            # A slot freed at ends_at: the next queued job started then, not now (the runner may be late).
            self._start_queued(ends_at)
        self._drop_expired(now)

    def next_deadline(self) -> float | None:
        """Return when the table next changes by itself (a job ends, a finished job expires), or ``None``."""
        deadlines = []
        if self._running:
            deadlines.append(self._running[0][0])
        if self._finished:
            deadlines.append(self._jobs[self._finished[0]].finished_at + self.limits.retention_seconds)
        return min(deadlines, default=None)

    # -- counts, for statistics and tests ------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    def __len__(self) -> int:
        return len(self._jobs)

    # -- inside --------------------------------------------------------------------------------------------------------

    def _start_queued(self, now: float) -> None:
        while self._queue and len(self._running) < self.limits.max_running_jobs:
            job = self._jobs[self._queue.popleft()]
            job.status = JobStatus.RUNNING
            job.ends_at = now + job.request.duration_ms / 1000
            heapq.heappush(self._running, (job.ends_at, next(self._sequence), job.id))
            self._changed(job)

    def _finish(self, job: Job, status: JobStatus, now: float, *, result: Any = None, error: str | None = None) -> None:
        job.status, job.result, job.error = status, result, error
        job.finished_at, job.ends_at = now, None
        self._finished.append(job.id)
        self._changed(job)
        if len(self._finished) > self.limits.max_retained_jobs:
            self._drop(self._finished.popleft())

    def _drop_expired(self, now: float) -> None:
        while self._finished and self._jobs[self._finished[0]].finished_at + self.limits.retention_seconds <= now:
            self._drop(self._finished.popleft())

    def _drop(self, job_id: str) -> None:
        job = self._jobs.pop(job_id)
        if job.idempotency_key is not None:
            self._keys.pop(job.idempotency_key, None)
        self._gone[job_id] = None
        while len(self._gone) > self.limits.max_gone_ids:
            self._gone.popitem(last=False)

    def _changed(self, job: Job) -> None:
        job.version += 1
        self._on_change(job)

    def _seconds_to_a_slot(self, now: float) -> int:
        # Queued jobs ahead of a new one take the first slots to free; a rough figure is enough for Retry-After.
        if not self._running:
            return 1
        return max(1, min(60, math.ceil(self._running[0][0] - now)))


# -- held requests -----------------------------------------------------------------------------------------------------

class Waiter:
    """One held request. When its job changes, ``notify`` sets ``woken`` and ``news`` (what the change came with: the
    job's monitor at that moment, so the woken request need not look again), and its caller calls ``wake()``."""

    __slots__ = ("key", "wake", "woken", "news", "registered")

    def __init__(self, key: str, wake: Callable[[], None]):
        self.key = key
        self.wake = wake
        self.woken = False
        self.news: Any = None
        self.registered = True


class WaiterRegistry:
    """The long polls held now, by job id, at most ``max_waiters`` of them. Not thread-safe: call it under a lock."""

    def __init__(self, max_waiters: int):
        self.max_waiters = max_waiters
        self._by_key: dict[str, set[Waiter]] = {}
        self._count = 0

    def register(self, key: str, wake: Callable[[], None]) -> Waiter:
        """Return a new waiter on ``key``. Raises ``TooManyWaiters`` when ``max_waiters`` are held."""
        if self._count >= self.max_waiters:
            raise TooManyWaiters(f"the server holds {self._count} long polls, its limit; retry shortly")
        waiter = Waiter(key, wake)
        self._by_key.setdefault(key, set()).add(waiter)
        self._count += 1
        return waiter

    def unregister(self, waiter: Waiter) -> None:
        """Forget ``waiter`` (nothing happens if it was woken or forgotten already)."""
        if not waiter.registered:
            return
        waiter.registered = False
        self._count -= 1
        waiters = self._by_key[waiter.key]
        waiters.discard(waiter)
        if not waiters:
            del self._by_key[waiter.key]

    def notify(self, key: str, news: Any = None) -> list[Waiter]:
        """Forget every waiter on ``key``, marking it woken with ``news``, and return them: the caller calls their
        ``wake()`` once it has released its locks (a woken waiter runs at once on ``blocking``, and should not find
        them held)."""
        waiters = list(self._by_key.pop(key, ()))
        for waiter in waiters:
            waiter.registered, waiter.woken, waiter.news = False, True, news
        self._count -= len(waiters)
        return waiters

    def waiting_on(self, key: str) -> bool:
        """Return whether any waiter is held on ``key``."""
        return key in self._by_key

    def notify_all(self) -> list[Waiter]:
        """Forget every waiter, marking each woken with no news (it reads the job again), and return them: for when
        changes may have been missed (a shared store's notifications were cut)."""
        waiters = [waiter for waiters in self._by_key.values() for waiter in waiters]
        self._by_key.clear()
        for waiter in waiters:
            waiter.registered, waiter.woken, waiter.news = False, True, None
        self._count = 0
        return waiters

    @property
    def held(self) -> int:
        return self._count
