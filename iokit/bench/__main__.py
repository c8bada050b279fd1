"""python -m iokit.bench: compare the I/O backends side by side, with outside references measured in the same run.

    python -m iokit.bench [--quick] [--backends LIST] [--workloads LIST] [--json FILE] [--plot FILE]

Prints the machine, a live progress line (stderr), then a table per workload with ratios to the references; writes the
JSON of DESIGN.md (``{"machine": {...}, "results": [...]}``) and PNG plots when asked. ``--quick`` is the same matrix
with shorter runs and a smaller file (a few minutes on 2 cores); without it the runs are those of docs/benchmarks.md.
A backend that cannot run here, or a reference whose tool is missing, is skipped with the reason, never faked.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import echo, file_io, http_load, http_refs, patterns
from .context import BenchRun, make_settings
from .machine import describe_machine, machine_summary, plan_cores
from .progress import Progress
from .report import render
from .results import Report, Skipped

FAMILIES = (file_io, echo, http_load, patterns)
REFERENCES = ("pread", "fio-psync", "fio-io_uring", "asyncio", "uvloop", "c-uring", "c-epoll", *http_refs.SERVERS)


def _list(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def _numbers(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(item) for item in _list(text))


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    workloads = [w for family in FAMILIES for w in family.WORKLOADS]
    parser = argparse.ArgumentParser(
        prog="python -m iokit.bench", description=__doc__.split("\n\n")[0],
        epilog=f"workloads: {', '.join(f.NAME for f in FAMILIES)} (families) or {', '.join(workloads)}; "
               f"references: {', '.join('ref:' + r for r in REFERENCES)}")
    parser.add_argument("--quick", action="store_true", help="short runs and a 256 MiB file: a few minutes")
    parser.add_argument("--backends", help="comma-separated backends (blocking,threads,epoll,uring) and/or ref:NAME "
                                           "references; references not named are all measured unless --no-refs")
    parser.add_argument("--no-refs", action="store_true", help="measure no outside reference")
    parser.add_argument("--workloads", help="comma-separated workload families or workloads (default: all)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write PNG plots named after this path (FILE-echo.png, ...)")
    tuning = parser.add_argument_group("overrides of the profile (mostly for tests)")
    tuning.add_argument("--warmup-seconds", type=float)
    tuning.add_argument("--run-seconds", type=float)
    tuning.add_argument("--runs", type=int)
    tuning.add_argument("--connections", help="comma-separated connection counts (default 1,16,64,256)")
    tuning.add_argument("--message-sizes", help="comma-separated echo message sizes in bytes (default 64,16384)")
    tuning.add_argument("--file-size-mib", type=int)
    tuning.add_argument("--idle-clients", type=int, help="waiting clients for the memory row")
    tuning.add_argument("--upload-mib", type=int, help="size of one upload")
    tuning.add_argument("--upload-chunks-kib", help="comma-separated upload chunk sizes in KiB (default 64,1024)")
    tuning.add_argument("--update-clients", help="comma-separated counts of clients waiting for updates, swept "
                                                 "(default 32,1000,10000; quick 32,1000); blocking and threads skip "
                                                 "those over the descriptor limit, with the reason")
    tuning.add_argument("--update-rate", type=float, help="updates per second, all clients together (default 8)")
    tuning.add_argument("--updates-seconds", type=float, help="length of the updates window (default 10; quick 4)")
    tuning.add_argument("--data-dir", type=Path, help="where the test files go (default: the cache directory)")
    return parser.parse_args(argv)


def select_backends(requested: list[str] | None, report: Report, workloads: list[str]) -> list[str]:
    """The backends to measure: those asked for (default all) that are available; the rest are skipped with the
    reason, once per workload."""
    from .. import backends
    infos = {info.name: info for info in backends()}
    names = requested if requested is not None else list(infos)
    unknown = [name for name in names if name not in infos]
    if unknown:
        raise SystemExit(f"unknown backend(s): {', '.join(unknown)}; choose from {', '.join(infos)} or ref:NAME")
    chosen = []
    for name in names:
        if infos[name].available:
            chosen.append(name)
        else:
            for workload in workloads:
                report.skipped.append(Skipped(workload, name, infos[name].reason))
    return chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    settings = make_settings(args.quick, args.data_dir, warmup_s=args.warmup_seconds, run_s=args.run_seconds,
                             runs=args.runs, connections=_numbers(args.connections),
                             message_sizes=_numbers(args.message_sizes), file_size_mib=args.file_size_mib,
                             idle_clients=args.idle_clients, upload_mib=args.upload_mib,
                             upload_chunks_kib=_numbers(args.upload_chunks_kib),
                             update_clients=_numbers(args.update_clients), update_rate=args.update_rate,
                             updates_seconds=args.updates_seconds)
    cores = plan_cores()
    machine = describe_machine(cores, ["python -m iokit.bench", *argv])
    os.sched_setaffinity(0, cores.load)   # the harness sleeps while measuring; keep it off the measured core
    report = Report(machine, settings.to_json())

    selected = _list(args.backends)
    wanted_workloads = _list(args.workloads)
    families = [family for family in FAMILIES
                if wanted_workloads is None or family.NAME in wanted_workloads
                or any(w in wanted_workloads for w in family.WORKLOADS)]
    if wanted_workloads is not None:
        known = {f.NAME for f in FAMILIES} | {w for f in FAMILIES for w in f.WORKLOADS}
        unknown = [w for w in wanted_workloads if w not in known]
        if unknown:
            raise SystemExit(f"unknown workload(s): {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    workload_names = frozenset(w for family in families for w in family.WORKLOADS
                               if wanted_workloads is None or family.NAME in wanted_workloads or w in wanted_workloads)
    references = None
    if args.no_refs:
        references = frozenset()
    elif selected is not None and any(item.startswith("ref:") for item in selected):
        references = frozenset(item[4:] for item in selected if item.startswith("ref:"))
    backend_names = None if selected is None else [item for item in selected if not item.startswith("ref:")]
    print(machine_summary(machine), flush=True)
    backend_list = select_backends(backend_names, report, sorted(workload_names))
    run = BenchRun(settings, cores, backend_list, references, workload_names, report)
    run.progress = Progress(sum(family.planned(run) for family in families))
    try:
        for family in families:
            family.run(run)
    except KeyboardInterrupt:
        run.progress.note("interrupted: the table and files below hold what was measured so far")
    run.progress.finish()
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    ratio_references = {k: v for family in FAMILIES for k, v in family.RATIO_REFERENCES.items()}
    print()
    print(render(report, ratio_references))
    if args.json:
        report.write_json(args.json)
        print(f"\nJSON: {args.json}")
    if args.plot and report.results:
        from .plots import write_plots
        for path in write_plots(report, args.plot):
            print(f"plot: {path}")
    return 0 if report.results else 1


if __name__ == "__main__":
    sys.exit(main())
