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
import queue
import threading
import time
from dataclasses import dataclass
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
    product: Any  # scoring.ProductCalibration of the scorer that flagged it
    publish_update: Callable[[dict], bool]  # publishes .../result/update for this id; only the first call counts


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
    """A bounded queue in front of the FlaggedSink. `reserve()` never waits: full means skipped."""

    def __init__(self, capacity: int, sink: FlaggedSink):
        self.capacity = capacity
        self._sink = sink
        self._slots = threading.Semaphore(capacity)
        self._items: queue.Queue[FlaggedFrame | None] = queue.Queue()
        self.counters = Counters("offered", "skipped", "explained", "sink_errors", "abandoned")
        self._thread = threading.Thread(target=self._run, name="flagged-sink", daemon=True)
        self._busy = False
        self._current: FlaggedFrame | None = None
        self._reserved = 0  # slots taken and not yet released (reserved, queued or in the sink)
        self._reserved_lock = threading.Lock()
        self.last_beat = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def reserve(self) -> bool:
        if self._slots.acquire(blocking=False):
            with self._reserved_lock:
                self._reserved += 1
            self.counters.add("offered")
            return True
        self.counters.add("skipped")
        return False

    def release(self) -> None:
        with self._reserved_lock:
            self._reserved -= 1
        self._slots.release()

    def outstanding(self) -> int:
        """Items reserved and not yet handed to the sink (or still in it); 0 = idle."""
        with self._reserved_lock:
            return self._reserved

    def put(self, item: FlaggedFrame) -> None:
        self._items.put(item)

    def depth(self) -> int:
        return self._items.qsize() + int(self._busy)

    def hung(self, now: float, limit: float) -> bool:
        """The queue's thread made no progress for `limit` seconds while idle (a sink may take long)."""
        return self._thread.is_alive() and not self._busy and now - self.last_beat > limit

    def _run(self) -> None:
        while True:
            self.last_beat = time.monotonic()
            try:
                item = self._items.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            self._busy, self._current = True, item
            try:
                self._sink(item)
                self.counters.add("explained")
            except Exception:  # noqa: BLE001 - a sink bug must not stop the daemon
                self.counters.add("sink_errors")
                log.exception("the flagged-frame sink failed on inspection %s", item.inspection.inspection_id)
                _safe_update(item, {"vlm_status": "failed", "error": "the explanation stage raised an error (see the daemon log)"})
            finally:
                self._busy, self._current = False, None
                self.release()

    def close(self, deadline: float) -> None:
        """Let the item in progress finish until `deadline`; items not started get vlm_status skipped."""
        abandoned: list[FlaggedFrame] = []
        while True:
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                abandoned.append(item)
        for item in abandoned:
            self.counters.add("abandoned")
            _safe_update(item, {"vlm_status": "skipped", "error": "the daemon stopped before the explanation stage ran"})
        self._items.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        current = self._current
        if self._thread.is_alive() and current is not None:
            self.counters.add("abandoned")
            log.warning("stopping while inspection %s is being explained; its update says skipped",
                        current.inspection.inspection_id)
            _safe_update(current, {"vlm_status": "skipped", "error": "the daemon stopped during the explanation"})


def _safe_update(item: FlaggedFrame, update: dict) -> None:
    try:
        item.publish_update(update)
    except Exception:  # noqa: BLE001
        log.exception("could not publish the update for inspection %s", item.inspection.inspection_id)
