"""Deadlines: every wait in the orchestrator is bounded and names what it waited for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from orchestrator.errors import TimeoutExpired

T = TypeVar("T")


class Deadline:
    """A point in (monotonic) time by which something must have happened."""

    def __init__(self, seconds: float, what: str, hint: str | None = None) -> None:
        self.seconds = seconds
        self.what = what
        self.hint = hint
        self._start = time.monotonic()
        self._end = self._start + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def expired(self) -> bool:
        return time.monotonic() >= self._end

    def error(self, detail: str | None = None) -> TimeoutExpired:
        message = f"timed out after {self.seconds:g} s waiting for {self.what}"
        if detail:
            message += f" ({detail})"
        return TimeoutExpired(message, self.hint)


def wait_for(
    probe: Callable[[], T | None],
    deadline: Deadline,
    *,
    interval: float = 0.25,
    max_interval: float = 2.0,
) -> T:
    """Call `probe` until it returns something other than None, or raise at the deadline.

    The interval grows by half each time up to `max_interval`: early probes are cheap and
    frequent, later ones do not hammer a slow guest.
    """
    delay = interval
    while True:
        result = probe()
        if result is not None:
            return result
        if deadline.expired():
            raise deadline.error()
        time.sleep(min(delay, deadline.remaining()))
        delay = min(delay * 1.5, max_interval)
