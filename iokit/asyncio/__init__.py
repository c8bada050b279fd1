"""asyncio on iokit: an event loop whose I/O goes through iokit's backends and native engine.

Existing asyncio programs run on io_uring (or epoll) unchanged::

    import iokit.asyncio
    iokit.asyncio.run(main(), backend="uring")

or ``asyncio.Runner(loop_factory=iokit.asyncio.new_event_loop)``, or ``asyncio.set_event_loop_policy(
iokit.asyncio.EventLoopPolicy())``; uvicorn takes ``--loop iokit.asyncio:new_event_loop`` (a loop factory: the
backend is ``auto``, so ``IOKIT_BACKEND=epoll`` or ``uring`` chooses).

The loop is asyncio's own Unix selector loop (callbacks, timers, executors, signals, subprocesses, datagrams and the
``sock_*`` methods are asyncio's code) whose wait is the backend's, and whose stream transports (TCP and Unix, plain
or TLS) are driven by the native engine: data_received -> transport.write runs in C. See ``docs/asyncio.md``.
``backend``: ``"auto"`` (uring, else epoll, with ``IOKIT_BACKEND`` honoured), ``"uring"`` or ``"epoll"``;
``"blocking"`` and ``"threads"`` raise ``NotImplementedError`` (they have no completions or readiness for a loop to
wait on).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable, Coroutine

from ..backends import Backend
from ._loop import BackendSelector, IokitEventLoop
from ._transport import EngineTransport, PseudoSocket

__all__ = ["EngineTransport", "EventLoopPolicy", "IokitEventLoop", "PseudoSocket", "loop_factory", "new_event_loop",
           "run", "BackendSelector"]


def new_event_loop(backend: str | Backend = "auto", **backend_options) -> IokitEventLoop:
    """A new event loop over ``backend`` (see the module docstring). Raises ``BackendUnavailable`` if a named backend
    cannot run here, ``NotImplementedError`` for blocking and threads."""
    return IokitEventLoop(backend, **backend_options)


def loop_factory(backend: str = "auto", **backend_options) -> Callable[[], IokitEventLoop]:
    """A no-argument factory for ``asyncio.Runner(loop_factory=...)``, anyio's ``loop_factory`` option and the like."""
    return functools.partial(new_event_loop, backend, **backend_options)


def run(main: Coroutine, *, backend: str = "auto", debug: bool | None = None, **backend_options) -> Any:
    """``asyncio.run(main)`` on a new iokit loop over ``backend``; returns what ``main`` returns."""
    with asyncio.Runner(debug=debug, loop_factory=loop_factory(backend, **backend_options)) as runner:
        return runner.run(main)


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """asyncio's default policy (the child watcher included), making iokit loops over ``backend``."""

    def __init__(self, backend: str = "auto", **backend_options) -> None:
        super().__init__()
        self._backend, self._backend_options = backend, backend_options

    def new_event_loop(self) -> IokitEventLoop:
        return new_event_loop(self._backend, **self._backend_options)

