"""The live progress line on stderr.

A full run takes minutes and a quick one a few: the person waiting should see what is being measured, how far along the
run is and about how long is left. On a terminal the line is redrawn in place; when stderr is a file or a pipe (CI logs)
each step is printed on its own line instead, so the log stays readable. Notes (a skipped backend, a server that
failed) are printed on their own line either way, above the live line, and stay visible.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None):
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.started = time.monotonic()
        self.count = 0
        self._line = ""

    def step(self, label: str) -> None:
        """A new item starts: show it with the count, the elapsed time and an estimate of what is left."""
        self.count += 1
        elapsed = time.monotonic() - self.started
        done = self.count - 1
        left = f" ~{_clock(elapsed / done * (self.total - done))} left" if done else ""
        self._show(f"[{self.count:>{len(str(self.total))}}/{self.total} {_clock(elapsed)}{left}] {label}")

    def note(self, text: str) -> None:
        """A line that stays (a skip, a warning)."""
        if self.live and self._line:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        if self.live and self._line:
            self.stream.write(self._line)
        self.stream.flush()

    def finish(self) -> None:
        if self.live and self._line:
            self.stream.write("\r\033[K")
        self.stream.write(f"done: {self.count} items in {_clock(time.monotonic() - self.started)}\n")
        self.stream.flush()
        self._line = ""

    def _show(self, line: str) -> None:
        if self.live:
            self._line = line[:200]
            self.stream.write("\r\033[K" + self._line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
