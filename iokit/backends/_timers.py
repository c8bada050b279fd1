"""Timers for the backends that keep their own clock (threads, epoll): TIMEOUT ops and per-op deadlines.

A heap of ``(when, seq, op, is_deadline)``. Entries are never removed early: an op that completed before its timer
fires is simply skipped when the entry comes up (``op.id`` no longer matches), which keeps cancel O(1).
"""

from __future__ import annotations

import heapq
import itertools
import time

from .._op import Op, OpState


def poll_milliseconds(timeout: float | None) -> int | None:
    """Seconds (None = forever) to the milliseconds poll(2) takes, rounded up so a wait never ends before a timer."""
    return None if timeout is None else max(0, int(timeout * 1000 + 0.999))


class TimerHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Op, int, bool]] = []
        self._seq = itertools.count()

    def add(self, when: float, op: Op, *, is_deadline: bool) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), op, op.id, is_deadline))

    def timeout(self, timeout: float | None) -> float | None:
        """Shorten ``timeout`` (seconds, None = forever) so that the wait ends when the next timer is due."""
        if not self._heap:
            return timeout
        until_next = max(0.0, self._heap[0][0] - time.monotonic())
        return until_next if timeout is None else min(timeout, until_next)

    def expired(self) -> list[tuple[Op, bool]]:
        """Pop the due timers whose op is still in flight: ``(op, is_deadline)`` pairs."""
        now = time.monotonic()
        due = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _when, _seq, op, op_id, is_deadline = heapq.heappop(heap)
            if op.state is OpState.IN_FLIGHT and op.id == op_id:
                due.append((op, is_deadline))
        return due

    def fire(self, backend) -> None:
        """Settle the due timers: a TIMEOUT op completes with 0; an op whose deadline passed is cancelled."""
        for op, is_deadline in self.expired():
            if is_deadline:
                backend.cancel(op)
            else:
                backend._finish(op, 0)

    def clear(self) -> None:
        self._heap.clear()
