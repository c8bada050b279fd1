"""The servers compared in the socket workloads, and the sweep that measures each of them over a list of configurations.

Ours: ``echo_server.py`` on each iokit backend, and the example servers. Echo references: an asyncio Protocol server
under the default loop and under uvloop, and our C servers on epoll and on io_uring (the ceiling). HTTP references
(``http_refs``): uvicorn, granian, and an httptools Protocol server under uvloop and under the default loop. A reference
whose packages are not installed is a spec without a command, skipped with the reason.

The sweep starts every server first (each in its own process, pinned to the measured core), then walks the
configurations and, for each, measures every server in turn. When the workload has a warm-up, every server gets
it, the same one, after all have started and before the first configuration. Compared rows are thus measured minutes apart at most,
not a whole family apart; idle servers sleep in their event loops and cost nothing meanwhile. Each server is stopped
right after its last configuration. A server that fails to start, or dies, loses its remaining rows with the reason;
the others go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from pathlib import Path
from typing import Callable

from .context import BenchRun
from .processes import (ProcessGone, Server, python_child_environment, python_module_command,
                        python_script_command)
from .results import Result

HOST = "127.0.0.1"
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    name: str                   # a backend name, or "ref:<name>"
    argv: list[str] | None      # None when it cannot run here
    reason: str = ""            # why not


def echo_server_specs(run: BenchRun, buffer_bytes: int | None = None) -> list[ServerSpec]:
    """Our echo server on each backend being measured (with ``buffer_bytes`` of receive buffer per connection, when
    given), then the references wanted and present."""
    buffer_option = ["--buffer-bytes", str(buffer_bytes)] if buffer_bytes else []
    specs = [ServerSpec(backend, python_module_command("iokit.bench.echo_server", "--backend", backend,
                                                       "--host", HOST, "--port", "0", *buffer_option))
             for backend in run.backends]
    # The same server in the protocol (callback) style, on each backend: "<backend>:protocol" rows.
    specs += [ServerSpec(f"{backend}:protocol", python_module_command(
        "iokit.bench.echo_server", "--backend", backend, "--style", "protocol", "--host", HOST, "--port", "0"))
              for backend in run.backends if buffer_bytes is None]
    if run.wants_reference("asyncio"):
        specs.append(ServerSpec("ref:asyncio", python_module_command("iokit.bench.asyncio_echo", "--loop", "asyncio",
                                                                     "--host", HOST, "--port", "0")))
    if run.wants_reference("uvloop"):
        specs.append(_python_reference("uvloop", ("uvloop",), "iokit.bench.asyncio_echo", "--loop", "uvloop"))
    for reference, program in (("c-uring", "echo_uring"), ("c-epoll", "echo_epoll")):
        if run.wants_reference(reference):
            binary = run.c_program(program)
            specs.append(ServerSpec(f"ref:{reference}",
                                    None if binary is None else [str(binary), "--host", HOST, "--port", "0"],
                                    run.build_failures.get(program, "")))
    return specs


def http_reference_specs(run: BenchRun) -> list[ServerSpec]:
    """The HTTP references of ``http_refs`` that are wanted, each unavailable (with the reason) where a package it
    needs is not installed."""
    from .http_refs import REQUIRES, SERVERS
    return [_python_reference(server, REQUIRES[server], "iokit.bench.http_refs", "--server", server)
            for server in SERVERS if run.wants_reference(server)]


def _python_reference(name: str, requires: tuple[str, ...], module: str, *args: str) -> ServerSpec:
    """``ref:<name>``, run as ``python -m module args --host HOST --port 0``; unavailable while any of ``requires``
    cannot be imported."""
    missing = [package for package in requires if importlib.util.find_spec(package) is None]
    if missing:
        return ServerSpec(f"ref:{name}", None, f"{', '.join(missing)} not installed (pip install {' '.join(missing)}, "
                                               "or make bench)")
    return ServerSpec(f"ref:{name}", python_module_command(module, *args, "--host", HOST, "--port", "0"))


def example_server_specs(run: BenchRun, example: str, *options: str) -> list[ServerSpec]:
    """``examples/<example>`` (with ``options``) on each backend being measured; unavailable (with the reason) until
    the file exists."""
    script = EXAMPLES_DIR / example
    if not script.exists():
        return [ServerSpec(backend, None, f"needs examples/{example}") for backend in run.backends]
    return [ServerSpec(backend, python_script_command(script, "--backend", backend, "--host", HOST, "--port", "0",
                                                      *options))
            for backend in run.backends]


def sweep(run: BenchRun, workload: str, specs: list[ServerSpec], configurations: list[dict],
          measure: Callable[[Server, dict], Result], warm: Callable[[Server], None] | None = None) -> None:
    """Measure every server in ``specs`` on every configuration (see the module docstring for the order), each first
    warmed by ``warm`` when given. A server whose warm-up fails loses its rows with the reason."""
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        for spec in specs:
            if spec.argv is None:
                run.skip(workload, spec.name, spec.reason)
                run.progress.total -= len(configurations)
                continue
            try:
                servers[spec.name] = stack.enter_context(
                    Server(spec.argv, run.cores.measured, name=spec.name, env=python_child_environment()))
            except (ProcessGone, OSError) as exc:
                run.skip(workload, spec.name, f"did not start: {exc}")
                run.progress.total -= len(configurations)
        if warm is not None:
            _warm_up(run, workload, servers, warm, len(configurations))
        for index, params in enumerate(configurations):
            last = index == len(configurations) - 1
            for spec in specs:
                server = servers.get(spec.name)
                if server is None:
                    continue
                run.progress.step(f"{workload} {' '.join(f'{k}={v}' for k, v in params.items())} on {spec.name}")
                try:
                    run.record(measure(server, params))
                except ProcessGone as exc:
                    run.skip(workload, spec.name, f"server died: {exc}", params)
                    del servers[spec.name]
                    run.progress.total -= len(configurations) - index - 1
                except (RuntimeError, OSError) as exc:
                    run.skip(workload, spec.name, f"failed: {str(exc) or type(exc).__name__}", params)
                if last and spec.name in servers:
                    # Done with it: stop it now, so that what it still holds (10,000 threads winding down, say)
                    # does not weigh on the servers measured after it on the same core.
                    servers.pop(spec.name).stop()


def _warm_up(run: BenchRun, workload: str, servers: dict[str, Server], warm: Callable[[Server], None],
             rows_each: int) -> None:
    """Warm every server in turn; one whose warm-up fails is stopped and its ``rows_each`` rows are skipped."""
    for name, server in list(servers.items()):
        try:
            warm(server)
        except (ProcessGone, RuntimeError, OSError) as exc:
            run.skip(workload, name, f"warm-up failed: {str(exc) or type(exc).__name__}")
            run.progress.total -= rows_each
            servers.pop(name).stop()
