"""Choosing a backend: what is available here, why not the rest, and which one ``auto`` picks.

``auto`` prefers ``uring`` and falls back to ``epoll``, and always says why (``Backend.chosen_because``). Ask for a
backend by name to refuse any fallback: ``open_backend("uring")`` raises ``BackendUnavailable`` with the reason and
what to do, instead of quietly running on something else. ``IOKIT_BACKEND`` in the environment sets what ``auto``
means (handy for running a whole program on another model); ``IOKIT_FAULTS`` wraps the backend in the fault injector
(``backends/faults.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import os

from .._errors import BackendUnavailable
from ._base import Backend, BackendStatistics

__all__ = ["Backend", "BackendInfo", "BackendStatistics", "NAMES", "backends", "open_backend"]

NAMES = ("blocking", "threads", "epoll", "uring")
_AUTO_ORDER = ("uring", "epoll")
_CLASSES = {"blocking": ("blocking", "BlockingBackend"), "threads": ("threads", "ThreadsBackend"),
            "epoll": ("epoll", "EpollBackend"), "uring": ("uring", "UringBackend")}
# Each backend's options: its constructor's keyword arguments. Written here rather than read from the classes so that
# a misspelt option is caught even where a backend cannot load (uring without its C extension); checked against the
# constructor when the class loads.
_OPTIONS = {"blocking": frozenset(), "threads": frozenset({"max_workers", "worker_idle_timeout"}),
            "epoll": frozenset({"file_ops", "file_workers"}),
            "uring": frozenset({"entries", "sqpoll", "cq_entries", "features"})}
_ALL_OPTIONS = frozenset().union(*_OPTIONS.values())


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here. ``reason`` explains an unavailable one; ``features`` lists what was probed."""

    name: str
    available: bool
    reason: str = ""
    features: dict = dataclasses.field(default_factory=dict)


def _probe_uring() -> BackendInfo:
    try:
        from . import uring
    except ImportError as exc:
        return BackendInfo("uring", False, f"the C extension is not built ({exc}); run `make` or `pip install .` "
                                           f"with liburing-dev installed")
    available, reason, features = uring.probe()
    return BackendInfo("uring", available, reason, features)


def backends() -> list[BackendInfo]:
    """Every backend, in the order blocking, threads, epoll, uring, with its availability here."""
    infos = [BackendInfo(name, True) for name in ("blocking", "threads")]
    if hasattr(__import__("select"), "epoll"):
        infos.append(BackendInfo("epoll", True))
    else:
        infos.append(BackendInfo("epoll", False, "select.epoll is missing (not Linux?)"))
    infos.append(_probe_uring())
    return infos


@functools.cache
def _backend_class(name: str) -> type[Backend]:
    module_name, class_name = _CLASSES[name]
    backend_class = getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)
    taken = frozenset(inspect.signature(backend_class).parameters)
    if taken != _OPTIONS[name]:
        raise ImportError(f"{class_name} takes {', '.join(sorted(taken)) or 'nothing'}, but _OPTIONS in {__file__} "
                          f"says {', '.join(sorted(_OPTIONS[name])) or 'nothing'}")
    return backend_class


def open_backend(name: str = "auto", **options) -> Backend:
    """Create a backend. ``name`` is one of ``NAMES`` (strict: no fallback) or ``"auto"``.

    ``options`` go to the backend's constructor (e.g. ``max_workers`` for threads, ``file_ops`` for epoll,
    ``entries``/``sqpoll`` for uring). An option of another backend is left out, so that one call can configure
    whichever backend runs (``auto``'s pick, or a name from the command line); an option of no backend is a typo.
    Raises ``ValueError`` for an unknown name, ``TypeError`` for an unknown option (naming the options the backend
    accepts) and ``BackendUnavailable`` when a named backend cannot run here.
    The instance's ``chosen_because`` says why it was picked.
    """
    if name == "auto":
        name = os.environ.get("IOKIT_BACKEND", "auto")
    if name != "auto" and name not in _CLASSES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)} or 'auto'")
    _refuse_unknown_options(name, options)
    if name == "auto":
        refusals = []
        for candidate in _AUTO_ORDER:
            try:
                backend = _open_named(candidate, options)
            except BackendUnavailable as exc:
                refusals.append(f"{candidate}: {exc.reason}")
                continue
            backend.chosen_because = ("auto: " + ("; ".join(refusals) + f"; so {candidate}" if refusals
                                                  else f"{candidate} is available"))
            return _with_faults_if_asked(backend)
        raise BackendUnavailable("auto", "; ".join(refusals))
    backend = _open_named(name, options)
    backend.chosen_because = f"asked for {name}"
    return _with_faults_if_asked(backend)


def _with_faults_if_asked(backend: Backend) -> Backend:
    # IOKIT_FAULTS="eagain=0.1,short=0.3,seed=1" puts any program, example servers included, under fault injection.
    from .faults import wrap_from_environment
    return wrap_from_environment(backend)


def _refuse_unknown_options(name: str, options: dict) -> None:
    unknown = sorted(options.keys() - _ALL_OPTIONS)
    if not unknown:
        return
    accepted = sorted(frozenset().union(*(_OPTIONS[candidate] for candidate in _AUTO_ORDER)) if name == "auto"
                      else _OPTIONS[name])
    hints = [f"did you mean {close[0]!r} for {option!r}?" for option in unknown
             if (close := difflib.get_close_matches(option, _ALL_OPTIONS, n=1))]
    raise TypeError(f"unknown backend option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
                    f"{name}; {name} accepts {', '.join(accepted) if accepted else 'no options'}"
                    + (f" ({' '.join(hints)})" if hints else ""))


def _open_named(name: str, options: dict) -> Backend:
    if name == "uring":
        info = _probe_uring()
        if not info.available:
            raise BackendUnavailable("uring", info.reason)
    elif name == "epoll" and not hasattr(__import__("select"), "epoll"):
        raise BackendUnavailable("epoll", "select.epoll is missing (not Linux?)")
    return _backend_class(name)(**{option: value for option, value in options.items() if option in _OPTIONS[name]})
