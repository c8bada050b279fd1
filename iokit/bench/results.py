"""One measured row, how repeated runs become one row, and the JSON document of a whole run.

The JSON is a contract (DESIGN.md): ``{"machine": {...}, "results": [...]}``, one result per (workload, backend,
params) with at least ``workload, backend, params, ops_per_s, p50_us, p99_us, cpu_s``. Outside references appear as
backends named ``ref:<name>``. What could not be measured goes to ``skipped`` with the reason, never into ``results``
with made-up numbers.

How repeated runs are combined: throughput and the latency percentiles are the **median over runs** (robust to one run
disturbed by a noisy neighbour); CPU seconds and context switches are **summed** over the timed runs and divided by the
operations of those same runs, which gives CPU microseconds per operation: the figure that still compares servers when
the load generator, not the server, is the bottleneck.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from .processes import Usage


@dataclasses.dataclass
class RunSample:
    """One timed run of one configuration."""

    ops: int
    seconds: float
    p50_us: float
    p99_us: float
    usage: Usage | None = None   # of the measured process over this run, where known


@dataclasses.dataclass
class Result:
    workload: str
    backend: str
    params: dict
    ops_per_s: float
    p50_us: float
    p99_us: float
    cpu_s: float | None
    cpu_us_per_op: float | None
    context_switches: int | None
    context_switches_per_op: float | None
    peak_rss_kib: int | None
    runs_ops_per_s: list[float]
    notes: list[str] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        return self.backend.startswith("ref:")

    def key(self) -> tuple:
        return (self.workload, params_key(self.params))


def params_key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def summarize(workload: str, backend: str, params: dict, runs: list[RunSample], *,
              cpu_override: tuple[float, int | None] | None = None, peak_rss_kib: int | None = None,
              notes: list[str] | None = None, extra: dict | None = None) -> Result:
    """Combine the timed runs of one configuration into a ``Result`` (see the module docstring for how).

    ``cpu_override`` gives (cpu seconds, context switches) measured by the tool itself (fio) instead of per-run usage.
    """
    if not runs:
        raise ValueError("no runs to summarize")
    total_ops = sum(run.ops for run in runs)
    if cpu_override is not None:
        cpu_s, switches = cpu_override
    elif all(run.usage is not None for run in runs):
        cpu_s = sum(run.usage.cpu_s for run in runs)
        switches = sum(run.usage.context_switches for run in runs)
        peak_rss_kib = peak_rss_kib if peak_rss_kib is not None else max(run.usage.peak_rss_kib for run in runs)
    else:
        cpu_s, switches = None, None
    per_run = [run.ops / run.seconds if run.seconds > 0 else 0.0 for run in runs]
    notes = list(notes or [])
    if not total_ops:
        notes.append("no operation completed in the timed runs: the server (or the machine) stalled")
    return Result(
        workload=workload, backend=backend, params=params,
        ops_per_s=round(statistics.median(per_run), 1),
        p50_us=round(statistics.median(run.p50_us for run in runs), 2),
        p99_us=round(statistics.median(run.p99_us for run in runs), 2),
        cpu_s=None if cpu_s is None else round(cpu_s, 4),
        cpu_us_per_op=None if cpu_s is None or not total_ops else round(cpu_s * 1e6 / total_ops, 3),
        context_switches=switches,
        context_switches_per_op=None if switches is None or not total_ops else round(switches / total_ops, 4),
        peak_rss_kib=peak_rss_kib,
        runs_ops_per_s=[round(x, 1) for x in per_run],
        notes=notes,
        extra=dict(extra or {}),
    )


def percentile(sorted_values: list[float], percent: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * percent // 100))   # ceil without floats drifting
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


@dataclasses.dataclass
class Skipped:
    workload: str
    backend: str
    reason: str
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Report:
    """Everything one ``python -m iokit.bench`` run produced."""

    machine: dict
    settings: dict
    results: list[Result] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "settings": self.settings,
                "results": [dataclasses.asdict(r) for r in self.results],
                "skipped": [dataclasses.asdict(s) for s in self.skipped]}

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
