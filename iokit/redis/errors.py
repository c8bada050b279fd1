"""What can go wrong talking to Redis, named for what the caller can do about it.

Two families. A ``RedisReplyError`` is the server's own answer (``-ERR``, ``-WRONGTYPE``): the command reached it, the
connection is fine, the next command may go on. A ``RedisConnectionError`` means the reply did not come (the server is
down, the connection broke, the time ran out, the bytes were not RESP): that connection is dropped, and the error says
what the caller may assume about its writes:

* ``replies``: the replies that did arrive, in order (a pipeline cut after its third reply has three here). Those
  commands were *acknowledged*; nothing about them is lost or left in doubt.
* ``maybe_applied``: ``False`` when no byte of the unanswered commands can have reached the server (the connect
  failed), so they are safe to send again; ``True`` when the server may have applied them without our seeing the reply,
  so only an idempotent command should be retried.
"""

from __future__ import annotations


class RedisError(Exception):
    """Base of every error of ``iokit.redis``."""


class RedisReplyError(RedisError):
    """The server answered with an error reply (``str()`` is its text, e.g. ``"WRONGTYPE Operation against..."``)."""


class RedisAuthError(RedisReplyError):
    """``AUTH`` (or the ``SELECT`` of the URL's database) was refused when the connection opened."""


class RedisConnectionError(RedisError):
    """The replies did not all come. ``replies`` holds those that did; ``maybe_applied`` says whether the others may
    have been applied (see the module's docstring)."""

    def __init__(self, message: str, *, replies: list | None = None, maybe_applied: bool = True) -> None:
        super().__init__(message)
        self.replies = [] if replies is None else replies
        self.maybe_applied = maybe_applied


class RedisUnavailable(RedisConnectionError):
    """No connection could be opened: the server is down, or not at that address. Nothing was sent."""

    def __init__(self, message: str, *, replies: list | None = None, maybe_applied: bool = False) -> None:
        super().__init__(message, replies=replies, maybe_applied=maybe_applied)


class RedisTimeout(RedisConnectionError):
    """A connect, a reply, or the wait for a free pooled connection took longer than its timeout. The connection it
    happened on is dropped (a late reply would answer the next command)."""


class RedisProtocolError(RedisConnectionError):
    """The server sent bytes that are not RESP (hiredis's parser refused them): not a Redis server, or a broken one."""
