"""Fixtures shared by the conformance, runtime and backend-API suites: every test runs on every backend.

* ``backend_name`` is parametrized over the four backends. A backend that cannot run here (``uring`` without its C
  extension, or a kernel that refuses a ring) *skips* with the reason ``iokit.backends()`` gives; it never passes.
* ``backend`` opens that backend for plain synchronous use and, at teardown, asserts that no op is left in flight
  (before and after ``close()``).
* ``run`` runs an async function on a runtime over that backend (``iokit.run(fn, backend=...)``), with the same
  in-flight check on the backend the runtime used.
* ``leak_check`` (automatic for the three suites above) asserts that the process has the same number of open fds after
  the test as before, that no ``iokit-*`` thread outlives the test, and that no ``ResourceWarning`` was emitted. The
  blocking backend's per-thread eventfds close when their thread ends, so the fd count is compared with a short
  bounded retry (collecting garbage in between) rather than at one instant.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import warnings

import pytest

import iokit

BACKEND_NAMES = ["blocking", "threads", "epoll", "uring"]
_INFOS = {info.name: info for info in iokit.backends()}
# The suites whose tests get the automatic leak check. The other modules (example servers, uring internals) manage
# their own module-scoped servers and checks.
LEAK_CHECKED_MODULES = {"test_conformance", "test_runtime", "test_backend_api"}
SETTLE_SECONDS = 3.0


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def iokit_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("iokit-") and t.is_alive()]


def settle(predicate, timeout: float = SETTLE_SECONDS) -> bool:
    """Poll ``predicate`` (collecting garbage in between) until it holds or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        gc.collect()
        time.sleep(0.01)


def require_backend(name: str) -> None:
    info = _INFOS[name]
    if not info.available:
        pytest.skip(f"backend {name} is unavailable here: {info.reason}")


@pytest.fixture(params=BACKEND_NAMES)
def backend_name(request) -> str:
    require_backend(request.param)
    return request.param


def _check_no_op_in_flight(backend, when: str) -> None:
    stats = backend.statistics()
    assert stats.in_flight == 0, f"{stats.in_flight} op(s) left in flight {when} on {backend.name}: {stats}"


@pytest.fixture
def backend(backend_name):
    be = iokit.open_backend(backend_name)
    try:
        yield be
        if not be.closed:
            _check_no_op_in_flight(be, "before close()")
    finally:
        be.close()
    _check_no_op_in_flight(be, "after close()")


class Runner:
    """``run(fn, *args, **backend_options)``: ``iokit.run(fn, *args, backend=<a fresh backend of this name>)``, then the
    in-flight checks, then close. ``run.name`` is the backend's name; ``run.last_backend`` the last one used."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.last_backend = None

    def __call__(self, fn, *args, **backend_options):
        be = iokit.open_backend(self.name, **backend_options)
        self.last_backend = be
        try:
            result = iokit.run(fn, *args, backend=be)
            if not be.closed:
                _check_no_op_in_flight(be, "after run() returned, before close()")
            return result
        finally:
            be.close()
            _check_no_op_in_flight(be, "after close()")


@pytest.fixture
def run(backend_name) -> Runner:
    return Runner(backend_name)


@pytest.fixture(autouse=True)
def leak_check(request):
    module = request.node.module.__name__.rpartition(".")[2]
    if module not in LEAK_CHECKED_MODULES:
        yield
        return
    # pytest's warnings plugin wraps setup, call and teardown in one catch_warnings, so this one nests inside it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
        threads_before = set(iokit_threads())
        fds_before = fd_count()
        yield
        threads_ok = settle(lambda: not (set(iokit_threads()) - threads_before))
        fds_ok = settle(lambda: fd_count() == fds_before)
        gc.collect()
        fds_now = fd_count()
        leftover_threads = sorted(t.name for t in set(iokit_threads()) - threads_before)
    resource_warnings = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    problems = []
    if not threads_ok:
        problems.append(f"iokit threads still alive after the test: {leftover_threads}")
    if not fds_ok:
        problems.append(f"open fds: {fds_before} before the test, {fds_now} after")
    if resource_warnings:
        problems.append(f"ResourceWarning: {resource_warnings}")
    assert not problems, "; ".join(problems)
