"""The jobs server's table in Redis: job records with versions and TTLs, shared by every worker and server.

The rules are those of ``iokit.patterns.jobs`` (states, versions, capacity, retention, idempotency keys); what
changes is where they run. Every change is one Lua script, so that it is atomic across processes, and the clock is
Redis's own (``TIME`` inside the script), so that servers on machines whose clocks differ agree on when a job ends.

Keys, under a prefix (default ``iokit:jobs:``):

* ``job:<id>``: a hash (``status``, ``version``, ``duration_ms``, ``fail``, ``result`` as JSON, ``error``,
  ``ends_at`` and ``finished_at`` in Redis milliseconds, ``idempotency_key``, ``fingerprint``). A finished job gets a
  TTL of ``retention_seconds``: Redis drops it, not a timer of ours.
* ``gone:<id>``: set when a job finishes, living ``GONE_SECONDS`` past its retention, so that a dropped id answers
  410 rather than 404 for that long (the in-memory table counts ``max_gone_ids`` instead).
* ``key:<idempotency key>``: the job id, living as long as the job.
* ``queue`` (a list of queued ids, oldest first) and ``running`` (a sorted set of running ids by end time): the
  capacity limits (``max_running_jobs``, ``max_queued_jobs``) hold across all servers.
* ``changed``: the pub/sub channel on which every script publishes the id of each job whose version changed. Each
  server subscribes once and wakes its own held long polls (``iokit.patterns.jobs.WaiterRegistry``).

Jobs end by time: any server's runner may run ``advance`` (the script finishes the jobs whose end has passed and
starts queued ones in the freed slots); a read that finds a running job past its end advances first, so a poll never
sees a job late whatever the runners do. Not kept across processes: ``max_retained_jobs`` (retention is by TTL).
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any

import hiredis

from ..patterns.jobs import (IdempotencyConflict, JobFinished, JobGone, JobNotFound, JobRequest, QueueFull)
from ..patterns.limits import JobLimits
from .client import RedisClient
from .connection import pack_commands

DEFAULT_PREFIX = "iokit:jobs:"
GONE_SECONDS = 3600.0
TERMINAL = ("succeeded", "failed", "canceled")
_READ_FIELDS = ("status", "version", "result", "error", "ends_at")  # what ``get`` reads of a job's hash, in order
_TIME = pack_commands([("TIME",)])

_PRELUDE = """
local prefix = ARGV[1]
local max_running = tonumber(ARGV[2])
local retention_ms = tonumber(ARGV[3])
local gone_ms = tonumber(ARGV[4])
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function job_key(id) return prefix .. 'job:' .. id end
local function changed(id) redis.call('PUBLISH', prefix .. 'changed', id) end
local function start_queued(at)
  while redis.call('ZCARD', prefix .. 'running') < max_running do
    local id = redis.call('LPOP', prefix .. 'queue')
    if not id then break end
    local ends = at + tonumber(redis.call('HGET', job_key(id), 'duration_ms'))
    redis.call('HSET', job_key(id), 'status', 'running', 'ends_at', ends)
    redis.call('HINCRBY', job_key(id), 'version', 1)
    redis.call('ZADD', prefix .. 'running', ends, id)
    changed(id)
  end
end
local function finish(id, status, result, err, at)
  local key = job_key(id)
  redis.call('HSET', key, 'status', status, 'result', result, 'error', err, 'finished_at', at)
  redis.call('HDEL', key, 'ends_at')
  redis.call('HINCRBY', key, 'version', 1)
  redis.call('PEXPIRE', key, retention_ms)
  local idempotency_key = redis.call('HGET', key, 'idempotency_key')
  if idempotency_key and idempotency_key ~= '' then
    redis.call('PEXPIRE', prefix .. 'key:' .. idempotency_key, retention_ms)
  end
  redis.call('SET', prefix .. 'gone:' .. id, '1', 'PX', retention_ms + gone_ms)
  changed(id)
end
local function advance(now)
  local due = redis.call('ZRANGEBYSCORE', prefix .. 'running', '-inf', now, 'WITHSCORES')
  for i = 1, #due, 2 do
    local id, ends = due[i], tonumber(due[i + 1])
    redis.call('ZREM', prefix .. 'running', id)
    local key = job_key(id)
    if redis.call('HGET', key, 'fail') == '1' then
      finish(id, 'failed', 'null', 'the job failed, as it was asked to', ends)
    else
      finish(id, 'succeeded', '{"duration_ms":' .. redis.call('HGET', key, 'duration_ms') .. '}', '', ends)
    end
    start_queued(ends)
  end
end
"""

_SUBMIT = _PRELUDE + """
local max_queued = tonumber(ARGV[5])
local id, duration, fail, idempotency_key, fingerprint = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local now = now_ms()
advance(now)
if idempotency_key ~= '' then
  local existing = redis.call('GET', prefix .. 'key:' .. idempotency_key)
  if existing and redis.call('EXISTS', job_key(existing)) == 1 then
    if redis.call('HGET', job_key(existing), 'fingerprint') ~= fingerprint then return {'conflict'} end
    return {'existing', existing, redis.call('HGETALL', job_key(existing))}
  end
end
local running = redis.call('ZCARD', prefix .. 'running')
if running >= max_running and redis.call('LLEN', prefix .. 'queue') >= max_queued then
  local first = redis.call('ZRANGE', prefix .. 'running', 0, 0, 'WITHSCORES')
  return {'full', tostring(tonumber(first[2]) - now)}
end
redis.call('HSET', job_key(id), 'status', 'queued', 'version', 1, 'duration_ms', duration, 'fail', fail,
           'idempotency_key', idempotency_key, 'fingerprint', fingerprint, 'result', 'null', 'error', '')
if idempotency_key ~= '' then redis.call('SET', prefix .. 'key:' .. idempotency_key, id) end
redis.call('RPUSH', prefix .. 'queue', id)
start_queued(now)
return {'created', id, redis.call('HGETALL', job_key(id))}
"""

_CANCEL = _PRELUDE + """
local id = ARGV[5]
local now = now_ms()
advance(now)
local key = job_key(id)
if redis.call('EXISTS', key) == 0 then
  if redis.call('EXISTS', prefix .. 'gone:' .. id) == 1 then return {'gone'} end
  return {'missing'}
end
local status = redis.call('HGET', key, 'status')
if status == 'succeeded' or status == 'failed' then return {'finished', status} end
if status ~= 'canceled' then
  if status == 'queued' then redis.call('LREM', prefix .. 'queue', 0, id)
  else redis.call('ZREM', prefix .. 'running', id) end
  finish(id, 'canceled', 'null', 'canceled by request', now)
  start_queued(now)
end
return {'ok', id, redis.call('HGETALL', key)}
"""

_ADVANCE = _PRELUDE + """
local now = now_ms()
advance(now)
local first = redis.call('ZRANGE', prefix .. 'running', 0, 0, 'WITHSCORES')
return {tostring(now), first[2] or '-1'}
"""


def monitor_of(job_id: str, fields: list[bytes] | dict[bytes, bytes]) -> dict:
    """Return the monitor ``{id, status, result, error, version}`` of a job hash (HGETALL's reply)."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2]))
    error = fields.get(b"error")
    return {"id": job_id, "status": fields[b"status"].decode(), "result": _result_of(fields.get(b"result")),
            "error": error.decode() if error else None, "version": int(fields[b"version"])}


def _result_of(field: bytes | None) -> Any:
    return None if field is None or field == b"null" else json.loads(field)  # most monitors: no result yet


class RedisJobStore:
    """The job table of ``iokit.patterns.jobs`` in Redis (see the module's docstring). Raises that module's
    ``JobError`` kinds, and ``RedisConnectionError`` when Redis does not answer."""

    def __init__(self, client: RedisClient, limits: JobLimits, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.limits = limits
        self.prefix = prefix
        self.changed_channel = prefix + "changed"
        self._common = (prefix, limits.max_running_jobs, math.ceil(limits.retention_seconds * 1000),
                        math.ceil(GONE_SECONDS * 1000))

    async def _script(self, source: str, *arguments: Any) -> Any:
        return await self.client.execute("EVAL", source, 0, *self._common, *arguments)

    async def submit(self, request: JobRequest, idempotency_key: str | None = None) -> tuple[dict, bool]:
        """Create a job (started at once if a slot is free); return its monitor and whether it was created."""
        reply = await self._script(_SUBMIT, self.limits.max_queued_jobs, secrets.token_hex(16), request.duration_ms,
                                   int(request.fail), idempotency_key or "", request.fingerprint())
        outcome = reply[0]
        if outcome == b"conflict":
            raise IdempotencyConflict("this Idempotency-Key was used for another request")
        if outcome == b"full":
            seconds = max(1, min(60, math.ceil(int(reply[1]) / 1000)))
            raise QueueFull(f"{self.limits.max_queued_jobs} jobs are already queued; retry later", seconds)
        return monitor_of(reply[1].decode(), reply[2]), outcome == b"created"

    async def get(self, job_id: str) -> dict:
        """Return the job's monitor: one round trip (``HMGET`` of the fields a monitor needs, and ``TIME``, encoded
        in one step), unless the job is running past its end (then it advances) or is not there (then a second one
        tells 404 from 410)."""
        fields, (seconds, microseconds) = await self.client.pipeline_encoded(
            hiredis.pack_command(("HMGET", self._job_key(job_id), *_READ_FIELDS)) + _TIME, 2, read_only=True)
        status, version, result, error, ends_at = fields
        if status is None:  # every job's hash has a status: the hash is not there
            if await self.client.execute("EXISTS", self.prefix + "gone:" + job_id):
                raise JobGone(f"job {job_id} finished more than {self.limits.retention_seconds:g} s ago and was "
                              f"dropped")
            raise JobNotFound(f"no job {job_id}")
        if status == b"running" and int(ends_at) <= int(seconds) * 1000 + int(microseconds) // 1000:
            await self.advance()
            return await self.get(job_id)
        return {"id": job_id, "status": status.decode(), "result": _result_of(result),
                "error": error.decode() if error else None, "version": int(version)}

    async def cancel(self, job_id: str) -> dict:
        """Cancel a queued or running job and return its monitor (a canceled one stays canceled)."""
        reply = await self._script(_CANCEL, job_id)
        outcome = reply[0]
        if outcome == b"gone":
            raise JobGone(f"job {job_id} finished more than {self.limits.retention_seconds:g} s ago and was dropped")
        if outcome == b"missing":
            raise JobNotFound(f"no job {job_id}")
        if outcome == b"finished":
            raise JobFinished(f"job {job_id} already {reply[1].decode()}")
        return monitor_of(job_id, reply[2])

    async def advance(self) -> float | None:
        """Finish the jobs whose end has passed, start queued ones; return the seconds until the next job ends
        (``None``: none runs)."""
        now_ms, next_ms = await self._script(_ADVANCE)
        next_ms = int(float(next_ms))
        return None if next_ms < 0 else max(0.0, (next_ms - int(now_ms)) / 1000)

    async def counts(self) -> dict[str, int]:
        """Return ``queued`` and ``running``, across every server."""
        queued, running = await self.client.pipeline([("LLEN", self.prefix + "queue"),
                                                      ("ZCARD", self.prefix + "running")])
        return {"queued": queued, "running": running}

    def _job_key(self, job_id: str) -> str:
        return self.prefix + "job:" + job_id
