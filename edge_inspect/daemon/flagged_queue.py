"""The flagged-frame queue: flagged inspections wait here for the explanation stage (the VLM).

The queue is bounded (pipeline.flagged_queue_size) and never makes the scorer wait: `reserve()` is
asked before the result is published, so the result says vlm_status "pending" or "skipped". A sink
(the hook the VLM stage implements) gets one item at a time on the queue's own thread.

Example:
    queue = FlaggedQueue(4, sink); queue.start()
    if queue.reserve(): ...publish the result as pending...; queue.put(FlaggedFrame(...))
    queue.close(deadline)
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..evidence import EvidenceStore
from ..records import Frame, Inspection, ScoreResult
from .runtime_stats import Counters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlaggedFrame:
    """What the explanation stage gets for one flagged inspection (its result is already published)."""

    inspection: Inspection  # as published, vlm_status "pending"
    frame: Frame  # the full captured frame
    view: np.ndarray  # the camera view that was scored (ROI crop, resize), BGR
    score: ScoreResult  # anomaly map at the scorer's input resolution
    product: Any  # scorer.product.ProductCalibration of the scorer that flagged it
    publish_update: Callable[[dict], bool]  # publishes .../result/update for this id; only the first call counts
    queued_at: float = field(default_factory=time.monotonic)  # when it was offered to the queue


# The hook the VLM stage implements: called on the daemon's flagged-frame thread, one item at a time;
# it may take seconds; it calls item.publish_update(payloads.vlm_update(...)) once. If it raises, or the
# daemon stops first, the daemon publishes the update itself (failed / skipped), so every pending
# result gets exactly one update.
FlaggedSink = Callable[[FlaggedFrame], None]


class UpdateOnce:
    """publish_update for one inspection that lets only the first update through (later ones are logged).

    The update is also merged into the inspection's evidence JSON when `evidence` is given.
    """

    def __init__(self, publisher, inspection_id: str, evidence: EvidenceStore | None = None):
        self._publisher = publisher
        self.inspection_id = inspection_id
        self._evidence = evidence
        self._lock = threading.Lock()
        self.sent = False

    def __call__(self, update: dict) -> bool:
        with self._lock:
            if self.sent:
                log.warning("a second update for inspection %s was ignored: %s", self.inspection_id, update.get("vlm_status"))
                return False
            self.sent = True
        self._publisher.publish_update(self.inspection_id, update)
        if self._evidence is not None:
            try:
                self._evidence.update(self.inspection_id, update)
            except Exception:  # noqa: BLE001 - the update is published; its copy on disk is a convenience
                log.exception("could not merge the update of inspection %s into its evidence", self.inspection_id)
        return True


class FlaggedQueue:
    """The one bounded queue in front of the FlaggedSink (the VLM stage): `reserve()` never waits.

    `capacity` (pipeline.flagged_queue_size) counts every flagged frame held: reserved, queued and
    the one in the sink. When full, a frame that scores higher than the lowest queued one takes its
    place (that one gets a `skipped` update); otherwise the new frame is skipped (its result says
    vlm_status "skipped"). The sink is served highest score first, oldest among equals.
    """

    def __init__(self, capacity: int, sink: FlaggedSink):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._sink = sink
        self._cond = threading.Condition()
        self._items: list[tuple[float, int, FlaggedFrame]] = []  # (score, arrival, item)
        self._arrivals = 0
        self._reserved = 0  # slots taken by reserve() whose item is not put yet
        self._closed = False
        self.counters = Counters("offered", "skipped", "evicted", "explained", "sink_errors", "abandoned")
        self._thread = threading.Thread(target=self._run, name="flagged-sink", daemon=True)
        self._busy = False
        self._current: FlaggedFrame | None = None
        self.last_beat = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def reserve(self, score: float = float("inf")) -> bool:
        """Take a slot for a flagged frame scoring `score` (before its result is published)."""
        evicted = None
        with self._cond:
            accepted = not self._closed
            if accepted and self._reserved + len(self._items) + int(self._busy) >= self.capacity:
                # lowest score, newest among equals, leaves first
                lowest = min(self._items, key=lambda e: (e[0], -e[1]), default=None)
                if lowest is not None and float(score) > lowest[0]:
                    self._items.remove(lowest)
                    evicted = lowest[2]
                else:
                    accepted = False
            if accepted:
                self._reserved += 1
        if evicted is not None:
            self.counters.add("evicted")
            _safe_update(evicted, {"vlm_status": "skipped", "error": f"flagged-frame queue full (pipeline.flagged_queue_size="
                                   f"{self.capacity}): a higher-scoring frame took its place"})
        self.counters.add("offered" if accepted else "skipped")
        return accepted

    def release(self) -> None:
        """Give back a reserved slot whose item will not be put (its result was not published)."""
        with self._cond:
            self._reserved -= 1
            self._cond.notify_all()

    def outstanding(self) -> int:
        """Flagged frames reserved, queued or in the sink; 0 = idle."""
        with self._cond:
            return self._reserved + len(self._items) + int(self._busy)

    def put(self, item: FlaggedFrame) -> None:
        with self._cond:
            self._reserved -= 1
            closed = self._closed
            if not closed:
                self._arrivals += 1
                self._items.append((float(item.score.score), self._arrivals, item))
                self._cond.notify_all()
        if closed:
            self.counters.add("abandoned")
            _safe_update(item, {"vlm_status": "skipped", "error": "the daemon stopped before the explanation stage ran"})

    def depth(self) -> int:
        with self._cond:
            return len(self._items) + int(self._busy)

    def hung(self, now: float, limit: float) -> bool:
        """The queue's thread made no progress for `limit` seconds while idle (a sink may take long)."""
        return self._thread.is_alive() and not self._busy and now - self.last_beat > limit

    def _take(self) -> FlaggedFrame | None:
        """The highest-scoring item, marked busy; None when closed and empty."""
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait(0.5)
                self.last_beat = time.monotonic()
            best = max(self._items, key=lambda e: (e[0], -e[1]))
            self._items.remove(best)
            self._busy, self._current = True, best[2]
            return best[2]

    def _run(self) -> None:
        while True:
            self.last_beat = time.monotonic()
            item = self._take()
            if item is None:
                return
            try:
                self._sink(item)
                self.counters.add("explained")
            except Exception:  # noqa: BLE001 - a sink bug must not stop the daemon
                self.counters.add("sink_errors")
                log.exception("the flagged-frame sink failed on inspection %s", item.inspection.inspection_id)
                _safe_update(item, {"vlm_status": "failed", "error": "the explanation stage raised an error (see the daemon log)"})
            finally:
                with self._cond:
                    self._busy, self._current = False, None
                    self._cond.notify_all()

    def close(self, deadline: float, abandon_current: bool = True) -> None:
        """Items not started get vlm_status skipped; the item in progress may finish until `deadline`,
        after that it gets skipped too (unless abandon_current is False: its sink answers, see join())."""
        with self._cond:
            self._closed = True
            abandoned = [e[2] for e in sorted(self._items, key=lambda e: (-e[0], e[1]))]
            self._items.clear()
            self._cond.notify_all()
        for item in abandoned:
            self.counters.add("abandoned")
            _safe_update(item, {"vlm_status": "skipped", "error": "the daemon stopped before the explanation stage ran"})
        self.join(deadline)
        current = self._current
        if abandon_current and self._thread.is_alive() and current is not None:
            self.counters.add("abandoned")
            log.warning("stopping while inspection %s is being explained; its update says skipped",
                        current.inspection.inspection_id)
            _safe_update(current, {"vlm_status": "skipped", "error": "the daemon stopped during the explanation"})

    def join(self, deadline: float) -> None:
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))


def _safe_update(item: FlaggedFrame, update: dict) -> None:
    try:
        item.publish_update(update)
    except Exception:  # noqa: BLE001
        log.exception("could not publish the update for inspection %s", item.inspection.inspection_id)
