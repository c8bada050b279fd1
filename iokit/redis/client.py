"""The Redis client the servers use: a bounded pool of connections, with timeouts and reconnects.

* **A pool, bounded.** At most ``max_connections`` are open at once; a command takes an idle one (or opens one) and
  gives it back after its reply. A task that finds every connection busy waits, within the command's timeout. Tasks on
  the ``blocking`` backend are threads, so the idle list is kept under a lock.
* **Reconnects.** A connection that failed is dropped, never reused, and the next command opens a new one. When one
  fails, the server has likely gone away for all of them (a restart), so every connection idle at the time of the
  failure is dropped too (the pool's *generation*), and a connection idle for ``PROBE_AFTER_IDLE_SECONDS`` or more
  is peeked at before it is reused. One given back less than that ago is reused without a look (the peek is a
  system call per command, and on ``uring`` the engine's armed receive sees a close before any peek could): a
  restart within that time shows at the connection's next command, which a read-only command survives (resent on a
  new connection) and a write reports as ``maybe_applied``.
* **Retries only where nothing can be applied twice.** A command that failed before any byte of it was sent is sent
  again on a new connection; so is a read-only command (``GET``, ``XRANGE``...: ``READ_ONLY_COMMANDS``) that failed on a
  reused connection. A write whose reply did not come is *not* resent: the ``RedisConnectionError`` says it may have
  been applied, and the caller decides (an idempotent write may be repeated by the caller; an increment may not).
* **Timeouts without a scope per command.** Inside ``async with`` one task of the client looks at its busy
  connections every ``WATCH_TICK_SECONDS`` and shuts down the socket of any whose command is past its deadline: the
  wait ends, the command raises ``RedisTimeout`` (with the replies that came), and the connection is dropped. So the
  usual command needs no cancel scope and no timer (``WATCHED_FROM_SECONDS``: shorter timeouts still get a scope).
* **Typed errors** (``errors.py``): ``RedisUnavailable`` (server down, or still loading its data after a restart),
  ``RedisTimeout``, ``RedisProtocolError``, and
  ``RedisReplyError`` for the server's own refusals.

``Subscription`` is pub/sub on a connection of its own (a subscribed connection can only receive messages).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import socket
import threading
import urllib.parse
from typing import Any, Sequence

import hiredis

import iokit

from .connection import NO_REPLY, RedisConnection, pack_commands
from .errors import RedisConnectionError, RedisError, RedisReplyError, RedisTimeout, RedisUnavailable

DEFAULT_COMMAND_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_MAX_CONNECTIONS = 32
PROBE_AFTER_IDLE_SECONDS = 1.0
# Inside ``async with`` the client keeps its commands' deadlines itself: one task looks every WATCH_TICK_SECONDS and
# times out the connections whose command is past its deadline, so a command needs no cancel scope (a scope with a
# deadline was a quarter of a short command's Python). A command with less than WATCHED_FROM_SECONDS to go, or a
# client not entered, gets a scope: its timeout is kept to the timer's precision, not the tick's.
WATCH_TICK_SECONDS = 0.1
WATCHED_FROM_SECONDS = 1.0

# Commands that change nothing: resending one whose reply was lost cannot apply anything twice.
READ_ONLY_COMMANDS = frozenset({
    "PING", "ECHO", "GET", "MGET", "STRLEN", "EXISTS", "TTL", "PTTL", "TYPE", "HGET", "HMGET", "HGETALL", "HEXISTS",
    "HLEN", "SCARD", "SISMEMBER", "SMEMBERS", "ZCARD", "ZSCORE", "ZRANGE", "ZRANGEBYSCORE", "LLEN", "LRANGE", "XLEN",
    "XRANGE", "XREVRANGE", "XREAD", "XINFO", "TIME", "DBSIZE", "INFO",
})


@dataclasses.dataclass(frozen=True)
class RedisAddress:
    """Where the server is and how to log in: ``host`` is numeric (``connect_tcp`` takes no names)."""

    host: str = "127.0.0.1"
    port: int = 6379
    database: int = 0
    username: str | None = None
    password: str | None = None

    def url(self) -> str:
        """Return the address as a URL, without the password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.database}"


def parse_redis_url(url: str) -> RedisAddress:
    """Return the ``RedisAddress`` of ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``. A host name is resolved once,
    here (to its first IPv4 or IPv6 address). Raises ``ValueError`` for anything else."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"a Redis URL is redis://HOST:PORT/DB, not {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"the port of {url!r} is not a number from 0 to 65535") from None
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ValueError(f"the database of {url!r} must be a number, not {path!r}")
    host = parts.hostname
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            host = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        except OSError as error:
            raise ValueError(f"cannot resolve the host of {url!r}: {error}") from None
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return RedisAddress(host, port, int(path or 0), username, password)


class RedisClient:
    """A pool of connections to one Redis server, for the tasks of one runtime (``iokit.run``).

    Use it as an async context manager, or call ``aclose()`` at the end. ``statistics()`` counts what it did."""

    def __init__(self, address: RedisAddress | str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.address = parse_redis_url(address) if isinstance(address, str) else address
        self.max_connections = max_connections
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        # (generation it was opened in, when it was given back, connection), newest last
        self._idle: list[tuple[int, float, RedisConnection]] = []
        self._generation = 0
        self._permits: iokit.Queue = iokit.Queue(max_connections)
        for _ in range(max_connections):
            self._permits.put_nowait(None)
        self._closed = False
        self._counts = {"opened": 0, "reused": 0, "dropped": 0, "retried": 0}
        self._open: set[RedisConnection] = set()  # every connection not yet closed: what the watchdog looks at
        self._watchdog: iokit.TaskGroup | None = None

    async def __aenter__(self) -> "RedisClient":
        watchdog = iokit.TaskGroup()
        await watchdog.__aenter__()
        watchdog.spawn(self._watch_deadlines, name="redis-deadlines")
        self._watchdog = watchdog
        return self

    async def __aexit__(self, *exc_info) -> None:
        watchdog, self._watchdog = self._watchdog, None
        try:
            await self.aclose()
        finally:
            if watchdog is not None:
                watchdog.cancel_scope.cancel()
                await watchdog.__aexit__(*exc_info)

    async def _watch_deadlines(self) -> None:
        while True:
            await iokit.sleep(WATCH_TICK_SECONDS)
            now = iokit.current_time()
            with self._lock:  # a connection given back or dropped has its deadline at infinity (under this lock)
                for connection in self._open:
                    if connection.deadline <= now and not connection.timed_out:
                        connection.time_out()

    # -- commands ----------------------------------------------------------------------------------------------------

    async def execute(self, *command: Any, timeout: float | None = None) -> Any:
        """Run one command and return its reply (``bytes``, ``int``, lists, ``None``). Raises ``RedisReplyError`` for
        an error reply, ``RedisConnectionError`` (``RedisUnavailable``, ``RedisTimeout``...) when it got none."""
        reply = (await self._run(hiredis.pack_command(command), 1, timeout, _is_read_only(command)))[0]
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Any]], *, timeout: float | None = None,
                       raise_on_error: bool = True) -> list:
        """Run ``commands`` in one round trip and return their replies in order. With ``raise_on_error`` the first
        error reply is raised once all replies are in (every other command was applied); without, error replies are
        returned in their places as ``RedisReplyError``. A pipeline is resent after a failure only if nothing of it
        was sent, or if every command in it is read-only."""
        if not commands:
            return []
        return await self.pipeline_encoded(pack_commands(commands), len(commands),
                                           read_only=all(_is_read_only(c) for c in commands), timeout=timeout,
                                           raise_on_error=raise_on_error)

    async def pipeline_encoded(self, data: bytes, count: int, *, read_only: bool, timeout: float | None = None,
                               raise_on_error: bool = True) -> list:
        """``pipeline`` for ``count`` commands already in RESP (``data``: ``pack_commands``), for a caller that sends
        the same commands often and encodes them once. ``read_only`` says that every one of them changes nothing (the
        pipeline may then be resent on a new connection when a reused one fails)."""
        replies = await self._run(data, count, timeout, read_only)
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, RedisReplyError):
                    raise reply
        return replies

    async def _run(self, data: bytes, count: int, timeout: float | None, retry_after_send: bool) -> list:
        now = iokit.current_time()
        deadline = now + (self.command_timeout if timeout is None else timeout)
        for attempt in (1, 2):
            # The common case first, with no await: a permit free and the newest idle connection fit for reuse.
            connection = self._reuse_idle(now) if attempt == 1 else None
            reused = connection is not None
            if connection is None:
                connection, reused = await self._acquire(deadline)
            watched = self._watchdog is not None and deadline - now >= WATCHED_FROM_SECONDS
            if watched:
                connection.deadline = deadline
            try:
                replies = await connection.round_trip(data, count, deadline, watched=watched)
            except RedisConnectionError as error:
                await self._drop(connection)
                retry = (attempt == 1 and not error.replies and not isinstance(error, RedisTimeout)
                         and (not error.maybe_applied or (retry_after_send and reused)))
                if not retry:
                    raise
                self._counts["retried"] += 1
                continue
            except BaseException:
                await self._drop(connection)  # cancelled mid-command: its reply would answer the next one
                raise
            if not self._give_back(connection):  # the client was closed while this command ran, or it timed out
                await connection.aclose()
            if isinstance(replies[0], RedisReplyError) and str(replies[0]).startswith("LOADING"):
                # A server that has just restarted refuses every command until its data is loaded: nothing was applied.
                raise RedisUnavailable(f"{self.address.url()} is loading its data: {replies[0]}")
            return replies
        raise AssertionError("unreachable")

    # -- the pool ----------------------------------------------------------------------------------------------------

    def _reuse_idle(self, now: float) -> RedisConnection | None:
        """Return the newest idle connection, holding one permit, if a permit is free and that connection can be
        reused without a look (same generation, not broken, idle less than ``PROBE_AFTER_IDLE_SECONDS``); else
        ``None``, holding nothing (``_acquire`` then does the rest: waits, probes, discards, opens)."""
        if self._closed:
            return None
        try:
            self._permits.get_nowait()
        except iokit.WouldBlock:
            return None
        with self._lock:
            if self._idle:
                generation, given_back_at, connection = self._idle[-1]
                if (generation == self._generation and connection.broken is None
                        and now - given_back_at < PROBE_AFTER_IDLE_SECONDS):
                    self._idle.pop()
                    self._counts["reused"] += 1
                    return connection
        self._permits.put_nowait(None)
        return None

    async def _acquire(self, deadline: float) -> tuple[RedisConnection, bool]:
        """Return a connection and whether it was reused, holding one permit. Raises ``RedisTimeout`` when none frees
        by ``deadline``, and what opening one raises."""
        if self._closed:
            raise RedisError("the Redis client is closed")
        try:
            self._permits.get_nowait()  # no deadline to watch, no trip round the loop
        except iokit.WouldBlock:
            with iokit.CancelScope(deadline=deadline) as scope:
                await self._permits.get()
            if scope.cancelled_caught:
                raise RedisTimeout(f"all {self.max_connections} connections to {self.address.url()} stayed busy",
                                   maybe_applied=False)
        try:
            while True:
                with self._lock:
                    if not self._idle:
                        break
                    generation, given_back_at, connection = self._idle.pop()
                if generation == self._generation and not (
                        connection.broken is not None
                        or (iokit.current_time() - given_back_at >= PROBE_AFTER_IDLE_SECONDS
                            and connection.probe_closed())):
                    self._counts["reused"] += 1
                    return connection, True
                await self._discard(connection)
            connection = await RedisConnection.open(
                self.address.host, self.address.port, password=self.address.password, username=self.address.username,
                database=self.address.database,
                timeout=max(0.0, min(self.connect_timeout, deadline - iokit.current_time())))
            self._counts["opened"] += 1
            with self._lock:
                self._open.add(connection)
            return connection, False
        except BaseException:
            self._permits.put_nowait(None)
            raise

    def _give_back(self, connection: RedisConnection) -> bool:
        """Put ``connection`` back among the idle ones and give back its permit; ``False`` if the client was closed
        meanwhile, or the watchdog timed the connection out just as its replies came (the caller then closes it)."""
        with self._lock:
            connection.deadline = math.inf
            keep = not self._closed and not connection.timed_out
            if keep:
                self._idle.append((self._generation, iokit.current_time(), connection))
            else:
                self._open.discard(connection)
                if connection.timed_out:
                    self._counts["dropped"] += 1
        self._permits.put_nowait(None)
        return keep

    async def _drop(self, connection: RedisConnection) -> None:
        """Close a connection that failed, with every idle connection opened before it; give back its permit."""
        with self._lock:
            self._generation += 1
        try:
            await self._discard(connection)
        finally:
            self._permits.put_nowait(None)

    async def _discard(self, connection: RedisConnection) -> None:
        with self._lock:  # before the close: the watchdog never shuts down a socket that is closed
            connection.deadline = math.inf
            self._open.discard(connection)
        self._counts["dropped"] += 1
        await connection.aclose()

    def statistics(self) -> dict[str, int]:
        """Return the counts: connections ``opened``, ``reused``, ``dropped``, commands ``retried``, and ``idle`` now."""
        with self._lock:
            return {**self._counts, "idle": len(self._idle)}

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their command ends. Later commands raise
        ``RedisError``."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            for _, _, connection in idle:
                self._open.discard(connection)
        for _, _, connection in idle:
            await connection.aclose()

    # -- pub/sub -----------------------------------------------------------------------------------------------------

    def subscription(self) -> "Subscription":
        """Return a ``Subscription`` on a connection of its own (opened on entering it: ``async with``)."""
        return Subscription(self)


def _is_read_only(command: Sequence[Any]) -> bool:
    name = command[0]
    if name in READ_ONLY_COMMANDS:  # the usual spelling, looked up as it is
        return True
    if isinstance(name, (bytes, bytearray)):
        name = name.decode("ascii", "replace")
    return str(name).upper() in READ_ONLY_COMMANDS


class Subscription:
    """Pub/sub on a dedicated connection: ``async with client.subscription() as subscription``, ``await
    subscription.subscribe(channel, ...)``, then ``await subscription.next_message()`` for each ``(channel, data)``.

    When the connection breaks, ``next_message`` raises ``RedisConnectionError``: messages published meanwhile are lost
    (pub/sub keeps none), so the caller re-subscribes with ``reconnect()`` and re-reads the state it watches."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.channels: list[str] = []
        self.connection: RedisConnection | None = None
        self._pending: list[tuple[bytes, bytes]] = []

    async def __aenter__(self) -> "Subscription":
        await self.reconnect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def reconnect(self) -> None:
        """(Re)open the connection and subscribe to every channel subscribed so far. Raises what connecting raises."""
        if self.connection is not None:
            await self.connection.aclose()
            self.connection = None
        address = self.client.address
        self.connection = await RedisConnection.open(address.host, address.port, password=address.password,
                                                     username=address.username, database=address.database,
                                                     timeout=self.client.connect_timeout)
        if self.channels:
            await self._subscribe(self.channels)

    async def subscribe(self, *channels: str) -> None:
        """Subscribe to ``channels``; returns once the server has confirmed each."""
        self.channels += [channel for channel in channels if channel not in self.channels]
        await self._subscribe(list(channels))

    async def _subscribe(self, channels: list[str]) -> None:
        assert self.connection is not None, "enter the subscription first"
        await self.connection.stream.sendall(pack_commands(("SUBSCRIBE", channel) for channel in channels))
        confirmed = 0
        while confirmed < len(channels):
            reply = (await self.connection.read_replies(1, timeout=self.client.command_timeout))[0]
            if isinstance(reply, list) and reply and reply[0] == b"subscribe":
                confirmed += 1
            elif isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                self._pending.append((reply[1], reply[2]))
            elif isinstance(reply, RedisReplyError):
                raise reply

    async def next_message(self, timeout: float = math.inf) -> tuple[bytes, bytes] | None:
        """Return the next ``(channel, data)`` published, or ``None`` if none came within ``timeout`` seconds.
        Raises ``RedisConnectionError`` when the connection breaks."""
        if self._pending:
            return self._pending.pop(0)
        assert self.connection is not None, "enter the subscription first"
        deadline = iokit.current_time() + timeout
        while True:
            reply = await self.connection.next_reply_by(deadline)
            if reply is NO_REPLY:
                return None
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                return reply[1], reply[2]

    async def aclose(self) -> None:
        if self.connection is not None:
            connection, self.connection = self.connection, None
            await connection.aclose()
