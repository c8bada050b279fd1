"""The ``--store redis`` rows of the patterns workloads (issue 19): ``examples/jobs_server.py`` and
``examples/push_server.py`` with their state in Redis and ``--workers 2``, beside the in-memory rows of one process.

Each backend's server gets a ``redis-server`` of its own (``iokit.redis.RedisServerProcess``: a free port, a temporary
directory, nothing persisted), pinned to the measured core like the servers, so that one server's runner and
subscription never wake for another's jobs, and the measured core carries what Redis costs. A row reports Redis's CPU
beside the server's (``redis_cpu_s``). Without ``redis-server`` the rows are skipped with the reason.

With ``--workers 2`` each worker answers ``/stats`` for itself (its own held requests, its own subscribers, and its
``pid``): ``WorkerStats`` asks on new connections, which the kernel spreads over the workers (``SO_REUSEPORT``), until
every worker has answered, and adds their counts.
"""

from __future__ import annotations

import contextlib
import shutil

from .context import BenchRun
from .processes import measure
from .servers import ServerSpec, example_server_specs

STORE_WORKERS = 2
PARAMS = {"store": "redis", "workers": STORE_WORKERS}
MAX_STATS_ASKS = 64   # new connections to find every worker (each lands on one of 2 at random: 64 misses one 1e-19)


def unavailable() -> str | None:
    """Why the Redis rows cannot run here, or ``None``."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian: apt-get install redis-server; make test installs it)"
    return None


def configurations(memory_configurations: list[dict]) -> list[dict]:
    """The Redis rows of the same configurations (their params say ``store=redis workers=2``)."""
    return [{**params, **PARAMS} for params in memory_configurations]


def workers_of(params: dict) -> int:
    return params.get("workers", 1)


def planned(rows: int) -> int:
    """``rows`` when the Redis rows will be measured, 0 when they are skipped up front (no ``redis-server``)."""
    return rows if unavailable() is None else 0


def skip_all(run: BenchRun, workload: str, configurations: list[dict]) -> bool:
    """Skip every Redis row of ``workload`` with the reason and return ``True`` when ``redis-server`` is missing."""
    reason = unavailable()
    if reason is None:
        return False
    for backend in run.backends:
        for params in configurations:
            run.skip(workload, backend, reason, params)
    return True


class RedisStores(contextlib.ExitStack):
    """A ``redis-server`` per backend of ``run`` and the specs of ``example`` on them (``--store URL --workers 2``,
    then ``options``). A context manager: the Redis servers stop at its end, after the example servers (the sweep
    stops those first)."""

    def __init__(self, run: BenchRun, example: str, *options: str):
        super().__init__()
        self.run, self.example, self.options = run, example, options
        self.specs: list[ServerSpec] = []
        self.redis: dict[str, object] = {}   # backend -> RedisServerProcess

    def __enter__(self) -> "RedisStores":
        from ..redis import RedisServerProcess   # the bench runs without the redis extra too
        super().__enter__()
        try:
            for spec in example_server_specs(self.run, self.example, *self.options):
                if spec.argv is None:
                    self.specs.append(spec)
                    continue
                try:
                    redis = self.enter_context(RedisServerProcess(cpus=self.run.cores.measured))
                except (OSError, RuntimeError) as exc:
                    self.specs.append(ServerSpec(spec.name, None, f"redis-server did not start: {exc}"))
                    continue
                self.redis[spec.name] = redis
                self.specs.append(ServerSpec(spec.name, [*spec.argv, "--store", redis.url,
                                                         "--workers", str(STORE_WORKERS)]))
        except BaseException:
            self.close()
            raise
        return self

    def cpu_s(self, backend: str) -> float | None:
        """The CPU seconds the backend's Redis has used so far (``None``: it has none)."""
        redis = self.redis.get(backend)
        return None if redis is None or redis.process is None else measure(redis.process.pid).cpu_s


class WorkerStats:
    """``/stats`` answers, one per worker (by ``pid``), until all ``workers`` have answered."""

    def __init__(self, workers: int):
        self.workers = workers
        self.by_pid: dict[int, dict] = {}

    def add(self, stats: dict) -> bool:
        """Keep ``stats`` (the newest of its worker) and return whether every worker has answered."""
        self.by_pid[stats.get("pid", 0)] = stats
        return len(self.by_pid) >= self.workers

    def total(self, field: str) -> int:
        return sum(stats.get(field) or 0 for stats in self.by_pid.values())

    def missing(self) -> str:
        return (f"only {len(self.by_pid)} of the {self.workers} workers answered /stats in {MAX_STATS_ASKS} new "
                f"connections")
