"""The bounded, rate-limited queue between an MQTT command handler and the one thread that does the work.

The daemon's ask and feedback services share it so that admission (stopping, rate limit, capacity),
the worker's wait for the next request and the drain on stop exist once. Each service keeps its own
error type, codes, messages and counters; `counts` is the service's dict, updated under `cond`.

Example:
    requests = RequestQueue(10, TokenBucket(1.0, 5), AskError, counts, stopping="...", rate_limited="...",
                            queue_full="...")
    requests.admit(request, check=validate)      # paho's thread: raises AskError("rate_limited", ...) etc.
    request = requests.take()                    # the worker: None once stopping
    requests.done()
    for left in requests.drain(): ...            # stop: what was still queued
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Generic, TypeVar

from .dispatch import TokenBucket

T = TypeVar("T")


class RequestQueue(Generic[T]):
    """Admission and hand-off for one worker thread. `error(code, message)` builds the exception that
    `admit` raises, with the codes 'stopping', 'rate_limited' and 'queue_full' and the caller's messages;
    refusals count `counts["rate_limited"]` and `counts["queue_full"]`."""

    def __init__(
        self,
        capacity: int,
        bucket: TokenBucket,
        error: Callable[[str, str], Exception],
        counts: dict[str, int],
        *,
        stopping: str,
        rate_limited: str,
        queue_full: str,
    ):
        self.capacity = capacity
        self.cond = threading.Condition()
        self.counts = counts
        self.stopping = False
        self.current: T | None = None  # the request the worker took and has not finished
        self.stopping_message = stopping
        self._bucket = bucket
        self._error = error
        self._rate_limited = rate_limited
        self._queue_full = queue_full
        self._queue: collections.deque[T] = collections.deque()

    def __len__(self) -> int:
        with self.cond:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        return self.current is not None

    def count(self, name: str) -> None:
        with self.cond:
            self.counts[name] += 1

    def admit(self, request: T, check: Callable[[], Any] | None = None) -> None:
        """Queue `request` or raise: stopping, then `check()` (the caller's own refusals), then the
        rate limit, then the capacity. Never blocks."""
        if self.stopping:
            raise self._error("stopping", self.stopping_message)
        if check is not None:
            check()
        if not self._bucket.take():
            self.count("rate_limited")
            raise self._error("rate_limited", self._rate_limited)
        with self.cond:
            if len(self._queue) >= self.capacity:
                self.counts["queue_full"] += 1
                raise self._error("queue_full", self._queue_full)
            self._queue.append(request)
            self.cond.notify_all()

    def take(self) -> T | None:
        """The worker's next request (it becomes `current` until `done()`); None once stopping."""
        with self.cond:
            while not self._queue and not self.stopping:
                self.cond.wait(0.5)
            if self.stopping:
                return None
            self.current = self._queue.popleft()
            return self.current

    def done(self) -> None:
        with self.cond:
            self.current = None

    def drain(self) -> list[T]:
        """Stop admitting, wake the worker, and return what was still queued (for the 'stopping' error)."""
        with self.cond:
            self.stopping = True
            left = list(self._queue)
            self._queue.clear()
            self.cond.notify_all()
        return left
