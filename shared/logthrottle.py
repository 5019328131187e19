"""Repeated log lines, rate-limited: the first line of a burst, then at most one line per interval that
says how many were held back and how fast they came.

A device catching up 324 rounds logged 324 identical "catching up" lines (issue 30); through a throttle it
logs the first, then one line every `every_s` such as
`result 400 arrived, we are at round 76: catching up (324 rounds behind; +119 like it in 10 s, 11.9/s)`.

    quiet = LogThrottle(log)                  # one per component instance: no global state
    quiet.log("catchup", logging.INFO, "result %d arrived, ...", r, ...)   # key: what counts as "the same line"

The clock is an argument (tests pass a fake one; a core passes each event's `now`); nothing is lost silently: every held-back line is counted
in the next line of its key (`flush` logs a pending count at once, e.g. when the burst is over).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Burst:
    shown_at: float  # when the last line of this key was logged
    held: int = 0  # lines held back since
    last: tuple[int, str, tuple[object, ...]] | None = None  # the newest held-back line (level, msg, args)


class LogThrottle:
    def __init__(self, logger: logging.Logger, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if every_s <= 0:
            raise ValueError(f"every_s: expected > 0, got {every_s}")
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self._bursts: dict[str, _Burst] = {}

    def log(self, key: str, level: int, msg: str, *args: object, now: float | None = None) -> bool:
        """Log `msg % args` unless a line of `key` was logged less than `every_s` ago (then count it).
        `now`: the caller's time (an I/O-free core passes its event's), else the clock. Returns whether
        it was logged."""
        now = self.clock() if now is None else now
        b = self._bursts.get(key)
        if b is not None and now - b.shown_at < self.every_s:
            b.held += 1
            b.last = (level, msg, args)
            return False
        self._emit(level, msg, args, b, now)
        self._bursts[key] = _Burst(now)
        return True

    def flush(self, key: str, now: float | None = None) -> None:
        """Log the newest held-back line of `key` now (with its count), if any: the end of a burst."""
        b = self._bursts.get(key)
        if b is None or b.last is None:
            return
        now = self.clock() if now is None else now
        level, msg, args = b.last
        self._emit(level, msg, args, b, now)
        self._bursts[key] = _Burst(now)

    def _emit(self, level: int, msg: str, args: tuple[object, ...], b: _Burst | None, now: float) -> None:
        if b is None or b.held == 0:
            self.logger.log(level, msg, *args)
            return
        dt = max(now - b.shown_at, 1e-9)
        self.logger.log(level, msg + " (+%d like it in %.0f s, %.1f/s)", *args, b.held, dt, b.held / dt)


__all__ = ["LogThrottle"]
