"""Socket echo: 1, 16, 64 and 256 connections, 64 B and 16 KiB messages, ping-pong and pipelined, on our echo server
over each backend and on the reference servers, loaded by the C load generator from the other core.

Why sweep connections: with one connection every server, C included, is bound by the cross-core wake-up (~30 us each
way on this VM), so one connection says little about a backend. With more connections a server wakes once for many
ready sockets, and the per-message cost of the machinery (syscalls, Python frames, thread switches) decides. Pipelining
(DEPTH messages in flight per connection) takes the wake-up out entirely and measures throughput per byte. Where the
load generator, not the server, is the limit, the rows still differ in server CPU microseconds per message.
"""

from __future__ import annotations

from .context import BenchRun
from .loadgen import run_load
from .processes import Server, python_module_command
from .results import summarize
from .servers import HOST, ServerSpec, echo_server_specs, sweep

NAME = "echo"
WORKLOADS = ("echo",)
RATIO_REFERENCES = {"echo": ("ref:uvloop", "ref:c-uring")}


def configurations(run: BenchRun) -> list[dict]:
    settings = run.settings
    return [{"connections": connections, "message_bytes": size, "mode": mode,
             "depth": 1 if mode == "pingpong" else settings.pipeline_depth}
            for size in settings.message_sizes for mode in ("pingpong", "pipelined")
            for connections in settings.connections]


# The asyncio reference server, unchanged, on iokit.asyncio's loop: "<backend>:asyncio" rows, next to ref:asyncio
# and ref:uvloop running the same code.
ASYNCIO_LOOP_BACKENDS = ("uring", "epoll")


def server_specs(run: BenchRun) -> list[ServerSpec]:
    specs = echo_server_specs(run)
    specs += [ServerSpec(f"{backend}:asyncio", python_module_command(
        "iokit.bench.asyncio_echo", "--loop", f"iokit-{backend}", "--host", HOST, "--port", "0"))
        for backend in ASYNCIO_LOOP_BACKENDS if backend in run.backends]
    return specs


def planned(run: BenchRun) -> int:
    return len(configurations(run)) * len(server_specs(run))


def run(run: BenchRun) -> None:
    loadgen = run.c_program("loadgen")
    specs = server_specs(run)
    if loadgen is None:
        for spec in specs:
            run.skip("echo", spec.name, f"the load generator cannot be built: {run.build_failures['loadgen']}")
        return

    def measure(server: Server, params: dict):
        samples, figures = run_load(run, loadgen, server, connections=params["connections"], depth=params["depth"],
                                    size=params["message_bytes"])
        notes = [f"{figures['errors']} connection errors"] if figures["errors"] else []
        return summarize("echo", server.name, params, samples, notes=notes, extra=figures)

    sweep(run, "echo", specs, configurations(run), measure)
