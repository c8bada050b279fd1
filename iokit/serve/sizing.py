"""Fitting the process to a service's ``max_connections``: the open-file limit, and the threads backend's pool."""

from __future__ import annotations

import resource

from ..shutdown import MAX_CONCURRENT_REJECTIONS


def threads_pool_size(max_connections: int) -> int:
    """The threads backend's pool for a server of ``max_connections``.

    The threads backend holds a worker for every blocking call in progress, and a connection waits in at most two (a
    read and a write; a held request's wait for the client to leave is one). A pool smaller than that would let idle
    or held connections take every worker and starve the rest (the model's limit: see backends/threads.py); workers
    start on demand, so the bound costs nothing idle. The other backends ignore it."""
    return 2 * max_connections + MAX_CONCURRENT_REJECTIONS


def raise_open_file_limit(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (within the hard limit).

    Each connection is a descriptor, and on the blocking backend its thread has a wake-up eventfd too; the default soft
    limit (often 1024) would cap a server below its own ``max_connections``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))
