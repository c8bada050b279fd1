"""The servers compared in the socket workloads, and the sweep that measures each of them over a list of configurations.

Ours: ``echo_server.py`` on each iokit backend (and the example servers, once they exist). References: an asyncio
Protocol server under the default loop and under uvloop, and our C servers on epoll and on io_uring (the ceiling).

The sweep starts every server first (each in its own process, pinned to the measured core), then walks the
configurations and, for each, measures every server in turn. Compared rows are thus measured minutes apart at most,
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
    if run.wants_reference("asyncio"):
        specs.append(ServerSpec("ref:asyncio", python_module_command("iokit.bench.asyncio_echo", "--loop", "asyncio",
                                                                     "--host", HOST, "--port", "0")))
    if run.wants_reference("uvloop"):
        if importlib.util.find_spec("uvloop") is None:
            specs.append(ServerSpec("ref:uvloop", None, "uvloop is not installed (pip install uvloop)"))
        else:
            specs.append(ServerSpec("ref:uvloop", python_module_command("iokit.bench.asyncio_echo", "--loop",
                                                                        "uvloop", "--host", HOST, "--port", "0")))
    for reference, program in (("c-uring", "echo_uring"), ("c-epoll", "echo_epoll")):
        if run.wants_reference(reference):
            binary = run.c_program(program)
            specs.append(ServerSpec(f"ref:{reference}",
                                    None if binary is None else [str(binary), "--host", HOST, "--port", "0"],
                                    run.build_failures.get(program, "")))
    return specs


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
          measure: Callable[[Server, dict], Result]) -> None:
    """Measure every server in ``specs`` on every configuration (see the module docstring for the order)."""
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
