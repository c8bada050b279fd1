"""One connection to Redis: commands out as RESP, replies in through hiredis's sans-IO ``Reader``.

A connection is a plain request/reply channel: a command (or a pipeline of them) is sent in one ``sendall``, then
exactly as many replies are read as commands were sent, so the connection stays in step. Anything that could leave it
out of step (a reply that did not come in time, a connection cut mid-reply, bytes that are not RESP) *breaks* it: it
raises a ``RedisConnectionError`` and is never used again, since the late reply would answer the next command.

On the loop backends' native engine ``sendall`` only queues the bytes, and a dead connection shows itself at the next
receive; so every failure is told at the receive, with what it knows: the replies already read are acknowledged, the
rest *may* have been applied (``errors.py``).
"""

from __future__ import annotations

import contextlib
import math
import socket
from typing import Any, Iterable, Sequence

import hiredis

import iokit

from .errors import (RedisAuthError, RedisConnectionError, RedisProtocolError, RedisReplyError, RedisTimeout,
                     RedisUnavailable)

RECEIVE_SIZE = 65536
NO_REPLY = object()  # what ``next_reply_by`` returns when its deadline passed
_NO_SCOPE = contextlib.nullcontext()  # a watched round trip's wait: its deadline is kept by the pool


def pack_commands(commands: Iterable[Sequence[Any]]) -> bytes:
    """Return the RESP bytes of ``commands`` (each a sequence of ``str``, ``bytes``, ``int`` or ``float``)."""
    return b"".join([hiredis.pack_command(tuple(command)) for command in commands])


def _deadline_in(timeout: float) -> float:
    return iokit.current_time() + timeout  # math.inf stays math.inf: no deadline


async def _connect_tcp(host: str, port: int) -> iokit.SocketStream:
    """``iokit.connect_tcp``, but a failed or cancelled connect closes its socket *through the backend*.

    ``connect_tcp`` closes it with ``socket.close()``, which leaves the epoll backend's registration of the fd (made
    while the connect waited) in place; the next socket given that number then never completes its connect. Seen here:
    once the server was down (connection refused), every later connect on ``epoll`` timed out. A stream's ``aclose``
    drops the registration, so the failed socket is closed as a stream."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = iokit.SocketStream(sock)
    try:
        await iokit.perform(iokit.ops.connect(sock.fileno(), (host, port)))
    except BaseException:
        await stream.aclose(flush_seconds=0.0)
        raise
    return stream


class RedisConnection:
    """A connection to one Redis server. Not for two tasks at once: the pool hands it to one user at a time.

    ``broken`` is ``None`` while it is usable, else why it is not.
    """

    def __init__(self, stream: iokit.SocketStream, description: str) -> None:
        self.stream = stream
        self.description = description
        self.broken: str | None = None
        # Set by a pool that watches its commands' deadlines itself (``round_trip(..., watched=True)``): when one
        # passes, it calls ``time_out``, and the command's wait ends as a ``RedisTimeout``.
        self.deadline = math.inf
        self.timed_out = False
        self._reader = hiredis.Reader(protocolError=RedisProtocolError, replyError=RedisReplyError)

    @classmethod
    async def open(cls, host: str, port: int, *, timeout: float, password: str | None = None,
                   username: str | None = None, database: int = 0) -> "RedisConnection":
        """Connect to ``host:port`` (numeric), then ``AUTH`` and ``SELECT`` when asked, within ``timeout`` seconds.

        Raises ``RedisUnavailable`` (refused, unreachable), ``RedisTimeout``, ``RedisAuthError``."""
        description = f"redis at {host}:{port}"
        stream = None
        with iokit.move_on_after(timeout) as scope:
            try:
                stream = await _connect_tcp(host, port)
            except OSError as error:
                raise RedisUnavailable(f"cannot connect to {description}: {error.strerror or error}") from None
        if stream is None or scope.cancelled_caught:
            if stream is not None:
                await stream.aclose()
            raise RedisTimeout(f"no connection to {description} within {timeout:g} s", maybe_applied=False)
        connection = cls(stream, description)
        setup = []
        if password is not None:
            setup.append(("AUTH", password) if username is None else ("AUTH", username, password))
        if database:
            setup.append(("SELECT", database))
        if setup:
            try:
                replies = await connection.pipeline(setup, timeout=timeout)
            except BaseException:
                await connection.aclose()
                raise
            refused = next((reply for reply in replies if isinstance(reply, RedisReplyError)), None)
            if refused is not None:
                await connection.aclose()
                raise RedisAuthError(f"{description} refused the connection's setup: {refused}")
        return connection

    async def execute(self, command: Sequence[Any], *, timeout: float = math.inf) -> Any:
        """Send one command and return its reply. An error reply is raised as ``RedisReplyError`` (the connection stays
        usable); ``RedisConnectionError`` and its kinds when the reply does not come."""
        reply = (await self.round_trip(hiredis.pack_command(tuple(command)), 1, _deadline_in(timeout)))[0]
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Any]], *, timeout: float = math.inf) -> list:
        """Send ``commands`` in one write and return their replies in order, error replies as ``RedisReplyError``
        instances in their places (not raised: the others were applied). Raises ``RedisConnectionError`` (with the
        replies that arrived) when not all replies come within ``timeout`` seconds."""
        return await self.round_trip(pack_commands(commands), len(commands), _deadline_in(timeout))

    async def round_trip(self, data: bytes, count: int, deadline: float, *, watched: bool = False) -> list:
        """Send ``data`` (``count`` commands in RESP: ``pack_commands``) in one write and return their ``count``
        replies, error replies in their places, by ``deadline`` (``iokit.current_time()`` seconds; ``math.inf``:
        none). ``pipeline`` for a caller that encoded its commands once; with ``data`` empty, only reads. One frame,
        and one cancel scope for every receive: a short command is a few steps of Python. ``watched``: the caller
        has set ``self.deadline`` and will call ``time_out`` once it passes, so no cancel scope is needed."""
        if self.broken is not None:
            raise RedisConnectionError(f"the connection to {self.description} is broken: {self.broken}",
                                       maybe_applied=False)
        replies: list = []
        if data:
            try:
                await self.stream.sendall(data)
            except OSError as error:
                # On the Op path sendall reports its progress: a command cut short before its last byte was not run.
                sent = getattr(error, "bytes_sent", len(data))
                raise self._break(f"sending to {self.description} failed: {error.strerror or error}", replies,
                                  maybe_applied=sent > 0) from None
            except BaseException:
                self.broken = "cancelled while sending"
                raise
        if count == 0:
            return replies
        reader = self._reader
        finished = False
        with _NO_SCOPE if watched else iokit.CancelScope(deadline=deadline):
            try:
                while True:
                    reply = reader.gets()
                    if reply is not False:
                        replies.append(reply)
                        if len(replies) == count:
                            break
                        continue
                    received = await self.stream.receive_some(RECEIVE_SIZE)
                    if not received:
                        raise self._break(f"{self.description} closed the connection", replies)
                    reader.feed(received)
                finished = True
            except RedisProtocolError as error:
                raise self._break_with(RedisProtocolError(f"{self.description} sent bytes that are not RESP: {error}",
                                                          replies=replies)) from None
            except OSError as error:
                raise self._break(f"the connection to {self.description} failed: {error.strerror or error}",
                                  replies) from None
            except BaseException:
                if self.broken is None:
                    self.broken = "cancelled while waiting for a reply"
                raise
        if not finished:
            raise self._break_with(RedisTimeout(f"{self.description} sent {len(replies)} of {count} replies within "
                                                f"the command's time", replies=replies))
        return replies

    async def read_replies(self, count: int, *, timeout: float = math.inf) -> list:
        """Return the next ``count`` replies (error replies in their places), within ``timeout`` seconds."""
        return await self.round_trip(b"", count, _deadline_in(timeout))

    async def next_reply_by(self, deadline: float) -> Any:
        """Return the next reply, or ``NO_REPLY`` if none has begun arriving by ``deadline`` (the connection stays in
        step: the wait is a readiness wait, which takes no bytes). For pushed messages (pub/sub), which may never come.
        Raises ``RedisConnectionError`` and its kinds when the connection breaks."""
        while True:
            try:
                reply = self._reader.gets() if self.broken is None else False
            except RedisProtocolError as error:
                raise self._break_with(RedisProtocolError(f"{self.description} sent bytes that are not RESP: "
                                                          f"{error}")) from None
            if reply is not False:
                return reply
            if self.broken is not None:
                raise RedisConnectionError(f"the connection to {self.description} is broken: {self.broken}")
            with iokit.CancelScope(deadline=deadline) as scope:
                await self.stream.wait_readable()
            if scope.cancelled_caught:
                return NO_REPLY
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except OSError as error:
                raise self._break(f"the connection to {self.description} failed: {error.strerror or error}",
                                  []) from None
            except BaseException:
                self.broken = "cancelled while receiving"
                raise
            if not data:
                raise self._break(f"{self.description} closed the connection", [])
            self._reader.feed(data)

    def probe_closed(self) -> bool:
        """Return ``True`` if the connection is known to be closed or unusable, looking without waiting (a peek at the
        socket: the server's FIN or RST is seen there on the blocking, threads and epoll backends; on uring the
        engine's armed receive takes it first, and the next command finds it)."""
        if self.broken is not None:
            return True
        try:
            data = self.stream.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError as error:
            self.broken = f"closed while idle: {error.strerror or error}"
            return True
        self.broken = "closed while idle" if not data else "unexpected bytes while idle"
        return True

    def time_out(self) -> None:
        """End the command in flight as a ``RedisTimeout``: its deadline has passed. Shutting the socket down ends
        the wait of its receive (or send) on every backend; the connection is broken for good."""
        self.timed_out = True
        try:
            self.stream.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the peer: the receive has ended anyway

    def _break(self, message: str, replies: list, *, maybe_applied: bool = True) -> RedisConnectionError:
        if self.timed_out:
            return self._break_with(RedisTimeout(f"{self.description} sent {len(replies)} replies before the "
                                                 f"command's time ran out", replies=replies))
        return self._break_with(RedisConnectionError(message, replies=replies, maybe_applied=maybe_applied))

    def _break_with(self, error: RedisConnectionError) -> RedisConnectionError:
        self.broken = str(error)
        return error

    async def aclose(self) -> None:
        """Close the connection (idempotent); a broken one is closed at once, without waiting for queued bytes."""
        if self.broken is None:
            self.broken = "closed"
            await self.stream.aclose()
        else:
            await self.stream.aclose(flush_seconds=0.0)
