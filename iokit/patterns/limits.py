"""Every bound of the polling and push servers, in one place.

A server that holds requests open or keeps a queue per client must bound what clients can make it keep: jobs queued and
retained, requests held, subscribers, and the events waiting for a slow reader. Each number here is the one
``docs/patterns.md`` (sections 3-5) names. The servers read them from a frozen dataclass; ``iokit.serve``'s
``add_limit_arguments`` turns every field into a command-line flag (``retention_seconds`` -> ``--retention-seconds``),
which is how the tests shorten the times.

The HTTP-level bounds (body size, connections, the 10 s stalled-write limit) stay in ``iokit.http.HttpLimits``; the
pattern servers change one of its defaults, ``max_connections`` (``connections_for``): enough for every request they may
hold, and some to spare.
"""

from __future__ import annotations

import dataclasses

KIB = 1024

# Connections kept free, beyond the held requests or the subscribers, for the requests that change things (POST a job,
# publish a message) and for the occasional short poll: without them a full house of waiters would lock the writers out.
SPARE_CONNECTIONS = 256


@dataclasses.dataclass(frozen=True)
class JobLimits:
    """The bounds of the jobs server (short and long polling). Times are in seconds."""

    max_duration_ms: int = 600_000
    """The longest job a client may ask for (``duration_ms``); more is 400."""

    max_running_jobs: int = 16
    """Jobs running at once; the others wait in the queue (status ``queued``)."""

    max_queued_jobs: int = 256
    """Jobs waiting for a slot; one more gets 503 with Retry-After."""

    retention_seconds: float = 600.0
    """How long a finished job stays readable; after that it is 410 Gone."""

    max_retained_jobs: int = 100_000
    """Finished jobs kept at once; past it the oldest is dropped early (then 410), so a flood of tiny jobs cannot grow
    the table without bound within the retention time."""

    max_gone_ids: int = 100_000
    """Ids of dropped jobs remembered to answer 410 rather than 404; older ones are forgotten (then 404)."""

    max_held_requests: int = 4096
    """Long polls held at once; one more gets 503 with Retry-After."""

    default_wait_seconds: float = 30.0
    """How long a long poll is held when it names a ``version`` but no ``wait``."""

    max_wait_seconds: float = 60.0
    """The longest ``wait`` a client may ask for; more is 400."""

    wait_jitter: float = 0.05
    """A held request ends up to this fraction of its wait later, at random, so that clients that started together do
    not all come back in the same instant."""

    max_request_bytes: int = 4 * KIB
    """The body of ``POST /jobs`` (a small JSON object); more is 413."""

    max_idempotency_key_chars: int = 255
    """The longest ``Idempotency-Key`` accepted; longer is 400."""

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclasses.dataclass(frozen=True)
class PushLimits:
    """The bounds of the push (Server-Sent Events) server. Times are in seconds."""

    ring_events: int = 1024
    """Events kept for replay after ``Last-Event-ID``; a client further behind gets ``event: reset``."""

    max_subscribers: int = 1024
    """Open event streams; one more gets ``retry: 5000`` and the end of its stream."""

    subscriber_queue_events: int = 256
    """Events waiting for one subscriber's connection; past this (or ``subscriber_queue_bytes``) the slow-consumer
    policy applies."""

    subscriber_queue_bytes: int = 256 * KIB
    """Bytes of events waiting for one subscriber."""

    max_message_bytes: int = 4 * KIB
    """The body of ``POST /topics/{topic}/messages``; more is 413."""

    max_topic_chars: int = 64
    """Topic names are 1 to this many characters of ``A-Z a-z 0-9 . _ -``."""

    send_buffer_bytes: int = 64 * KIB
    """The kernel's send buffer on each connection (SO_SNDBUF; Linux doubles it). Left alone, TCP grows it up to
    ``net.ipv4.tcp_wmem``'s 4 MiB for a reader that stopped, which would hide a slow consumer from its bounded queue
    and cost that much kernel memory per subscriber."""

    ping_interval: float = 15.0
    """A stream with nothing to send for this long gets a ``: ping`` comment, so proxies and clients see it alive."""

    retry_ms: int = 2000
    """The reconnection delay every stream starts with (the ``retry:`` field)."""

    full_retry_ms: int = 5000
    """The reconnection delay sent to a client turned away because the server has ``max_subscribers``."""

    def __post_init__(self) -> None:
        _check_positive(self)


def connections_for(held: int) -> int:
    """Return the connection limit for a server that may hold ``held`` requests open at once."""
    return held + SPARE_CONNECTIONS


def check_connections(max_connections: int, held: int, held_flag: str) -> None:
    """Raise ``ValueError`` unless ``max_connections`` leaves room beyond the ``held`` requests a server may hold (set
    by the flag ``held_flag``): without it, a full house of waiters locks out the requests that change things."""
    if held >= max_connections:
        raise ValueError(f"--max-connections ({max_connections}) must exceed {held_flag} ({held}): the requests that "
                         f"change things need connections too")


def _check_positive(limits) -> None:
    for field in dataclasses.fields(limits):
        value = getattr(limits, field.name)
        if value < 0 or (value == 0 and field.name != "wait_jitter"):
            raise ValueError(f"{type(limits).__name__}.{field.name} must be positive, not {value!r}")
