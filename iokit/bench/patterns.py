"""The seed's patterns, as one workload family:

* ``waiting-clients`` (``waiting_clients.py``): what a waiting client costs each backend in memory, and whether the
  others still get served quickly.
* ``held-long-polls`` (``held_polls.py``): the same question for long polls held by ``examples/jobs_server.py``.
* ``upload`` (``uploads.py``): upload throughput with sync vs async durability, against ``examples/upload_server.py``.
* ``updates`` (``updates.py``): for N clients waiting on updates produced at a fixed rate, short polling vs long
  polling vs push (requests sent, bytes on the wire, event-to-client latency), against ``examples/jobs_server.py``
  and ``examples/push_server.py``.

A workload whose example server is missing is skipped with "needs examples/NAME".
"""

from __future__ import annotations

from . import held_polls, updates, uploads, waiting_clients
from .context import BenchRun

NAME = "patterns"
WORKLOADS = ("waiting-clients", "held-long-polls", "upload", "updates")
RATIO_REFERENCES: dict[str, tuple[str, ...]] = {"waiting-clients": ("ref:uvloop",)}
MEMBERS = (waiting_clients, held_polls, uploads, updates)


def planned(run: BenchRun) -> int:
    return sum(member.planned(run) for member in MEMBERS)


def run(run: BenchRun) -> None:
    for member in MEMBERS:
        member.run(run)
