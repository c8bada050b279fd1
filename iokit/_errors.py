"""Errors: the one place where a kernel result becomes an exception.

Every backend reports an op's outcome the way the kernel does in an io_uring completion: a byte count (or an fd) when it
worked, ``-errno`` when it did not. ``check_result`` turns a negative result into the ordinary ``OSError`` subclass
(``OSError(errno.ECONNRESET, ...)`` *is* a ``ConnectionResetError``), so callers catch what they already know.

Our own exceptions are few and named for what the caller can do about them.
"""

from __future__ import annotations

import os


def error_from_errno(err: int) -> OSError:
    """Return the ``OSError`` subclass Python uses for ``err`` (a positive errno), with the usual message."""
    return OSError(err, os.strerror(err))


def check_result(result: int) -> int:
    """Return ``result`` if it is not negative; raise the matching ``OSError`` for ``-errno``."""
    if result < 0:
        raise error_from_errno(-result)
    return result


class Cancelled(BaseException):
    """Raised inside a task whose cancel scope was cancelled (a deadline passed, or ``cancel()`` was called).

    It is a ``BaseException`` so that ``except Exception`` does not swallow it by accident. Let it propagate: the scope that
    was cancelled catches it on the way out. An op that moved bytes before the cancel reports them (see
    ``SocketStream.sendall``) rather than losing them.
    """


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here. ``backend`` names it; ``reason`` says why and what to do."""

    def __init__(self, backend: str, reason: str):
        super().__init__(f"backend {backend!r} is unavailable: {reason}")
        self.backend = backend
        self.reason = reason


class BackendClosed(RuntimeError):
    """An op was submitted to a backend after ``close()``."""
