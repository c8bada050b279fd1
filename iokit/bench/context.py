"""What every workload family is handed: the settings of this run, the core plan, which backends and references to
measure, and where results, skips and progress go.

Two profiles: the full one (the figures of ``docs/benchmarks.md``) and ``--quick`` (what ``make bench`` runs: the same
matrix of workloads and parameters, shorter runs and a smaller file, a few minutes on 2 cores). Individual knobs can be
overridden from the command line, which is how the tests make a run of every workload take seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .cbuild import BuildFailed, build, cache_dir
from .machine import CorePlan
from .progress import Progress
from .results import Report, Result, Skipped


@dataclasses.dataclass(frozen=True)
class Settings:
    quick: bool
    warmup_s: float                     # load before the timed runs (caches, TCP windows, thread pools)
    run_s: float                        # length of one timed run
    runs: int                           # timed runs per configuration (median taken)
    connections: tuple[int, ...]        # socket workloads: concurrent connections swept
    message_sizes: tuple[int, ...]      # echo message sizes in bytes
    pipeline_depth: int                 # messages in flight per connection in the pipelined mode
    file_size_mib: int                  # the random-read file
    queue_depths: tuple[int, ...]       # file reads kept in flight
    fsync_every: tuple[int, ...]        # sequential writes per fsync
    idle_clients: int                   # waiting clients for the memory-per-client workload
    upload_mib: int                     # size of one upload in the upload workload
    upload_chunks_kib: tuple[int, ...]  # chunk sizes swept in the upload workload
    update_clients: tuple[int, ...]     # client counts swept in the updates workload (short/long polling, push)
    update_rate: float                  # updates produced per second, all clients together (rarer than one per
                                        # client per 1 s poll interval)
    updates_seconds: float              # length of the updates schedule
    data_dir: Path                      # where the test files live (must allow O_DIRECT for those rows)

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


PROFILES = {
    "full": dict(warmup_s=1.0, run_s=1.0, runs=5, file_size_mib=1024, idle_clients=10000, upload_mib=64,
                 update_clients=(32, 1000, 10000), update_rate=8, updates_seconds=10),
    "quick": dict(warmup_s=0.2, run_s=0.3, runs=3, file_size_mib=256, idle_clients=1000, upload_mib=8,
                  update_clients=(32, 1000), update_rate=8, updates_seconds=4),
}


def make_settings(quick: bool, data_dir: Path | None = None, **overrides) -> Settings:
    """The quick or full profile, with any knob in ``overrides`` that is not None replacing the profile's value."""
    values = dict(connections=(1, 16, 64, 256), message_sizes=(64, 16384), pipeline_depth=16, queue_depths=(1, 32),
                  fsync_every=(1, 32), upload_chunks_kib=(64, 1024), **PROFILES["quick" if quick else "full"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(quick=quick, data_dir=data_dir or cache_dir() / "data", **values)


@dataclasses.dataclass
class BenchRun:
    settings: Settings
    cores: CorePlan
    backends: list[str]                 # iokit backends to measure (available here)
    references: frozenset[str] | None   # reference names to measure ("fio-psync", ...); None: every one present
    workloads: frozenset[str] | None    # workload names to measure ("echo", "file-write", ...); None: all
    report: Report
    progress: Progress = dataclasses.field(default_factory=lambda: Progress(1))
    build_failures: dict[str, str] = dataclasses.field(default_factory=dict)

    def wants_reference(self, name: str) -> bool:
        return self.references is None or name in self.references

    def wants_workload(self, name: str) -> bool:
        return self.workloads is None or name in self.workloads

    def record(self, result: Result) -> None:
        self.report.results.append(result)

    def skip(self, workload: str, backend: str, reason: str, params: dict | None = None) -> None:
        self.report.skipped.append(Skipped(workload, backend, reason, dict(params or {})))
        where = f" {params}" if params else ""
        self.progress.note(f"  skipped {workload}{where} on {backend}: {reason}")

    def c_program(self, name: str) -> Path | None:
        """The built C program, or None; the reason is noted once and kept in ``build_failures[name]``."""
        if name in self.build_failures:
            return None
        try:
            return build(name)
        except BuildFailed as exc:
            self.build_failures[name] = str(exc)
            self.progress.note(f"  cannot build {name}: {exc}")
            return None
