"""Running numbers the daemon reports: rates, latency percentiles, counters.

Small, lock-protected and allocation-free on the hot path (a fixed ring per latency), so recording
a sample costs microseconds on the capture and scorer threads.

Example:
    window = LatencyWindow(1024)
    window.add(12.5)
    window.percentiles()            # {"p50": 12.5, "p99": 12.5, "n": 1}
    rate = RateMeter(window_s=10)
    rate.tick(); rate.rate()        # events per second over the last 10 s
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np


class LatencyWindow:
    """The last `size` latencies (ms) in a ring; percentiles over what it holds."""

    def __init__(self, size: int = 1024):
        self._values = np.zeros(size, dtype=np.float64)
        self._count = 0
        self._lock = threading.Lock()

    def add(self, value_ms: float) -> None:
        with self._lock:
            self._values[self._count % len(self._values)] = value_ms
            self._count += 1

    def percentiles(self) -> dict[str, float]:
        with self._lock:
            filled = min(self._count, len(self._values))
            values = self._values[:filled].copy()
        if filled == 0:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
        p50, p99 = np.percentile(values, [50, 99])
        return {"p50": round(float(p50), 2), "p99": round(float(p99), 2), "max": round(float(values.max()), 2), "n": filled}


class RateMeter:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float = 10.0, clock=time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._times: deque[float] = deque()
        self._lock = threading.Lock()
        self._started = clock()

    def tick(self, count: int = 1) -> None:
        now = self._clock()
        with self._lock:
            for _ in range(count):
                self._times.append(now)
            self._trim(now)

    def rate(self) -> float:
        now = self._clock()
        with self._lock:
            self._trim(now)
            span = min(self.window_s, max(now - self._started, 1e-6))
            return len(self._times) / span

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()


class Counters:
    """Named monotonically increasing counters."""

    def __init__(self, *names: str):
        self._values: dict[str, int] = {name: 0 for name in names}
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class CameraStats:
    """Everything measured for one camera's pipeline (capture numbers come from the Capture itself)."""

    STAGES = ("queue", "preprocess", "score", "localize", "publish", "total")

    def __init__(self, latency_window: int = 1024):
        self.latency = {stage: LatencyWindow(latency_window) for stage in self.STAGES}
        self.inspected = RateMeter()
        self.counters = Counters(
            "inspected", "flagged", "triggers", "triggers_missed", "triggers_dropped", "ticks_skipped",
            "flagged_skipped", "errors",
        )
        self._lock = threading.Lock()
        self.last_score: float | None = None
        self.last_verdict: str | None = None
        self.product: str = ""

    def record(self, latencies_ms: dict[str, float], score: float, flagged: bool) -> None:
        for stage, value in latencies_ms.items():
            window = self.latency.get(stage)
            if window is not None:
                window.add(value)
        self.inspected.tick()
        self.counters.add("inspected")
        if flagged:
            self.counters.add("flagged")
        with self._lock:
            self.last_score = score
            self.last_verdict = "NG" if flagged else "OK"

    def snapshot(self) -> dict:
        counters = self.counters.snapshot()
        inspected = counters["inspected"]
        with self._lock:
            last_score, last_verdict = self.last_score, self.last_verdict
        return {
            "product": self.product,
            "fps_out": round(self.inspected.rate(), 2),
            "last_score": None if last_score is None else round(float(last_score), 4),
            "last_verdict": last_verdict,
            "flagged_rate": round(counters["flagged"] / inspected, 4) if inspected else 0.0,
            "latency_ms": {stage: window.percentiles() for stage, window in self.latency.items()},
            **counters,
        }


_LIBC = None


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc malloc_trim) after a big free such as a scorer swap: without
    it the RSS of a daemon that switches products keeps the high-water mark of every session it loaded."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes
            import ctypes.util

            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        _LIBC = False
