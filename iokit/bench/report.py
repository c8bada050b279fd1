"""The terminal table: one block per workload, one row per (parameters, backend), with ratios to the references.

How to read a row: ``ops/s`` is the median over the timed runs (operations are reads, durable writes, echoed messages
or HTTP responses); ``p50``/``p99`` are the medians of each run's percentiles, in microseconds; ``CPU us/op`` is the
measured process's CPU time (user + system, all threads) per operation, which still tells servers apart when the load
generator is the bottleneck; ``ctx/op`` is context switches per operation; ``RSS`` is the measured process's peak
resident memory during the timed runs. ``xREF`` is this row's ops/s divided by that reference's in the same block:
above 1.00 we are faster.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from .results import Report, Result

TITLES = {
    "file-randread": "file: 4 KiB random reads (cache=warm: page cache; direct: O_DIRECT), qd = reads in flight",
    "file-randread-batched": ("file: 4 KiB random reads as batched ops (read_batch: `batch` blocks an op, up to qd "
                              "reads in flight); CPU us/op = per read"),
    "file-write": "file: sequential 4 KiB writes, fsync after every N (latency = until durable; fio's: per write)",
    "echo": "socket echo: C load generator on the other core; ops = messages echoed",
    "http": ("HTTP keep-alive requests against examples/http_server.py and the ref: servers (GET /; a browser-like "
             "GET / with 12 headers; a 4 KiB POST /echo); CPU us/op = the server's CPU per request"),
    "waiting-clients": "waiting clients: memory per idle connection, and a ping-pong client's latency beside them",
    "held-long-polls": ("held long polls (examples/jobs_server.py): memory per held request, and a short-polling "
                        "client's latency beside them"),
    "updates": ("N clients waiting for rare updates (a fixed rate for all): ops = updates delivered; latency = update "
                "to client; CPU us/op = server CPU per delivered update; req/s, bytes/s = the watching clients'"),
    "upload": "tus upload over one connection; ops = chunks acknowledged (sync: after fdatasync; async: from memory)",
}
BACKEND_ORDER = ("blocking", "threads", "epoll", "uring")


def format_rate(value: float | None) -> str:
    if value is None:
        return "-"
    for limit, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= limit:
            scaled = value / limit
            return f"{scaled:.3g}{suffix}" if scaled < 100 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


def format_number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def format_bytes(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


def describe_params(params: dict) -> str:
    """A compact label: ``64 conns 64B pipelined x16``, ``warm qd=32``, ``fsync/32``, ``1000 waiting``."""
    parts = []
    for key, value in params.items():
        if key == "connections":
            parts.append(f"{value} conn{'s' if value != 1 else ''}")
        elif key == "message_bytes":
            parts.append(format_bytes(value))
        elif key == "mode":
            parts.append(f"{value} x{params['depth']}" if params.get("depth", 1) > 1 else value)
        elif key == "depth":
            continue
        elif key == "cache":
            parts.append(value)
        elif key == "queue_depth":
            parts.append(f"qd={value}")
        elif key == "fsync_every":
            parts.append(f"fsync/{value}")
        elif key == "waiting":
            parts.append(f"{value} waiting")
        elif key == "held":
            parts.append(f"{value} held")
        elif key == "request":
            parts.append(value)
        elif key == "clients":
            parts.append(f"{value} clients")
        elif key == "rate":
            parts.append(f"{value:g}/s")
        elif key == "durability":
            parts.append(value)
        elif key == "chunk_kib":
            parts.append(f"{format_bytes(value << 10)} chunks")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _backend_rank(name: str) -> tuple:
    if name in BACKEND_ORDER:
        return (0, BACKEND_ORDER.index(name), name)
    return (1, 0, name)


def _extra_columns(workload: str) -> list[tuple[str, callable]]:
    if workload == "waiting-clients":
        return [("KiB/client", lambda r: format_number(r.extra.get("rss_per_waiting_client_kib"))),
                ("threads", lambda r: format_number(r.extra.get("threads")))]
    if workload == "held-long-polls":
        return [("KiB/held", lambda r: format_number(r.extra.get("rss_per_held_request_kib")))]
    if workload == "http":
        return [("req bytes", lambda r: format_number(r.extra.get("request_bytes")))]
    if workload == "upload":
        return [("MiB/s", lambda r: format_number(r.extra.get("mib_per_s")))]
    if workload == "updates":
        return [("req/s", lambda r: format_number(r.extra.get("requests_per_s"))),
                ("bytes/s", lambda r: format_number(r.extra.get("bytes_per_s"))),
                ("req/update", lambda r: format_number(r.extra.get("requests_per_event"))),
                ("bytes/update", lambda r: format_number(r.extra.get("bytes_per_event"))),
                ("held", lambda r: format_number(r.extra.get("held")))]
    return []


def render_block(workload: str, results: list[Result], references: Iterable[str]) -> str:
    present = {r.backend for r in results}
    ratio_refs = [ref for ref in references if ref in present]
    by_key: dict[tuple, dict[str, Result]] = defaultdict(dict)
    order: list[tuple] = []
    for result in results:
        if result.key() not in by_key:
            order.append(result.key())
        by_key[result.key()][result.backend] = result
    extra = _extra_columns(workload)
    header = (["params", "backend", "ops/s", "p50 us", "p99 us", "CPU us/op", "ctx/op", "RSS MiB"]
              + [name for name, _ in extra] + [f"x{ref[4:]}" for ref in ratio_refs])
    rows = []
    for key in order:
        group = by_key[key]
        for index, backend in enumerate(sorted(group, key=_backend_rank)):
            result = group[backend]
            cells = [describe_params(result.params) if index == 0 else "", backend, format_rate(result.ops_per_s),
                     format_number(result.p50_us), format_number(result.p99_us),
                     format_number(result.cpu_us_per_op), format_number(result.context_switches_per_op, 2),
                     "-" if result.peak_rss_kib is None else f"{result.peak_rss_kib / 1024:.0f}"]
            cells += [render(result) for _, render in extra]
            for ref in ratio_refs:
                reference = group.get(ref)
                cells.append(f"{result.ops_per_s / reference.ops_per_s:.2f}"
                             if reference and reference.ops_per_s else "")
            rows.append(cells)
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = [f"== {workload}: {TITLES.get(workload, '')}"]
    for row_index, row in enumerate([header] + rows):
        if row_index > 0 and row[0]:
            lines.append("")   # a blank line between parameter groups
        lines.append("  ".join(str(cell).ljust(widths[i]) if i < 2 else str(cell).rjust(widths[i])
                               for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines)


def render_skipped(report: Report) -> str:
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for skip in report.skipped:
        label = skip.workload + (f" [{describe_params(skip.params)}]" if skip.params else "")
        grouped[(skip.backend, skip.reason)].append(label)
    lines = ["== skipped (not measured, with the reason)"]
    for (backend, reason), workloads in sorted(grouped.items()):
        shown = ", ".join(workloads[:4]) + (f" and {len(workloads) - 4} more" if len(workloads) > 4 else "")
        lines.append(f"  {backend}: {reason.splitlines()[0] if reason else '?'}  ({shown})")
    return "\n".join(lines)


def render(report: Report, ratio_references: dict[str, tuple[str, ...]]) -> str:
    """The whole table: every workload measured, in the order first measured, then what was skipped."""
    blocks = []
    by_workload: dict[str, list[Result]] = defaultdict(list)
    for result in report.results:
        by_workload[result.workload].append(result)
    for workload, results in by_workload.items():
        blocks.append(render_block(workload, results, ratio_references.get(workload, ())))
    noted = [f"  {r.workload} [{describe_params(r.params)}] on {r.backend}: {note}"
             for r in report.results for note in r.notes if "stalled" in note or "error" in note]
    if noted:
        blocks.append("== notes on measured rows\n" + "\n".join(noted))
    if report.skipped:
        blocks.append(render_skipped(report))
    return "\n\n".join(blocks)
