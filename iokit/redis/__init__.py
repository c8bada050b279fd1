"""A Redis client on iokit's streams: the store that lets the jobs and push servers run past one process.

The patterns servers keep their state in one process's memory; to run ``--workers N`` or on several machines they move
it into Redis (job records with versions and TTLs, notifications, an event log in a stream). This package is the client
they use, on every backend: RESP over an iokit ``SocketStream``, parsed by hiredis's sans-IO ``Reader`` (a C parser
kept by the Redis project, fed the bytes we receive; we never parse RESP ourselves) and encoded by
``hiredis.pack_command``.

* ``RedisClient``: a bounded pool of connections, ``execute`` for one command, ``pipeline`` for many in one round
  trip, per-command timeouts, reconnects (a broken connection is dropped, the next command opens a new one), ``AUTH``
  and ``SELECT`` from the URL. ``subscription()`` opens a dedicated pub/sub connection.
* Errors (``errors.py``) say whether a command may have been applied; an acknowledged write is never in doubt.
* ``RedisServerProcess``: a throwaway ``redis-server`` on a free port in a temporary directory, for tests and benches.
"""

from .client import RedisAddress, RedisClient, Subscription, parse_redis_url
from .connection import RedisConnection
from .errors import (RedisAuthError, RedisConnectionError, RedisError, RedisProtocolError, RedisReplyError,
                     RedisTimeout, RedisUnavailable)
from .server_process import RedisServerProcess

__all__ = [
    "RedisAddress", "RedisAuthError", "RedisClient", "RedisConnection", "RedisConnectionError", "RedisError",
    "RedisProtocolError", "RedisReplyError", "RedisServerProcess", "RedisTimeout", "RedisUnavailable", "Subscription",
    "parse_redis_url",
]
