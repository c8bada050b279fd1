"""PNG plots of a run, one file per workload family, named after the ``--plot`` path: ``bench.png`` gives
``bench-echo.png``, ``bench-file.png``, ``bench-http.png``, ``bench-waiting.png``, ``bench-upload.png``,
``bench-updates.png``.

Each backend keeps one colour in every plot; references are drawn dashed (grey shades, the C ceiling in black) so that
ours stand out and the bar they are measured against stays visible. Connection counts are on a log scale (1 to 256),
latencies too (they span from tens of microseconds to tens of milliseconds).

``python -m iokit.bench.plots RUN.json OUT.png`` redraws the plots of a saved run.
"""

from __future__ import annotations

import dataclasses

import json
import sys
from collections import defaultdict
from pathlib import Path

from .report import BACKEND_ORDER, format_bytes
from .results import Report, Result

STYLE = {
    "blocking": dict(color="#1f77b4", marker="o"),
    "threads": dict(color="#ff7f0e", marker="s"),
    "epoll": dict(color="#2ca02c", marker="^"),
    "uring": dict(color="#d62728", marker="D"),
    "ref:asyncio": dict(color="#9467bd", marker="v", linestyle="--"),
    "ref:uvloop": dict(color="#8c564b", marker="P", linestyle="--"),
    "ref:c-epoll": dict(color="#7f7f7f", marker="x", linestyle="--"),
    "ref:c-uring": dict(color="#000000", marker="*", linestyle="--"),
    "ref:fio-psync": dict(color="#7f7f7f", marker="x", linestyle="--"),
    "ref:fio-io_uring": dict(color="#000000", marker="*", linestyle="--"),
    "ref:pread": dict(color="#17becf", marker="+", linestyle="--"),
}


def _style(backend: str) -> dict:
    name, batched = backend.removesuffix(" batched"), backend.endswith(" batched")
    style = STYLE.get(name, dict(color="#bcbd22", marker=".", linestyle=":"))
    return {**style, "linestyle": "--", "marker": "s"} if batched else style


def _sorted_backends(names) -> list[str]:
    return sorted(names, key=lambda n: (n not in BACKEND_ORDER, BACKEND_ORDER.index(n) if n in BACKEND_ORDER else 0, n))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def _series(results: list[Result], x_key: str, y) -> dict[str, tuple[list, list]]:
    points: dict[str, list[tuple]] = defaultdict(list)
    for result in results:
        points[result.backend].append((result.params[x_key], y(result)))
    return {backend: tuple(map(list, zip(*sorted(values)))) for backend, values in points.items()}


def _line_panel(axes, results: list[Result], x_key: str, y, *, title: str, ylabel: str, log_y: bool) -> None:
    series = _series(results, x_key, y)
    for backend in _sorted_backends(series):
        xs, ys = series[backend]
        axes.plot(xs, ys, label=backend, linewidth=1.8, markersize=6, **_style(backend))
    axes.set_xscale("log", base=2)
    xs = sorted({r.params[x_key] for r in results})
    axes.set_xticks(xs)
    axes.set_xticklabels([str(x) for x in xs])
    if log_y:
        axes.set_yscale("log")
    else:
        axes.set_ylim(bottom=0)
    axes.set_title(title, fontsize=11)
    axes.set_ylabel(ylabel)
    axes.grid(True, which="major", alpha=0.3)


def _legend_below(figure, axes_list) -> None:
    handles = {}
    for axes in axes_list:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    ordered = _sorted_backends(handles)
    figure.legend([handles[n] for n in ordered], ordered, loc="lower center", ncol=min(len(ordered), 8),
                  frameon=False, fontsize=10)


def _title(figure, text: str, machine: dict) -> None:
    figure.suptitle(f"{text}\n{machine.get('cpu_model', '')} x{machine.get('cpus', '?')}, kernel "
                    f"{machine.get('kernel', '?')}, {machine.get('date', '')[:10]}  ({machine.get('pinning', '')})",
                    fontsize=10)


def plot_echo(pyplot, results: list[Result], machine: dict, path: Path) -> None:
    shapes = sorted({(r.params["message_bytes"], r.params["mode"]) for r in results},
                    key=lambda shape: (shape[0], shape[1] != "pingpong"))
    figure, grid = pyplot.subplots(2, len(shapes), figsize=(4.6 * len(shapes), 8.5), squeeze=False)
    for column, (size, mode) in enumerate(shapes):
        subset = [r for r in results if (r.params["message_bytes"], r.params["mode"]) == (size, mode)]
        label = f"{format_bytes(size)} {mode}" + (f" x{subset[0].params['depth']}" if mode != "pingpong" else "")
        _line_panel(grid[0][column], subset, "connections", lambda r: r.ops_per_s / 1000,
                    title=f"{label}: throughput", ylabel="thousand messages/s", log_y=False)
        _line_panel(grid[1][column], subset, "connections", lambda r: r.p99_us,
                    title=f"{label}: p99 latency", ylabel="p99 (us, log)", log_y=True)
        grid[1][column].set_xlabel("connections")
    _title(figure, "socket echo: throughput and p99 vs connections", machine)
    _legend_below(figure, grid.flat)
    figure.tight_layout(rect=(0, 0.05, 1, 0.94))
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def plot_file(pyplot, results: list[Result], machine: dict, path: Path) -> None:
    # Batched reads beside the single ops, as their own lines ("<backend> batched", in the backend's colour, dashed).
    reads = [r for r in results if r.workload == "file-randread"] + [
        dataclasses.replace(r, backend=f"{r.backend} batched") for r in results if r.workload == "file-randread-batched"]
    writes = [r for r in results if r.workload == "file-write"]
    caches = sorted({r.params["cache"] for r in reads}, key=lambda c: c != "warm")
    figure, grid = pyplot.subplots(1, len(caches) + (1 if writes else 0), figsize=(15, 5.8), squeeze=False)
    panels = list(grid[0])
    for axes, cache in zip(panels, caches):
        subset = [r for r in reads if r.params["cache"] == cache]
        _line_panel(axes, subset, "queue_depth", lambda r: r.ops_per_s / 1000,
                    title=f"random 4 KiB reads, {'warm page cache' if cache == 'warm' else 'O_DIRECT'}",
                    ylabel="thousand IOPS", log_y=False)
        axes.set_xlabel("queue depth (reads in flight)")
    if writes:
        axes = panels[-1]
        everies = sorted({r.params["fsync_every"] for r in writes})
        backends = _sorted_backends({r.backend for r in writes})
        width = 0.8 / max(len(backends), 1)
        for index, backend in enumerate(backends):
            values = {r.params["fsync_every"]: r.ops_per_s / 1000 for r in writes if r.backend == backend}
            style = _style(backend)
            axes.bar([position + index * width for position in range(len(everies))],
                     [values.get(every, 0) for every in everies], width, label=backend, color=style["color"],
                     hatch="//" if backend.startswith("ref:") else None, edgecolor="white")
        axes.set_xticks([position + width * (len(backends) - 1) / 2 for position in range(len(everies))])
        axes.set_xticklabels([f"fsync every {every}" for every in everies])
        axes.set_title("sequential 4 KiB writes + fsync", fontsize=11)
        axes.set_ylabel("thousand durable writes/s")
        axes.grid(True, axis="y", alpha=0.3)
    _title(figure, "file I/O: IOPS vs queue depth, and fsync-bound writes", machine)
    _legend_below(figure, panels)
    figure.tight_layout(rect=(0, 0.07, 1, 0.92))
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def plot_http(pyplot, results: list[Result], machine: dict, path: Path) -> None:
    figure, grid = pyplot.subplots(1, 2, figsize=(12, 5.5), squeeze=False)
    _line_panel(grid[0][0], results, "connections", lambda r: r.ops_per_s / 1000, title="throughput",
                ylabel="thousand responses/s", log_y=False)
    _line_panel(grid[0][1], results, "connections", lambda r: r.p99_us, title="p99 latency",
                ylabel="p99 (us, log)", log_y=True)
    for axes in grid[0]:
        axes.set_xlabel("connections")
    _title(figure, "HTTP keep-alive GET /", machine)
    _legend_below(figure, grid.flat)
    figure.tight_layout(rect=(0, 0.07, 1, 0.9))
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def plot_waiting(pyplot, results: list[Result], machine: dict, path: Path) -> None:
    held = [r for r in results if r.params["waiting"]]
    backends = _sorted_backends({r.backend for r in results})
    figure, grid = pyplot.subplots(1, 2, figsize=(12, 5.5), squeeze=False)
    memory, latency = grid[0]
    values = {r.backend: r.extra.get("rss_per_waiting_client_kib") or 0 for r in held}
    heights = [max(values.get(b, 0), 0) for b in backends]
    bars = memory.bar(range(len(backends)), heights, color=[_style(b)["color"] for b in backends])
    memory.bar_label(bars, labels=[f"{values[b]:.3g}" if b in values else "failed" for b in backends],
                     fontsize=9)
    positive = [h for h in heights if h > 0]
    if positive and max(positive) / min(positive) > 50:   # a thread per client dwarfs the rest: log scale
        memory.set_yscale("log")
    memory.set_xticks(range(len(backends)))
    memory.set_xticklabels(backends, rotation=30, ha="right")
    memory.set_ylabel("server RSS per waiting client (KiB)" + (", log" if memory.get_yscale() == "log" else ""))
    count = held[0].params["waiting"] if held else 0
    memory.set_title(f"memory per waiting client ({count} waiting)", fontsize=11)
    memory.grid(True, axis="y", alpha=0.3)
    width = 0.4
    for offset, (label, waiting) in enumerate((("none waiting", 0), (f"{count} waiting", count))):
        p99 = {r.backend: r.p99_us for r in results if r.params["waiting"] == waiting}
        latency.bar([i + offset * width for i in range(len(backends))], [p99.get(b, 0) for b in backends], width,
                    label=label, color="#aaaaaa" if offset == 0 else "#444444")
    latency.set_xticks([i + width / 2 for i in range(len(backends))])
    latency.set_xticklabels(backends, rotation=30, ha="right")
    latency.set_ylabel("p99 of a ping-pong client (us)")
    latency.set_title("latency of another client", fontsize=11)
    latency.legend(frameon=False)
    latency.grid(True, axis="y", alpha=0.3)
    _title(figure, "waiting clients", machine)
    figure.tight_layout(rect=(0, 0, 1, 0.88))
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def plot_upload(pyplot, results: list[Result], machine: dict, path: Path) -> None:
    chunks = sorted({r.params["chunk_kib"] for r in results})
    backends = _sorted_backends({r.backend for r in results})
    figure, grid = pyplot.subplots(1, len(chunks), figsize=(max(9, 6 * len(chunks)), 5.5), squeeze=False)
    width = 0.4
    for axes, chunk in zip(grid[0], chunks):
        for offset, durability in enumerate(("sync", "async")):
            # One uploader, no replica: the 8-uploader and replication rows are other questions (their tables).
            rate = {r.backend: r.extra.get("mib_per_s", 0) for r in results
                    if r.params["chunk_kib"] == chunk and r.params["durability"] == durability
                    and "uploaders" not in r.params and "replication" not in r.params}
            bars = axes.bar([i + offset * width for i in range(len(backends))], [rate.get(b, 0) for b in backends],
                            width, color=[_style(b)["color"] for b in backends], edgecolor="white",
                            hatch="//" if durability == "sync" else None, label=durability)
            axes.bar_label(bars, fmt="%.0f", fontsize=8)
        axes.set_xticks([i + width / 2 for i in range(len(backends))])
        axes.set_xticklabels(backends)
        axes.set_title(f"{format_bytes(chunk << 10)} chunks (hatched: sync, plain: async)", fontsize=11)
        axes.set_ylabel("MiB/s")
        axes.grid(True, axis="y", alpha=0.3)
    _title(figure, "upload throughput: sync vs async durability", machine)
    figure.tight_layout(rect=(0, 0, 1, 0.88))
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _grouped_bars(axes, results: list[Result], groups: list[str], group_of, value, *, log_y: bool = False) -> None:
    """Bars of ``value(result)`` per backend (colour), grouped along x by ``group_of(result)``."""
    backends = _sorted_backends({r.backend for r in results})
    width = 0.8 / max(len(backends), 1)
    for index, backend in enumerate(backends):
        values = {group_of(r): value(r) for r in results if r.backend == backend}
        axes.bar([position + index * width for position in range(len(groups))],
                 [values.get(group, 0) for group in groups], width, label=backend, color=_style(backend)["color"])
    axes.set_xticks([position + width * (len(backends) - 1) / 2 for position in range(len(groups))])
    axes.set_xticklabels(groups)
    if log_y:
        axes.set_yscale("log")
    axes.grid(True, axis="y", alpha=0.3)


def plot_updates(pyplot, results: list[Result], machine: dict, path: Path) -> None:
    modes = [mode for mode in ("short", "long", "push") if any(r.params["mode"] == mode for r in results)]
    figure, grid = pyplot.subplots(1, 3, figsize=(16, 5.5), squeeze=False)
    latency, requests, wire = grid[0]
    _grouped_bars(latency, results, modes, lambda r: r.params["mode"], lambda r: r.p50_us / 1000, log_y=True)
    latency.set_title("event-to-client latency, p50 (ms, log)", fontsize=11)
    _grouped_bars(requests, results, modes, lambda r: r.params["mode"], lambda r: r.extra["requests_per_event"])
    requests.set_title("HTTP requests per update", fontsize=11)
    _grouped_bars(wire, results, modes, lambda r: r.params["mode"], lambda r: r.extra["bytes_per_event"])
    wire.set_title("bytes on the wire per update", fontsize=11)
    sample = results[0].params
    _title(figure, f"{sample['clients']} clients, {sample['rate']:g} updates/s: short polling vs long polling vs push",
           machine)
    _legend_below(figure, grid.flat)
    figure.tight_layout(rect=(0, 0.07, 1, 0.9))
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


PLOTTERS = {
    "echo": (("echo",), plot_echo),
    "file": (("file-randread", "file-randread-batched", "file-write"), plot_file),
    "http": (("http",), plot_http),
    "waiting": (("waiting-clients",), plot_waiting),
    "upload": (("upload",), plot_upload),
    "updates": (("updates",), plot_updates),
}


def plot_paths(path: Path) -> dict[str, Path]:
    return {name: path.with_name(f"{path.stem}-{name}{path.suffix or '.png'}") for name in PLOTTERS}


def load_report(path: Path) -> Report:
    """A ``Report`` back from the JSON a run wrote (to redraw its plots)."""
    data = json.loads(path.read_text())
    return Report(data["machine"], data.get("settings", {}), [Result(**r) for r in data["results"]])


def write_plots(report: Report, path: Path) -> list[Path]:
    """Write one PNG per family that has results; returns the paths written."""
    pyplot = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for name, target in plot_paths(path).items():
        workloads, plotter = PLOTTERS[name]
        results = [r for r in report.results if r.workload in workloads]
        if results:
            plotter(pyplot, results, report.machine, target)
            written.append(target)
    return written


if __name__ == "__main__":   # python -m iokit.bench.plots RUN.json OUT.png: redraw a run's plots
    for written in write_plots(load_report(Path(sys.argv[1])), Path(sys.argv[2])):
        print(f"plot: {written}")
