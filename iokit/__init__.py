"""iokit: low-level Linux I/O primitives."""
from . import _op as ops
from ._errors import BackendClosed, BackendUnavailable, Cancelled
from .backends import Backend, BackendInfo, backends, open_backend
