"""Repeated log lines, limited: the first at once, then at most one per interval with the running count.

Why: a fault that repeats per message or per frame (2,000 malformed commands in a second, a spool that
fails every write, a folder of unreadable files on a loop) must not flood the journal, but its count must
stay visible. Each key (one kind of problem) logs its first line at once; repeats inside `interval_s` are
only counted; the next line after the interval says how many it stands for and the total so far, and
`flush()` (at stop) reports repeats a quiet interval hid. The spool-drop line of the publisher works the
same way with its own totals.

Example:
    limiter = LogLimiter(log, interval_s=10.0)
    limiter.log(logging.WARNING, "malformed trigger", "ignored malformed trigger command: %s", reason)
    ...
    limiter.flush()
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_INTERVAL_S = 10.0


@dataclass
class _Key:
    level: int
    last_logged: float
    last_message: str = ""
    held: int = 0  # repeats counted but not logged since the last line
    total: int = 0


class LogLimiter:
    """Thread-safe; one instance per component (its keys are its kinds of problem, a small fixed set)."""

    def __init__(self, logger: logging.Logger, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._keys: dict[str, _Key] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: str, message: str, *args: Any, exc_info: Any = None) -> bool:
        """Log `message % args` now, or count it when `key` logged less than `interval_s` ago.
        True when a line was written."""
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is None:
                entry = self._keys[key] = _Key(level, now - self.interval_s)
            entry.total += 1
            entry.level = level
            if now - entry.last_logged < self.interval_s:
                entry.held += 1
                entry.last_message = message % args if args else message
                return False
            held, total, since = entry.held, entry.total, now - entry.last_logged
            entry.held, entry.last_logged = 0, now
        text = message % args if args else message
        if total > 1:
            text += f" ({_more(held, since)}{total} in total)"
        self.logger.log(level, "%s", text, exc_info=exc_info)
        return True

    def total(self, key: str) -> int:
        """How often `key` was logged or counted."""
        with self._lock:
            entry = self._keys.get(key)
            return entry.total if entry else 0

    def flush(self) -> None:
        """Log one line per key whose last repeats were counted but not written (call at stop)."""
        now = self._clock()
        with self._lock:
            pending = [(e.level, e.last_message, e.held, e.total, now - e.last_logged) for e in self._keys.values() if e.held]
            for entry in self._keys.values():
                entry.held, entry.last_logged = 0, now
        for level, message, held, total, since in pending:
            self.logger.log(level, "%s (%s%d in total)", message, _more(held, since), total)


def _more(held: int, since: float) -> str:
    return f"{held} more like this in the last {since:.0f} s, " if held else ""
